/* The container's first process in the starter's own start (included by starter_fast.c):
 * the root assembled as sifpy.runtime.assemble does it (the underlay of the image's
 * entries, the generated /etc/passwd and /etc/group, the plan's mounts), entered as
 * sifpy.runtime.container.first_process does, and the action script exec'd with the
 * environment of sifpy.runtime.env.process_env. Every error ends the start: status 125 and
 * one message, as Python's. */

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags,
                     const char *data, const char *what)
{
    if (mount(src, dst, type, flags, data) != 0) {
        fprintf(stderr, "error: can't mount: %s: %s\n", what, strerror(errno));
        _exit(EXIT_LAUNCH_FAILED);
    }
}

/* mount.remount: nosuid, nodev unless devices, read-only if asked, and every flag the
 * kernel may have locked on the mount. */
static void remount(const char *path, int readonly, const char *what)
{
    struct statvfs sv;
    unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV;
    if (statvfs(path, &sv) != 0)
        fail(what);
    static const unsigned long st[][2] = {
        {ST_NODEV, MS_NODEV},       {ST_RDONLY, MS_RDONLY},         {ST_NOEXEC, MS_NOEXEC},
        {ST_NOATIME, MS_NOATIME},   {ST_NODIRATIME, MS_NODIRATIME}, {ST_RELATIME, MS_RELATIME},
    };
    for (size_t i = 0; i < sizeof st / sizeof *st; i++)
        if (sv.f_flag & st[i][0])
            flags |= st[i][1];
    if (readonly)
        flags |= MS_RDONLY;
    do_mount(NULL, path, NULL, flags, NULL, what);
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* assemble.build_underlay */
static void fill(const char *image, const char *root, const char *rel)
{
    char src[PATH_MAX], dst[PATH_MAX], path[PATH_MAX];
    snprintf(src, sizeof src, "%s%s", image, rel);
    DIR *d = opendir(src);
    if (d == NULL)
        fail(src);
    char **names = NULL;
    size_t n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        names = realloc(names, (n + 1) * sizeof *names);
        if (names == NULL || (names[n++] = strdup(e->d_name)) == NULL)
            fail("underlay");
    }
    closedir(d);
    if (n > SIFPY_MAX_UNDERLAY_ENTRIES) {
        fprintf(stderr,
                "error: can't assemble the container root: %s of the image has %zu entries, "
                "more than the %d bound one by one\n",
                rel[0] ? rel : "/", n, SIFPY_MAX_UNDERLAY_ENTRIES);
        fprintf(stderr, "hint: run it with --writable-tmpfs (the image itself is then the root, "
                        "under an overlay), or rebuild it with those entries in a subdirectory\n");
        _exit(EXIT_LAUNCH_FAILED);
    }
    qsort(names, n, sizeof *names, by_name);
    for (size_t i = 0; i < n; i++) {
        const char *name = names[i];
        if (rel[0] == '\0' && reserved(name, strlen(name)))
            continue;
        if (snprintf(src, sizeof src, "%s%s/%s", image, rel, name) >= (int)sizeof src ||
            snprintf(dst, sizeof dst, "%s%s/%s", root, rel, name) >= (int)sizeof dst ||
            snprintf(path, sizeof path, "%s/%s", rel, name) >= (int)sizeof path) {
            errno = ENAMETOOLONG;
            fail(rel);
        }
        struct stat st;
        if (lstat(src, &st) != 0)
            fail(src);
        if (S_ISLNK(st.st_mode)) {
            char target[PATH_MAX];
            ssize_t len = readlink(src, target, sizeof target - 1);
            if (len < 0)
                fail(src);
            target[len] = '\0';
            if (symlink(target, dst) != 0)
                fail(dst);
        } else if (S_ISDIR(st.st_mode)) {
            if (mkdir(dst, 0777) != 0 || chmod(dst, st.st_mode & 07777) != 0)
                fail(dst);
            if (expanded(path))
                fill(image, root, path);
            else
                do_mount(src, dst, NULL, MS_BIND | MS_REC, NULL, rel[0] ? rel : "/");
        } else {
            int fd = open(dst, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
            if (fd < 0)
                fail(dst);
            close(fd);
            do_mount(src, dst, NULL, MS_BIND, NULL, path);
        }
        free(names[i]);
    }
    free(names);
}

/* assemble._read_image_file, for a plain file (fast_start checked it): NULL if absent. */
static char *read_image_file(const char *path)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    struct stat st;
    if (fd < 0)
        return NULL;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap + 1);
    if (buf == NULL)
        fail("memory");
    for (ssize_t n; len < cap && (n = read(fd, buf + len, cap - len)) > 0;)
        len += (size_t)n;
    close(fd);
    buf[len] = '\0';
    return buf;
}

