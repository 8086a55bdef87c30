/* The starter's fast join of a shared container (sifpy.runtime.sharens), included by
 * starter.c.
 *
 * A rank of an MPI or Slurm job joins the container its node already has. Python costs a
 * rank ~20 ms of CPU to start, so when the container's holder is up, the starter does the
 * join itself: it finds the holder under the name sifpy.runtime.sharens.fast_key computes
 * (the same bytes, the same hash), sends it this process's pidfd (the holder watches it),
 * sifpy's argv, the environment and the cwd; the holder, which is Python, plans the start
 * exactly as `sifpy exec` would (sifpy.cli.exec._joiner), checks that it is a start of its
 * own container, and answers with the namespace fds, the working directory candidates,
 * the command, its environment and the payload's seccomp filter. The starter then joins
 * the namespaces and execs, as sifpy.runtime.process.exec_joined does.
 *
 * Anything unexpected before setns(2) (no holder, a refusal, a short answer) starts Python
 * instead, which does all of it itself; after setns(2) a failure ends with status 125.
 */
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/utsname.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define JOIN_MAX (8 << 20) /* the most a request or an answer may be */

/* Whether this process is a rank of a job step (as sifpy.runtime.sharens.job_step says) or
 * asked to share (`explicit`); its step's name into `out`. */
