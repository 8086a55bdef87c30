/* The monitor of the starter's own start (included by starter_fast.c): the starter process
 * itself, as Python's inline monitor is (sifpy.runtime.supervise): it relays signals to
 * the container, enforces the action script's deadline (--runscript-timeout's default), and
 * ends with the container's status once the FUSE server is stopped. */

static int cmdline_is(pid_t pid, char *const *argv)
{
    char path[64], buf[1 << 16];
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    size_t at = 0;
    for (int i = 0; argv[i]; i++) {
        size_t len = strlen(argv[i]) + 1;
        if (n < 0 || at + len > (size_t)n || memcmp(buf + at, argv[i], len) != 0)
            return 0;
        at += len;
    }
    return at == (size_t)n;
}

static size_t children_of(pid_t pid, pid_t *out, size_t max)
{
    char path[320], buf[4096];
    size_t n = 0;
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/proc/%d/task/%s/children", (int)pid, e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t len = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (len <= 0)
            continue;
        buf[len] = '\0';
        for (char *save = NULL, *t = strtok_r(buf, " \n", &save); t && n < max;
             t = strtok_r(NULL, " \n", &save))
            out[n++] = (pid_t)atoi(t);
    }
    closedir(d);
    return n;
}

/* supervise._expire: at the deadline, if the action script still runs, kill it and all
 * it started; 1 then, with the command it was running in `killed` ("" if the script
 * itself was busy), as Apptainer names it. */
static int expire(pid_t main_pid, char *const *argv, char *killed, size_t size)
{
    if (!cmdline_is(main_pid, argv))
        return 0;
    static pid_t tree[4096];
    size_t n = children_of(main_pid, tree, 4096);
    for (size_t i = 0; i < n && n < 4096; i++)
        n += children_of(tree[i], tree + n, 4096 - n);
    killed[0] = '\0';
    for (size_t i = 0; i < n && killed[0] == '\0'; i++) {
        if (cmdline_is(tree[i], argv)) /* a `$(...)` subshell of the script */
            continue;
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/cmdline", (int)tree[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t len = fd >= 0 ? read(fd, killed, size - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (len <= 0) {
            killed[0] = '\0';
            continue;
        }
        killed[len] = '\0';
        for (ssize_t j = 0; j < len - 1; j++)
            if (killed[j] == '\0')
                killed[j] = ' ';
    }
    kill(main_pid, SIGKILL); /* the shell first: it starts nothing more */
    for (size_t i = 0; i < n; i++)
        kill(tree[i], SIGKILL);
    return 1;
}

static void report_expired(const char *killed)
{
    fputs("error: can't start container: ", stderr);
    if (killed[0] != '\0') { /* quoted as Go's %q */
        fputs("command \"", stderr);
        for (const char *c = killed; *c; c++) {
            if (*c == '"' || *c == '\\')
                fputc('\\', stderr);
            fputc(*c, stderr);
        }
        fputc('"', stderr);
    } else {
        fputs("the action script", stderr);
    }
    fprintf(stderr, " was killed after %s timeout\n", SIFPY_RUNSCRIPT_TIMEOUT_TEXT);
    fputs("hint: " SIFPY_RUNSCRIPT_TIMEOUT_HINT "\n", stderr);
}

static void waited_signals(sigset_t *set)
{
    static const int forwarded[] = SIFPY_FORWARDED_SIGNALS;
    sigemptyset(set);
    sigaddset(set, SIGCHLD);
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        sigaddset(set, forwarded[i]);
}

/* supervise.supervise, then the monitor's end (stop the server, exit with the status). */
static _Noreturn void monitor(pid_t child, pid_t server, char *const *argv)
{
    static char killed[4096];
    sigset_t waited;
    waited_signals(&waited);
    struct timespec now, deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += SIFPY_RUNSCRIPT_TIMEOUT;
    int timed = 1, expired = 0, status = 0;
    for (;;) {
        siginfo_t info;
        int sig;
        if (timed) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            struct timespec left = {deadline.tv_sec - now.tv_sec, deadline.tv_nsec - now.tv_nsec};
            if (left.tv_nsec < 0)
                left.tv_sec--, left.tv_nsec += 1000000000L;
            if (left.tv_sec < 0)
                left.tv_sec = left.tv_nsec = 0;
            sig = sigtimedwait(&waited, &info, &left);
            if (sig < 0 && errno == EAGAIN) {
                timed = 0;
                expired = expire(child, argv, killed, sizeof killed);
                continue;
            }
        } else {
            sig = sigwaitinfo(&waited, &info);
        }
        if (sig < 0)
            continue;
        if (sig != SIGCHLD) {
            if (info.si_code != SIFPY_SI_KERNEL) /* a terminal's reached the container too */
                kill(child, sig);
            continue;
        }
        pid_t pid;
        int done = 0;
        while (!done && (pid = waitpid(-1, &status, WNOHANG)) > 0)
            done = pid == child;
        if (done)
            break;
    }
    PHASE("exited");
    kill(server, SIGKILL); /* mount.stop_server */
    while (waitpid(server, NULL, 0) < 0 && errno == EINTR)
        ;
    PHASE("end");
    if (expired) {
        report_expired(killed);
        _exit(EXIT_LAUNCH_FAILED);
    }
    _exit(WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status));
}