/* `line`'s field `i` (':'-separated) equals `value`. */
static int field_is(const char *line, size_t len, int i, const char *value)
{
    const char *p = line, *end = line + len;
    for (; i > 0; i--) {
        p = memchr(p, ':', (size_t)(end - p));
        if (p == NULL)
            return value[0] == '\0';
        p++;
    }
    const char *stop = memchr(p, ':', (size_t)(end - p));
    size_t flen = (size_t)((stop ? stop : end) - p);
    return strlen(value) == flen && strncmp(p, value, flen) == 0;
}

/* assemble._write_files: the image's file, less a line with the caller's uid (passwd),
 * plus the caller's entry where none has its id. */
static void write_db(const char *name, const char *text, int id_field_drop, const char *id,
                     const char *entry)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", SIFPY_FILES, name);
    FILE *f = fopen(path, "we");
    if (f == NULL)
        fail(path);
    int found = 0;
    for (const char *p = text ? text : ""; *p != '\0';) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        int same = field_is(p, len, 2, id);
        if (!(same && id_field_drop)) {
            fwrite(p, 1, len, f);
            fputc('\n', f);
            found |= same;
        }
        p += len + (nl != NULL);
    }
    if (!found)
        fprintf(f, "%s\n", entry);
    if (fclose(f) != 0 || chmod(path, 0644) != 0)
        fail(path);
}

static void write_files(void)
{
    char path[PATH_MAX], uid[16], gid[16], entry[PATH_MAX * 3];
    snprintf(uid, sizeof uid, "%u", (unsigned)F.uid);
    snprintf(gid, sizeof gid, "%u", (unsigned)F.gid);
    snprintf(path, sizeof path, "%s/etc/passwd", SIFPY_IMAGE);
    char *passwd = read_image_file(path);
    snprintf(entry, sizeof entry, "%s:x:%s:%s:%s:%s:%s", F.name, uid, gid, F.gecos, F.home,
             F.shell);
    write_db("passwd", passwd, F.uid != 0, uid, entry);
    snprintf(path, sizeof path, "%s/etc/group", SIFPY_IMAGE);
    char *group = read_image_file(path);
    snprintf(entry, sizeof entry, "%s:x:%s:%s", F.group, gid, F.name);
    write_db("group", group, 0, gid, entry);
    free(passwd);
    free(group);
}