static int job_step(char *out, size_t n, int explicit)
{
#define SET(v) ((v) != NULL && *(v) != '\0')
    const char *job = getenv("SLURM_JOB_ID"), *step = getenv("SLURM_STEP_ID");
    const char *procid = getenv("SLURM_PROCID"), *prank = getenv("PMIX_RANK");
    const char *pns = getenv("PMIX_NAMESPACE"), *orank = getenv("OMPI_COMM_WORLD_RANK");
    const char *ojob = getenv("OMPI_MCA_ess_base_jobid"), *rank = getenv("PMI_RANK");
    int w;
    if (SET(step) && SET(procid) && SET(job))
        w = snprintf(out, n, "slurm:%s.%s", job, step);
    else if (SET(prank) && SET(pns))
        w = snprintf(out, n, "pmix:%s", pns);
    else if (SET(orank) && SET(ojob))
        w = snprintf(out, n, "ompi:%s", ojob);
    else if (SET(orank) || SET(rank) || SET(prank) || explicit) {
        /* The parent (pid and start time) stands for the step: Hydra names none. */
        pid_t ppid = getppid();
        char path[64], stat_text[1024], started[32] = "?";
        snprintf(path, sizeof path, "/proc/%d/stat", (int)ppid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t len = fd >= 0 ? read(fd, stat_text, sizeof stat_text - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (len > 0) {
            stat_text[len] = '\0';
            char *p = strrchr(stat_text, ')'), *save = NULL;
            char *tok = p != NULL ? strtok_r(p + 1, " ", &save) : NULL;
            for (int i = 0; tok != NULL && i < 19; i++) /* field 22, after "pid (comm)" */
                tok = strtok_r(NULL, " ", &save);
            if (tok != NULL)
                snprintf(started, sizeof started, "%s", tok);
        }
        w = snprintf(out, n, "parent:%d:%s", (int)ppid, started);
    } else
        return 0;
#undef SET
    /* The node's name too (sifpy.runtime.sharens.job_step says why). */
    struct utsname u;
    if (w <= 0 || (size_t)w >= n || uname(&u) != 0)
        return 0;
    int on = snprintf(out + w, n - (size_t)w, " on %s", u.nodename);
    return on > 0 && (size_t)on < n - (size_t)w;
}

/* How many ranks of this job step run on this node, as the launcher says, or -1 (as
 * sifpy.runtime.sharens.local_ranks says: the same variables, the same order). */
static long local_ranks(void)
{
    static const char *const vars[] = {"MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"};
    char *end;
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) {
        const char *v = getenv(vars[i]);
        if (v != NULL && *v >= '0' && *v <= '9') {
            long n = strtol(v, &end, 10);
            if (*end == '\0' && n > 0)
                return n;
        }
    }
    const char *step = getenv("SLURM_STEP_ID"), *node = getenv("SLURM_NODEID");
    const char *per = getenv("SLURM_STEP_TASKS_PER_NODE");
    if (step == NULL || *step == '\0' || node == NULL || *node < '0' || *node > '9' ||
        per == NULL || *per == '\0')
        return -1;
    long index = strtol(node, &end, 10);
    if (*end != '\0')
        return -1;
    /* "2(x3),1": 2 on each of the first three nodes, then 1 */
    for (const char *p = per; *p != '\0';) {
        if (*p < '0' || *p > '9')
            return -1;
        long count = strtol(p, &end, 10), repeat = 1;
        p = end;
        if (p[0] == '(' && p[1] == 'x') {
            if (p[2] < '0' || p[2] > '9')
                return -1;
            repeat = strtol(p + 2, &end, 10);
            if (*end != ')')
                return -1;
            p = end + 1;
        }
        if (*p != ',' && *p != '\0')
            return -1;
        if (index < repeat)
            return count > 0 ? count : -1;
        index -= repeat;
        if (*p == ',')
            p++;
    }
    return -1;
}

/* 64-bit FNV-1a, continued over `len` bytes. */
static uint64_t fnv1a(uint64_t h, const void *data, size_t len)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

struct key {
    uint64_t h[2];
    int parts;
};

static void key_add(struct key *k, const char *s)
{
    for (int i = 0; i < 2; i++) {
        if (k->parts > 0)
            k->h[i] = fnv1a(k->h[i], "", 1); /* the "\0".join separator */
        k->h[i] = fnv1a(k->h[i], s, strlen(s));
    }
    k->parts++;
}

/* A growing buffer of NUL-terminated strings. */
struct buf {
    char *data;
    size_t len, cap;
};

static int buf_add(struct buf *b, const void *data, size_t len)
{
    if (b->len + len > JOIN_MAX)
        return 0;
    if (b->len + len > b->cap) {
        size_t cap = (b->len + len) * 2;
        char *grown = realloc(b->data, cap);
        if (grown == NULL)
            return 0;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 1;
}

static int buf_str(struct buf *b, const char *s)
{
    return buf_add(b, s, strlen(s) + 1);
}

/* The next NUL-terminated string of an answer, or NULL past its end. */
static char *next_str(char **p, char *end)
{
    char *s = *p, *nul = s < end ? memchr(s, '\0', (size_t)(end - s)) : NULL;
    if (nul == NULL)
        return NULL;
    *p = nul + 1;
    return s;
}

/* A count, then that many strings, as a NULL-terminated array. */
static char **next_list(char **p, char *end)
{
    char *count = next_str(p, end), *stop;
    if (count == NULL)
        return NULL;
    long n = strtol(count, &stop, 10);
    if (*stop != '\0' || n < 0 || n > JOIN_MAX)
        return NULL;
    char **list = calloc((size_t)n + 1, sizeof *list);
    for (long i = 0; list != NULL && i < n; i++)
        if ((list[i] = next_str(p, end)) == NULL)
            return NULL;
    return list;
}

static int read_full(int fd, char *to, size_t len)
{
    while (len > 0) {
        ssize_t got = read(fd, to, len);
        if (got <= 0) {
            if (got < 0 && errno == EINTR)
                continue;
            return 0;
        }
        to += got;
        len -= (size_t)got;
    }
    return 1;
}

/* Send `len` bytes with `n` fds attached (SCM_RIGHTS); whether all went. */
static int send_fds(int sock, const void *data, size_t len, const int *fds, int n)
{
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(4 * sizeof(int))];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {(void *)data, len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    msg.msg_control = ctl.space;
    msg.msg_controllen = CMSG_SPACE((size_t)n * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN((size_t)n * sizeof(int));
    memcpy(CMSG_DATA(c), fds, (size_t)n * sizeof(int));
    return n > 0 && n <= 4 && sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)len;
}

/* Receive exactly `len` bytes and the fds attached (up to `max`, close-on-exec; the others
 * closed, the missing ones -1); how many bytes came. */
static ssize_t recv_fds(int sock, void *data, size_t len, int *fds, int max)
{
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(4 * sizeof(int))];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {data, len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    msg.msg_control = ctl.space;
    msg.msg_controllen = sizeof ctl.space;
    ssize_t got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    int have = 0;
    for (int i = 0; i < max; i++)
        fds[i] = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); got >= 0 && c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int got_fds[4];
        memcpy(got_fds, CMSG_DATA(c), (n > 4 ? 4 : n) * sizeof(int));
        for (size_t i = 0; i < n && i < 4; i++) {
            if (have < max)
                fds[have++] = got_fds[i];
            else
                close(got_fds[i]);
        }
    }
    return got;
}

