/* The holder of a node's shared container, in C (included by starter.c, after
 * starter_join.c): for the ranks of a job step whose start the starter makes itself
 * (starter_fast.c's conditions), the first rank starts this holder instead of Python's
 * (sifpy.runtime.sharens_holder), with the same process structure, socket protocol and
 * lifetime rules:
 *
 *   holder (its own session)   user + mount namespaces, the image's FUSE server, the
 *   │                          socket the ranks join through (starter_join.c's try_join);
 *   │                          a pidfd per member; ends once the last one is gone and no
 *   │                          rank of the step is still to come
 *   ├─ squashfuse_ll -f        the FUSE server (PDEATHSIG)
 *   └─ keeper                  pivoted into the root built by starter_root.c; its mount
 *                              namespace is the container's (PDEATHSIG)
 *
 * Each rank's answer is computed here in C (its environment by container_env, its command
 * by action_argv), where Python's holder plans it in Python. A rank the holder can't answer
 * (another image, a setting in its environment) gets "e" and starts Python. Anything that
 * goes wrong before the holder is ready leaves the start to Python too: the first rank
 * still holds the lock then and hands it over as before.
 */

#include <poll.h>

static struct {
    int listener, lock, keeper_fd, launcher, ns[2];
    long expect, joined;
    int members[4096];
    int nmembers;
    char num[4][32]; /* the image's identity, as the ranks send it */
    char step[512];
} H;

static long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* A rank's request body (sifpy.runtime.sharens_holder.Fast's format): step, the image's
 * identity, cwd, argc, argv..., environment...; the answer's body, or NULL ("e"). */
static char *holder_answer(char *body, uint32_t len, uint32_t *out_len)
{
    char *p = body, *end = body + len, *fields[7];
    for (int i = 0; i < 7; i++)
        if ((fields[i] = next_str(&p, end)) == NULL)
            return NULL;
    char *stop;
    long argc = strtol(fields[6], &stop, 10);
    if (*stop != '\0' || argc < 2 || argc > 65536 || strcmp(fields[0], H.step) != 0 ||
        strcmp(fields[5], F.cwd) != 0)
        return NULL;
    for (int i = 0; i < 4; i++)
        if (strcmp(fields[1 + i], H.num[i]) != 0)
            return NULL;
    char **argv = calloc((size_t)argc + 1, sizeof *argv);
    size_t nenv = 0;
    for (char *q = p; q < end; q += strlen(q) + 1)
        nenv++;
    char **envp = calloc(nenv + 1, sizeof *envp);
    if (argv == NULL || envp == NULL)
        return NULL;
    for (long i = 0; i < argc; i++)
        if ((argv[i] = next_str(&p, end)) == NULL)
            return NULL;
    for (size_t i = 0; i < nenv; i++)
        envp[i] = next_str(&p, end);
    /* The same start as the first rank's (the socket's name is a hash of it): no option,
     * the same action and image; and nothing in its environment that Python must see. */
    if (strcmp(argv[0], F.action) != 0 || strcmp(argv[1], F.image_arg) != 0 ||
        !fast_env_ok(envp))
        return NULL;
    char **cmd = action_argv(F.action, argv + 2, (int)argc - 2);
    char **env = container_env(envp, F.action);
    const char *cwds[] = {F.cwd, F.home, "/"};
    static const unsigned char filter[] = SIFPY_PAYLOAD_FILTER;
    struct buf b = {0};
    uint32_t flen = sizeof filter;
    char count[32];
    int ok = buf_add(&b, &flen, 4) && buf_add(&b, filter, sizeof filter);
    snprintf(count, sizeof count, "3");
    ok = ok && buf_str(&b, count);
    for (int i = 0; ok && i < 3; i++)
        ok = buf_str(&b, cwds[i]);
    int n = 0;
    while (cmd[n] != NULL)
        n++;
    snprintf(count, sizeof count, "%d", n);
    ok = ok && buf_str(&b, count);
    for (int i = 0; ok && i < n; i++)
        ok = buf_str(&b, cmd[i]);
    n = 0;
    while (env[n] != NULL)
        n++;
    snprintf(count, sizeof count, "%d", n);
    ok = ok && buf_str(&b, count);
    for (int i = 0; ok && i < n; i++)
        ok = buf_str(&b, env[i]);
    for (int i = 0; env[i] != NULL; i++)
        free(env[i]);
    free(env);
    free(cmd);
    free(argv);
    free(envp);
    if (!ok) {
        free(b.data);
        return NULL;
    }
    *out_len = (uint32_t)b.len;
    return b.data;
}