/* The mount point of `m` in the root: opened (O_PATH), created first where missing. */
static int mount_point(int root, const struct fast_mount *m)
{
    if (!m->missing)
        return openat2_(root, m->dest, O_PATH | (m->nofollow ? O_NOFOLLOW : 0));
    int dir = dup(root);
    const char *p = m->dest;
    while (dir >= 0 && *p != '\0') {
        char comp[NAME_MAX + 1];
        int last;
        if (!next_component(&p, comp, &last)) { /* probe() refused those: not reached */
            close(dir);
            return -1;
        }
        struct stat st;
        if (fstatat(dir, comp, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            int rc;
            if (last && !m->is_dir) {
                rc = openat(dir, comp, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC,
                            0644);
                if (rc >= 0)
                    close(rc);
            } else {
                rc = mkdirat(dir, comp, 0755);
            }
            if (rc < 0) {
                fprintf(stderr, "error: can't create mount point: %s: %s: %s\n", m->dest, comp,
                        strerror(errno));
                _exit(EXIT_LAUNCH_FAILED);
            }
        }
        int next = openat(dir, comp, O_PATH | O_NOFOLLOW | O_CLOEXEC | (last ? 0 : O_DIRECTORY));
        close(dir);
        dir = next;
    }
    return dir;
}

static void apply(int root, const struct fast_mount *m)
{
    char src[PATH_MAX], target[64], over[64];
    int tfd = mount_point(root, m);
    if (tfd < 0)
        fail(m->dest);
    snprintf(target, sizeof target, "/proc/self/fd/%d", tfd);
    if (m->kind == K_BIND)
        snprintf(src, sizeof src, "/proc/self/fd/%d", m->fd);
    else
        snprintf(src, sizeof src, "%s/%s", SIFPY_FILES, m->file);
    do_mount(src, target, NULL, MS_BIND | MS_REC, NULL, m->dest);
    if (m->harden) { /* through a lookup that crosses into the new mount */
        int nfd = openat2_(root, m->dest, O_PATH | (m->nofollow ? O_NOFOLLOW : 0));
        if (nfd < 0)
            fail(m->dest);
        snprintf(over, sizeof over, "/proc/self/fd/%d", nfd);
        remount(over, m->readonly, m->dest);
        close(nfd);
    }
    close(tfd);
}

/* container.exec_command's clean process state: default dispositions (those the caller
 * ignored too), glibc's reserved 32 and 33 through the raw syscall, an empty mask; the
 * ambient and inheritable capabilities cleared (ns.drop_inherited_caps). */
static void clean_state(void)
{
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    unsigned char zero[32] = {0};
    for (int sig = 32; sig <= 33; sig++)
        syscall(SYS_rt_sigaction, sig, zero, NULL, 8);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[2];
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 || capget(&hdr, caps) != 0)
        fail("capabilities");
    caps[0].inheritable = caps[1].inheritable = 0;
    if (capset(&hdr, caps) != 0)
        fail("capabilities");
}

/* env.process_env for the default options: HOME, PATH, the runtime's variables, each host
 * variable env.host_env forwards as __SIFPY_H_<name>, then the action script's lists. */