static _Noreturn void join_fail(const char *what, const char *obj)
{
    fprintf(stderr, "error: can't %s: %s: %s\n", what, obj, strerror(errno));
    exit(EXIT_LAUNCH_FAILED);
}

static void try_join(int argc, char **argv, const char *path, const char *step,
                     char num[4][32], const char *cwd_in);
static int hold_fast(const struct start *s, const char *sock_path, const char *lock_path,
                     const char *step, char num[4][32]);

/* Join the node's shared container for this start and exec the command in it; returns
 * (nothing done) when Python must start instead. `image_at`: the image's index in argv.
 *
 * The ranks of a job start together, before any holder is up: one of them (the first to
 * lock NAME.lock) starts Python, which creates the holder, and keeps the lock until it is
 * ready (SIFPY_FAST_LOCK tells Python which fd); the others wait for the lock and join. */
static void join_fast(const struct start *s, int argc, char **argv, int image_at, int explicit)
{
    char step[512], cwd[PATH_MAX], dir[PATH_MAX], num[4][32];
    struct stat st, dst;
    uid_t uid = getuid();
    if (uid == 0 || !job_step(step, sizeof step, explicit) || getcwd(cwd, sizeof cwd) == NULL)
        return;
    /* Options that need a container per rank (sifpy.cli.exec._UNSHARED; the others are
     * options the starter leaves to Python anyway). */
    for (int i = 1; i < image_at; i++)
        if (!strcmp(argv[i], "-p") || !strcmp(argv[i], "--pid") || !strcmp(argv[i], "-i") ||
            !strcmp(argv[i], "--ipc") || !strcmp(argv[i], "-C") ||
            !strcmp(argv[i], "--containall"))
            return;
    if (stat(argv[image_at], &st) != 0)
        return;
    /* The caller's private runtime directory (sifpy.runtime.sharens.runtime_dir). */
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int w = xdg != NULL && xdg[0] == '/' ? snprintf(dir, sizeof dir, "%s/sifpy", xdg)
                                         : snprintf(dir, sizeof dir, "/tmp/sifpy-%u", uid);
    if (w > 0 && (size_t)w < sizeof dir)
        mkdir(dir, 0700); /* the first start on the node: as Python would */
    if (w <= 0 || (size_t)w >= sizeof dir || lstat(dir, &dst) != 0 || !S_ISDIR(dst.st_mode) ||
        dst.st_uid != uid || (dst.st_mode & 077) != 0)
        return;
    /* The holder's name for this start: sifpy.runtime.sharens.fast_key. */
    static const char *const vars[] = {"HOME", "SIFPY_BIND", "APPTAINER_BIND", "SIFPY_MOUNT",
                                       "APPTAINER_MOUNT"};
    struct key k = {{0xcbf29ce484222325ULL, 0x84222325cbf29ce4ULL}, 0};
    char uid_s[32];
    snprintf(uid_s, sizeof uid_s, "%u", uid);
    snprintf(num[0], sizeof num[0], "%llu", (unsigned long long)st.st_dev);
    snprintf(num[1], sizeof num[1], "%llu", (unsigned long long)st.st_ino);
    snprintf(num[2], sizeof num[2], "%lld",
             (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
    snprintf(num[3], sizeof num[3], "%lld", (long long)st.st_size);
    const char *fixed[] = {"sifpy-fast-1", uid_s, step, cwd, num[0], num[1], num[2], num[3]};
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++)
        key_add(&k, fixed[i]);
    for (int i = 1; i <= image_at; i++)
        key_add(&k, argv[i]);
    key_add(&k, "");
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++)
        key_add(&k, getenv(vars[i]) != NULL ? getenv(vars[i]) : "");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    w = snprintf(addr.sun_path, sizeof addr.sun_path, "%s/f-%016llx%016llx.sock", dir,
                 (unsigned long long)k.h[0], (unsigned long long)k.h[1]);
    if (w <= 0 || (size_t)w >= sizeof addr.sun_path)
        return;
    try_join(argc, argv, addr.sun_path, step, num, cwd);
    char lock_path[sizeof addr.sun_path + 8];
    snprintf(lock_path, sizeof lock_path, "%.*s.lock", w - 5, addr.sun_path);
    for (int tries = 0; tries < 100; tries++) {
        int lock = open(lock_path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (lock < 0)
            return;
        int first = flock(lock, LOCK_EX | LOCK_NB) == 0;
        if (!first && (errno != EWOULDBLOCK || flock(lock, LOCK_SH) != 0)) {
            close(lock);
            return;
        }
        /* A holder removes the file when it exits: a lock on a removed file is retaken. */
        struct stat ls, fs;
        if (fstat(lock, &fs) != 0 || stat(lock_path, &ls) != 0 || ls.st_ino != fs.st_ino) {
            close(lock);
            continue;
        }
        if (!first) { /* whoever created it is done: join, or start Python as it did */
            close(lock);
            try_join(argc, argv, addr.sun_path, step, num, cwd);
            return;
        }
        try_join(argc, argv, addr.sun_path, step, num, cwd);
        /* A start the starter makes itself: its holder too (starter_holder.c), which the
         * rank then joins as the others do, once the lock is theirs to take. */
        if (fast_wanted(s, argc, argv) && hold_fast(s, addr.sun_path, lock_path, step, num)) {
            close(lock);
            try_join(argc, argv, addr.sun_path, step, num, cwd);
            return; /* not answered after all: Python starts, and finds its way */
        }
        char value[sizeof lock_path + 32];
        snprintf(value, sizeof value, "%d:%s", lock, lock_path);
        if (fcntl(lock, F_SETFD, 0) != 0 || setenv("SIFPY_FAST_LOCK", value, 1) != 0)
            close(lock);
        return;
    }
}

/* Ask the holder at `path` for this start; exec in its container, or return. */
static void try_join(int argc, char **argv, const char *path, const char *step,
                     char num[4][32], const char *cwd_in)
{
    extern char **environ;
    char cwd[PATH_MAX];
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    snprintf(cwd, sizeof cwd, "%s", cwd_in);

    /* The request: "f", its length, then step, image identity, cwd, argv, environment. */
    struct buf req = {0};
    char count[32];
    int ok = buf_add(&req, "f\0\0\0\0", 5);
    ok = ok && buf_str(&req, step);
    for (int i = 0; i < 4; i++)
        ok = ok && buf_str(&req, num[i]);
    ok = ok && buf_str(&req, cwd);
    snprintf(count, sizeof count, "%d", argc - 1);
    ok = ok && buf_str(&req, count);
    for (int i = 1; ok && i < argc; i++)
        ok = ok && buf_str(&req, argv[i]);
    for (char **e = environ; ok && *e != NULL; e++)
        ok = ok && buf_str(&req, *e);
    if (!ok) {
        free(req.data);
        return;
    }
    uint32_t body = (uint32_t)(req.len - 5);
    memcpy(req.data + 1, &body, 4); /* little-endian, as the holder reads it (<I) */

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (sock >= 0)
            close(sock);
        free(req.data);
        return;
    }
    struct timeval tv = {10, 0};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0); /* close-on-exec by itself */
    ok = pidfd >= 0 && send_fds(sock, req.data, req.len, &pidfd, 1);
    if (pidfd >= 0)
        close(pidfd);
    free(req.data);

    /* The answer: "k", its length, the filter's length and the filter, then the lists. */
    char head[5];
    int fds[2] = {-1, -1};
    char *ans = NULL;
    uint32_t len = 0;
    if (ok) {
        ssize_t got = recv_fds(sock, head, sizeof head, fds, 2);
        ok = got == (ssize_t)sizeof head && head[0] == 'k' && fds[0] >= 0 && fds[1] >= 0;
        if (ok) {
            memcpy(&len, head + 1, 4);
            ans = len >= 4 && len <= JOIN_MAX ? malloc(len) : NULL;
            ok = ans != NULL && read_full(sock, ans, len);
        }
    }
    close(sock);
    uint32_t bpf_len = 0;
    char **cwds = NULL, **cmd = NULL, **env = NULL;
    if (ok) {
        memcpy(&bpf_len, ans, 4);
        ok = bpf_len <= len - 4 && bpf_len % sizeof(struct sock_filter) == 0;
    }
    if (ok) {
        char *p = ans + 4 + bpf_len, *end = ans + len;
        cwds = next_list(&p, end);
        cmd = next_list(&p, end);
        env = next_list(&p, end);
        ok = cwds != NULL && cwds[0] != NULL && cmd != NULL && cmd[0] != NULL && env != NULL;
    }
    if (!ok) { /* Python starts and does it all (the fds are close-on-exec) */
        for (int i = 0; i < 2; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        free(ans);
        return;
    }

    /* From here on this process is the rank: no way back to Python. */
    if (syscall(SYS_setns, fds[0], CLONE_NEWUSER) != 0)
        join_fail("join namespace", "the shared container's user namespace");
    if (syscall(SYS_setns, fds[1], CLONE_NEWNS) != 0)
        join_fail("join namespace", "the shared container's mount namespace");
    close(fds[0]);
    close(fds[1]);
    /* The cwd, else home, else /; never one outside the container's root (runc's
     * verifyCwd: getcwd fails for an unreachable cwd). */
    int in = 0;
    for (char **cand = cwds; !in && *cand != NULL; cand++) {
        if (chdir(*cand) != 0)
            continue;
        if (getcwd(cwd, sizeof cwd) == NULL || cwd[0] != '/') {
            fprintf(stderr, "error: can't chdir: %s: outside the container\n", *cand);
            exit(EXIT_LAUNCH_FAILED);
        }
        in = 1;
    }
    if (!in) {
        fprintf(stderr, "error: can't chdir: %s: not reachable in the container\n", cwds[0]);
        exit(EXIT_LAUNCH_FAILED);
    }
    /* Default dispositions (the raw call: glibc guards its own 32 and 33), nothing blocked. */
    static const char zero[32];
    for (int sig = 1; sig < 65; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, zero, NULL, 8);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        join_fail("set", "no_new_privs");
    if (bpf_len > 0) {
        struct sock_filter *filter = malloc(bpf_len);
        if (filter == NULL)
            join_fail("install", "seccomp filter");
        memcpy(filter, ans + 4, bpf_len);
        struct sock_fprog prog = {(unsigned short)(bpf_len / sizeof *filter), filter};
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
            join_fail("install", "seccomp filter");
    }
    if (strchr(cmd[0], '/') != NULL)
        execve(cmd[0], cmd, env);
    else {
        environ = env;
        execvp(cmd[0], cmd);
    }
    int code = errno == ENOENT || errno == ENOTDIR ? 127 : 126;
    fprintf(stderr, "error: can't execute: %s: %s\n", cmd[0],
            code == 127 && strchr(cmd[0], '/') == NULL ? "command not found" : strerror(errno));
    exit(code);
}