/* Answer every pending connection; register each rank answered (its pidfd). */
static void holder_accept(void)
{
    for (;;) {
        int conn = accept4(H.listener, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0)
            return;
        struct timeval tv = {SIFPY_JOIN_TIMEOUT, 0};
        setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        char head[5];
        int pidfd;
        ssize_t got = recv_fds(conn, head, sizeof head, &pidfd, 1);
        uint32_t len = 0, alen = 0;
        char *body = NULL, *answer = NULL;
        if (got == (ssize_t)sizeof head && head[0] == 'f' && pidfd >= 0) {
            memcpy(&len, head + 1, 4);
            body = len <= JOIN_MAX ? malloc(len + 1) : NULL;
            if (body != NULL && read_full(conn, body, len)) {
                body[len] = '\0'; /* ends the last string, whatever was sent */
                answer = holder_answer(body, len, &alen);
            }
        }
        free(body);
        int sent = 0;
        if (answer != NULL) {
            char *out = malloc(alen + 5);
            if (out != NULL) {
                out[0] = 'k';
                memcpy(out + 1, &alen, 4);
                memcpy(out + 5, answer, alen);
                sent = send_fds(conn, out, alen + 5, H.ns, 2);
                free(out);
            }
            free(answer);
        } else {
            send(conn, "e", 1, MSG_NOSIGNAL); /* the rank starts Python */
        }
        close(conn);
        if (!sent || H.nmembers >= (int)(sizeof H.members / sizeof *H.members)) {
            if (pidfd >= 0)
                close(pidfd);
            continue;
        }
        H.members[H.nmembers++] = pidfd;
        H.joined++;
    }
}

/* sharens_holder._serve: answer joins and watch the members until the last one is gone and
 * no more are to come (this many joined, or their launcher gone; else after the linger);
 * returns with the lock held (no rank can be joining), 1 if the keeper died. */
static int holder_serve(void)
{
    long idle_since = now_ms();
    for (;;) {
        struct pollfd p[4096 + 3];
        int n = 0;
        p[n++] = (struct pollfd){H.listener, POLLIN, 0};
        p[n++] = (struct pollfd){H.keeper_fd, POLLIN, 0};
        if (H.launcher >= 0)
            p[n++] = (struct pollfd){H.launcher, POLLIN, 0};
        int first_member = n;
        for (int i = 0; i < H.nmembers; i++)
            p[n++] = (struct pollfd){H.members[i], POLLIN, 0};
        int idle = H.nmembers == 0;
        if (poll(p, (nfds_t)n, idle ? SIFPY_HOLDER_LINGER_MS / 2 : -1) < 0 && errno != EINTR)
            return 1;
        if (p[1].revents)
            return 1;
        if (H.launcher >= 0 && p[2].revents) {
            close(H.launcher);
            H.launcher = -1;
        }
        for (int i = n - 1; i >= first_member; i--) /* members gone (from the end: indexes) */
            if (p[i].revents) {
                int at = i - first_member;
                close(H.members[at]);
                H.members[at] = H.members[--H.nmembers];
            }
        if (p[0].revents)
            holder_accept();
        if (H.nmembers > 0) {
            idle_since = now_ms();
            continue;
        }
        if (now_ms() - idle_since < SIFPY_HOLDER_LINGER_MS)
            continue;
        /* Not while ranks of the step are still to come: a rank the node started late joins
         * this container, not a second one. */
        int waiting = H.launcher >= 0 && H.joined < H.expect;
        if (waiting && now_ms() - idle_since < SIFPY_HOLDER_WAIT_ALL_S * 1000L)
            continue;
        if (flock(H.lock, LOCK_EX | LOCK_NB) != 0)
            continue; /* a rank is joining: its connection is next */
        /* Locked: no rank is between connecting and registering; one that connected before
         * (and gave up) is answered, else we are done. */
        holder_accept();
        if (H.nmembers == 0)
            return 0;
        flock(H.lock, LOCK_UN);
    }
}