static char **container_env(char **envp, const char *action)
{
    static const char *const never[] = SIFPY_NEVER_FORWARDED;
    static const char *const drop[] = SIFPY_NOT_FORWARDED_PREFIXES;
    size_t n = 0, names_len = 1;
    for (char **e = envp; *e; e++)
        n++, names_len += strlen(*e) + 1;
    char **env = calloc(n + 32, sizeof *env);
    char *names = calloc(1, names_len + 32);
    if (env == NULL || names == NULL)
        fail("memory");
    size_t k = 0;
    char *s;
#define PUT(...) (asprintf(&s, __VA_ARGS__) < 0 ? fail("memory") : (void)(env[k++] = s))
    const char *base = strrchr(F.image, '/');
    PUT("HOME=%s", F.home);
    PUT("PATH=%s", SIFPY_DEFAULT_PATH);
    static const char *const prefixes[] = {"APPTAINER_", "SINGULARITY_"};
    for (int i = 0; i < 2; i++) {
        PUT("%sCONTAINER=%s", prefixes[i], F.image);
        PUT("%sNAME=%s", prefixes[i], base ? base + 1 : F.image);
        PUT("%sCOMMAND=%s", prefixes[i], action);
        PUT("%sENVIRONMENT=%s", prefixes[i], SIFPY_ENVIRONMENT_SCRIPT);
        PUT("%sBIND=", prefixes[i]);
    }
    for (char **e = envp; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (eq == NULL || eq == *e)
            continue;
        size_t len = (size_t)(eq - *e);
        int ok = !(**e >= '0' && **e <= '9');
        for (const char *c = *e; c < eq; c++)
            ok &= (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                  (*c >= '0' && *c <= '9') || *c == '_';
        for (size_t i = 0; ok && i < sizeof never / sizeof *never; i++)
            ok = !(strlen(never[i]) == len && strncmp(*e, never[i], len) == 0);
        for (size_t i = 0; ok && i < sizeof drop / sizeof *drop; i++)
            ok = strncmp(*e, drop[i], strlen(drop[i])) != 0;
        /* os.environ keeps a name's first value */
        for (char **prev = envp; ok && prev < e; prev++)
            ok = !(strncmp(*prev, *e, len + 1) == 0);
        if (!ok)
            continue;
        PUT("__SIFPY_H_%s", *e);
        if (names[0] != '\0')
            strcat(names, " ");
        strncat(names, *e, len);
    }
    PUT("__SIFPY_HOST_NAMES=%s", names);
    PUT("__SIFPY_USER_NAMES=");
    PUT("__SIFPY_LATE_NAMES=");
    PUT("__SIFPY_UID=%u", (unsigned)F.uid);
#undef PUT
    free(names);
    return env;
}

/* `keeper` (a pipe's write end, else -1): instead of exec'ing, write "k" to it once the
 * root is entered, then only keep the container's mount namespace until the parent (the
 * holder, starter_holder.c) dies, as container.first_process's keeper does. */
static _Noreturn void first_process(pid_t parent, int keeper)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(EXIT_LAUNCH_FAILED);
    const char *root = SIFPY_ROOT;
    if (mkdir(root, 0777) != 0)
        fail(root);
    do_mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", "root");
    fill(SIFPY_IMAGE, root, "");
    static const char *const names[] = SIFPY_RESERVED;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", root, names[i]);
        if (mkdir(path, 0755) != 0)
            fail(path);
    }
    PHASE("underlay");
    write_files();
    int root_fd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0)
        fail(root);
    for (int i = 0; i < F.n; i++)
        apply(root_fd, &F.m[i]);
    close(root_fd);
    remount(root, 1, "container root");
    PHASE("binds");
    if (unshare(CLONE_NEWNS) != 0)
        fail("mount namespace");
    if (chdir(root) != 0 || syscall(SYS_pivot_root, ".", ".") != 0 || umount2(".", MNT_DETACH) != 0 ||
        chdir("/") != 0)
        fail("pivot_root");
    /* assemble.enter_cwd: the cwd, else home, else /; reachable from the new root. */
    const char *cands[] = {F.cwd, F.home, "/"};
    int entered = 0;
    for (int i = 0; i < 3 && !entered; i++) {
        char here[PATH_MAX];
        if (chdir(cands[i]) != 0)
            continue;
        if (getcwd(here, sizeof here) == NULL || here[0] != '/') {
            fprintf(stderr, "error: can't chdir: %s: outside the container\n", cands[i]);
            fprintf(stderr, "hint: give a working directory inside the container (--pwd)\n");
            _exit(EXIT_LAUNCH_FAILED);
        }
        entered = 1;
    }
    if (!entered) {
        fprintf(stderr, "error: can't chdir: %s: not reachable in the container\n", F.cwd);
        _exit(EXIT_LAUNCH_FAILED);
    }
    if (keeper >= 0) {
        if (write(keeper, "k", 1) != 1)
            _exit(EXIT_LAUNCH_FAILED);
        closefrom(3);
        for (;;) /* PDEATHSIG (SIGKILL) ends it with the holder */
            pause();
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
        fail("no_new_privs");
    static const unsigned char filter[] = SIFPY_PAYLOAD_FILTER;
    struct {
        unsigned short len;
        const void *filter;
    } prog = {sizeof filter / 8, filter};
    extern char **environ;
    char **env = container_env(environ, F.action);
    clean_state();
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER_, &prog, 0, 0) != 0)
        fail("seccomp filter");
    char **argv = action_argv(F.action, F.args, F.nargs);
    PHASE("exec");
    execve(argv[0], argv, env);
    int code = errno == ENOENT || errno == ENOTDIR ? 127 : 126;
    fprintf(stderr, "error: can't execute: %s: %s\n", argv[0], strerror(errno));
    _exit(code);
}