/* The holder process; never returns. `ready`: the first rank's pipe ("r" once the
 * container is ready; closed without it: Python starts it). */
static _Noreturn void holder(const struct start *s, const char *sock_path, const char *lock_path,
                             int ready)
{
    /* Nothing of the rank's (its PMI socket, its lock) stays open here. */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
        _exit(EXIT_LAUNCH_FAILED);
    int high = fcntl(ready, F_DUPFD_CLOEXEC, 16);
    int launcher = H.launcher >= 0 ? fcntl(H.launcher, F_DUPFD_CLOEXEC, 16) : -1;
    if (high < 0 || dup3(high, 3, O_CLOEXEC) < 0 ||
        (launcher >= 0 && dup3(launcher, 4, O_CLOEXEC) < 0))
        _exit(EXIT_LAUNCH_FAILED);
    ready = 3;
    H.launcher = launcher >= 0 ? 4 : -1;
    closefrom(5);
    /* The socket and the lock exist before the namespaces: the session covers /tmp, where
     * they are removed through their directory's fd. */
    char dir_path[PATH_MAX];
    snprintf(dir_path, sizeof dir_path, "%s", sock_path);
    char *slash = strrchr(dir_path, '/');
    if (slash == NULL)
        _exit(EXIT_LAUNCH_FAILED);
    *slash = '\0';
    const char *sock_name = strrchr(sock_path, '/') + 1, *lock_name = strrchr(lock_path, '/') + 1;
    int dir = open(dir_path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    H.lock = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    H.listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock_path);
    unlink(sock_path); /* a dead holder's: nothing answers there */
    struct stat mine;
    if (dir < 0 || H.lock < 0 || H.listener < 0 || bind(H.listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(H.listener, 64) != 0 || lstat(sock_path, &mine) != 0)
        _exit(EXIT_LAUNCH_FAILED);
    struct served v;
    struct stat st;
    struct start own = *s;
    own.fast = 1; /* a start the starter makes itself: its own server serves it */
    int ok = serve_image(&own, &v) && fstat(v.image, &st) == 0;
    if (ok) { /* the image served is the one the ranks name */
        char num[4][32];
        snprintf(num[0], sizeof num[0], "%llu", (unsigned long long)st.st_dev);
        snprintf(num[1], sizeof num[1], "%llu", (unsigned long long)st.st_ino);
        snprintf(num[2], sizeof num[2], "%lld",
                 (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
        snprintf(num[3], sizeof num[3], "%lld", (long long)st.st_size);
        for (int i = 0; i < 4; i++)
            ok &= strcmp(num[i], H.num[i]) == 0;
    }
    int keep_pipe[2] = {-1, -1};
    pid_t keeper = -1;
    if (ok && plan_and_probe(v.root) && pipe2(keep_pipe, O_CLOEXEC) == 0) {
        make_session(v.root);
        pid_t me = getpid();
        keeper = fork();
        if (keeper == 0)
            first_process(me, keep_pipe[1]);
        close(keep_pipe[1]);
        prctl(PR_SET_NAME, SIFPY_HOLDER_NAME, 0, 0, 0); /* what ps shows; not the keeper */
        char k = 0;
        ok = keeper > 0 && read(keep_pipe[0], &k, 1) == 1 && k == 'k';
        close(keep_pipe[0]);
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/ns/mnt", (int)keeper);
        H.ns[0] = open("/proc/self/ns/user", O_RDONLY | O_CLOEXEC);
        H.ns[1] = open(path, O_RDONLY | O_CLOEXEC);
        H.keeper_fd = (int)syscall(SYS_pidfd_open, keeper, 0);
        ok = ok && H.ns[0] >= 0 && H.ns[1] >= 0 && H.keeper_fd >= 0;
        for (int i = 0; i < F.n; i++) /* the keeper has the binds: nothing pinned here */
            if (F.m[i].fd >= 0)
                close(F.m[i].fd);
        if (F.cwd_fd >= 0)
            close(F.cwd_fd);
        close(v.image);
    } else {
        ok = 0;
    }
    if (!ok) { /* Python starts it: nothing of ours is left */
        struct stat now;
        if (fstatat(dir, sock_name, &now, AT_SYMLINK_NOFOLLOW) == 0 && now.st_ino == mine.st_ino)
            unlinkat(dir, sock_name, 0);
        _exit(EXIT_LAUNCH_FAILED); /* PDEATHSIG: the server, keeper and reader go too */
    }
    if (chdir("/") != 0 || write(ready, "r", 1) != 1)
        _exit(EXIT_LAUNCH_FAILED);
    close(ready);
    int stopped = holder_serve();
    if (stopped) { /* the keeper is gone: so is the container, with its members */
        for (int i = 0; i < H.nmembers; i++)
            syscall(SYS_pidfd_send_signal, H.members[i], SIGKILL, NULL, 0);
        flock(H.lock, LOCK_EX);
    }
    struct stat now;
    if (fstatat(dir, sock_name, &now, AT_SYMLINK_NOFOLLOW) == 0 && now.st_ino == mine.st_ino)
        unlinkat(dir, sock_name, 0);
    unlinkat(dir, lock_name, 0); /* a rank waiting on it takes the lock of a new file */
    kill(keeper, SIGKILL);
    kill(v.server, SIGKILL); /* mount.stop_server */
    while (waitpid(v.server, NULL, 0) < 0 && errno == EINTR)
        ;
    _exit(0);
}

/* For join_fast's first rank, holding the lock: start a C holder for this start; 1 once its
 * container is ready (the rank then joins it as any rank does), 0 where Python must start
 * it (nothing is left behind). */
static int hold_fast(const struct start *s, const char *sock_path, const char *lock_path,
                     const char *step, char num[4][32])
{
    memset(&H, 0, sizeof H);
    H.launcher = -1;
    snprintf(H.step, sizeof H.step, "%s", step);
    memcpy(H.num, num, sizeof H.num);
    /* How many ranks this node runs, and their launcher (our parent): the holder stays
     * until that many joined, or the launcher is gone (sharens_holder.start_holder). */
    H.expect = local_ranks();
    if (H.expect > 0) {
        H.launcher = (int)syscall(SYS_pidfd_open, getppid(), 0);
        if (H.launcher < 0)
            H.expect = -1;
    }
    int ready[2];
    if (pipe2(ready, O_CLOEXEC) != 0)
        return 0;
    pid_t first = fork();
    if (first == 0) { /* its own session, and a parent that exits now */
        close(ready[0]);
        if (setsid() < 0)
            _exit(1);
        pid_t h = fork();
        if (h != 0)
            _exit(h < 0);
        holder(s, sock_path, lock_path, ready[1]);
    }
    close(ready[1]);
    if (H.launcher >= 0)
        close(H.launcher);
    if (first > 0)
        while (waitpid(first, NULL, 0) < 0 && errno == EINTR)
            ;
    char c = 0;
    ssize_t n = first > 0 ? read(ready[0], &c, 1) : -1;
    close(ready[0]);
    return n == 1 && c == 'r';
}
