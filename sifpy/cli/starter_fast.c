/* The starter's own start of the common container (included by starter.c).
 *
 * `sifpy exec|run|test IMG.sif ...` without options, by a user, with no site or user
 * settings, no hooks and nothing in the environment that changes the start, is by far the
 * most frequent start (a job script's loop, an MPI rank alone on its node). Python needs
 * ~10 ms to start, import and plan it, more than the container itself costs; ch-run does
 * all of it in C. So this file does that one container itself, with no Python at all,
 * exactly as the Python runtime does it for the same input (sifpy.runtime: plan.plan's
 * default mounts, assemble's underlay and files, container.first_process, supervise), and
 * tests/runtime/test_fast_start.py compares the two, item by item, through both paths.
 *
 * It decides in two steps, and any doubt sends the start to Python, which then does it all
 * (the image stays served): before serving (fast_wanted: the command line, the settings,
 * the environment) and once the image is readable through its detached mount (fast_start:
 * every mount point is a plain path in the image, or missing in a directory the underlay
 * makes; /etc/passwd and /etc/group plain ASCII files). Nothing is mounted in the session
 * before both said yes; after that, a failure ends the start with status 125 and a message,
 * as Python's would.
 *
 * SIFPY_PYTHON_START (set to anything) sends every start to Python.
 */

#include <dirent.h>
#include <grp.h>
#include <pwd.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <time.h>

#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef PR_SET_SECCOMP
#define PR_SET_SECCOMP 22
#endif
#define SECCOMP_MODE_FILTER_ 2
#define RESOLVE_NO_MAGICLINKS_ 0x02
#define RESOLVE_IN_ROOT_ 0x10

#define FAST_MAX_MOUNTS 16
#define FAST_MAX_EXPAND 64

enum { K_BIND, K_FILE };

struct fast_mount {
    char dest[PATH_MAX];
    int kind;
    int fd;         /* the pinned source (K_BIND) */
    const char *file; /* the generated file's name under FILES (K_FILE) */
    int readonly, harden, is_dir, nofollow;
    int missing;    /* the destination is missing in the image: created in the underlay */
};

struct fast {
    const char *action;
    char **args; /* the action's arguments */
    int nargs;
    char image[PATH_MAX]; /* os.path.abspath of the image, as given */
    char cwd[PATH_MAX];
    int cwd_fd;
    uid_t uid;
    gid_t gid;
    char name[256], group[256], gecos[1024], home[PATH_MAX], shell[PATH_MAX];
    struct fast_mount m[FAST_MAX_MOUNTS];
    int n;
    char expand[FAST_MAX_EXPAND][PATH_MAX]; /* image directories made real in the underlay */
    int nexpand;
};

static struct fast F;

/* --- before serving: the command line, the settings, the environment ------------------ */

/* Names in the environment that change a start (settings declared in sifpy.config and
 * their Apptainer aliases, injected variables, a PMIx launcher's directories): with any
 * of them set, Python starts the container. */
static int fast_env_ok(void)
{
    extern char **environ;
    static const char *const prefixes[] = SIFPY_FAST_ENV_PREFIXES;
    static const char *const names[] = SIFPY_FAST_ENV_NAMES;
    for (char **e = environ; *e != NULL; e++) {
        const char *eq = strchr(*e, '=');
        size_t len = eq ? (size_t)(eq - *e) : strlen(*e);
        for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
            if (strncmp(*e, prefixes[i], strlen(prefixes[i])) == 0)
                return 0;
        for (size_t i = 0; i < sizeof names / sizeof *names; i++)
            if (strlen(names[i]) == len && strncmp(*e, names[i], len) == 0)
                return 0;
    }
    return 1;
}

/* os.path.abspath: `path` joined to the cwd, normalized lexically. */
static int abspath(const char *path, const char *cwd, char *out)
{
    char buf[PATH_MAX * 2];
    if (snprintf(buf, sizeof buf, "%s/%s", path[0] == '/' ? "" : cwd, path) >= PATH_MAX)
        return 0;
    char *parts[PATH_MAX / 2];
    int n = 0;
    for (char *save = NULL, *p = strtok_r(buf, "/", &save); p; p = strtok_r(NULL, "/", &save)) {
        if (strcmp(p, ".") == 0)
            continue;
        if (strcmp(p, "..") == 0) {
            if (n > 0)
                n--;
            continue;
        }
        parts[n++] = p;
    }
    out[0] = '\0';
    size_t len = 0;
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(out + len, PATH_MAX - len, "/%s", parts[i]);
    if (n == 0)
        strcpy(out, "/");
    return len < PATH_MAX;
}

/* Whether the starter may start this container itself (see the top of this file). */
static int fast_wanted(const struct start *s, int argc, char **argv)
{
    if (s->options || s->fakeroot || s->global_options || getenv("SIFPY_PYTHON_START") != NULL)
        return 0;
    if (strcmp(argv[s->action_at], "shell") == 0 || !fast_env_ok())
        return 0;
    if (access(SIFPY_HOOKS_DIR, F_OK) == 0 || errno != ENOENT)
        return 0;
    memset(&F, 0, sizeof F);
    F.action = argv[s->action_at];
    F.args = argv + s->image_at + 1;
    F.nargs = argc - s->image_at - 1;
    F.cwd_fd = -1;
    if (getcwd(F.cwd, sizeof F.cwd) == NULL || F.cwd[0] != '/')
        return 0;
    if (!abspath(s->image, F.cwd, F.image))
        return 0;
    F.uid = getuid();
    F.gid = getgid();
    /* sifpy.runtime.start.host_identity */
    struct passwd *pw = getpwuid(F.uid);
    int ok = 1;
    if (pw != NULL) {
        ok &= snprintf(F.name, sizeof F.name, "%s", pw->pw_name) < (int)sizeof F.name;
        ok &= snprintf(F.gecos, sizeof F.gecos, "%s", pw->pw_gecos) < (int)sizeof F.gecos;
        ok &= snprintf(F.home, sizeof F.home, "%s", pw->pw_dir) < (int)sizeof F.home;
        ok &= snprintf(F.shell, sizeof F.shell, "%s", pw->pw_shell) < (int)sizeof F.shell;
    } else {
        const char *home = getenv("HOME");
        snprintf(F.name, sizeof F.name, "uid%u", (unsigned)F.uid);
        ok &= snprintf(F.home, sizeof F.home, "%s", home ? home : "/") < (int)sizeof F.home;
        strcpy(F.shell, "/bin/sh");
    }
    struct group *gr = getgrgid(F.gid);
    if (gr != NULL)
        ok &= snprintf(F.group, sizeof F.group, "%s", gr->gr_name) < (int)sizeof F.group;
    else
        snprintf(F.group, sizeof F.group, "gid%u", (unsigned)F.gid);
    return ok;
}

/* --- the plan (sifpy.runtime.plan.plan, default options) ------------------------------- */

static struct fast_mount *add(const char *dest, int kind, int fd)
{
    if (F.n >= FAST_MAX_MOUNTS || strlen(dest) >= PATH_MAX)
        return NULL;
    struct fast_mount *m = &F.m[F.n++];
    memset(m, 0, sizeof *m);
    strcpy(m->dest, dest);
    m->kind = kind;
    m->fd = fd;
    m->harden = 1;
    m->is_dir = 1;
    return m;
}

/* plan.pin; -1 where Python would fail (it then reports it). */
static int pin(const char *path)
{
    return open(path, O_PATH | O_CLOEXEC);
}

static int is_file(const char *path) /* os.path.isfile */
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int host_file(const char *path)
{
    struct fast_mount *m = add(path, K_BIND, pin(path));
    if (m == NULL || m->fd < 0)
        return 0;
    m->readonly = 1;
    m->is_dir = 0;
    return 1;
}

static int make_plan(void)
{
    static const char *const kernel[] = {"/dev", "/proc", "/sys"};
    for (int i = 0; i < 3; i++) {
        struct fast_mount *m = add(kernel[i], K_BIND, pin(kernel[i]));
        if (m == NULL || m->fd < 0)
            return 0;
        m->harden = 0;
    }
    static const char *const system_binds[] = {"/etc/hosts", "/etc/localtime"};
    for (int i = 0; i < 2; i++)
        if (is_file(system_binds[i]) && !host_file(system_binds[i]))
            return 0;
    if (F.home[0] != '\0' && strcmp(F.home, "/") != 0) {
        struct fast_mount *m = add(F.home, K_BIND, pin(F.home));
        if (m == NULL || m->fd < 0)
            return 0;
    }
    static const char *const tmps[] = {"/tmp", "/var/tmp"};
    for (int i = 0; i < 2; i++) {
        struct fast_mount *m = add(tmps[i], K_BIND, pin(tmps[i]));
        if (m == NULL || m->fd < 0)
            return 0;
    }
    if (is_file("/etc/resolv.conf") && !host_file("/etc/resolv.conf"))
        return 0;
    static const char *const files[] = {"passwd", "group"};
    for (int i = 0; i < 2; i++) {
        char dest[32];
        snprintf(dest, sizeof dest, "/etc/%s", files[i]);
        struct fast_mount *m = add(dest, K_FILE, -1);
        if (m == NULL)
            return 0;
        m->file = files[i];
        m->readonly = 1;
        m->is_dir = 0;
        m->nofollow = 1;
    }
    if (is_dir(F.cwd))
        F.cwd_fd = pin(F.cwd);
    return F.cwd_fd >= 0 || !is_dir(F.cwd);
}

/* assemble._under: `path` is `dest` or below it, component-wise. */
static int under(const char *path, const char *dest)
{
    size_t n = strlen(dest);
    while (n > 1 && dest[n - 1] == '/')
        n--;
    if (n == 1 && dest[0] == '/')
        return 1;
    return strncmp(path, dest, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

static int reserved(const char *name, size_t len)
{
    static const char *const names[] = SIFPY_RESERVED;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strlen(names[i]) == len && strncmp(name, names[i], len) == 0)
            return 1;
    return 0;
}

static int expand_add(const char *rel)
{
    for (int i = 0; i < F.nexpand; i++)
        if (strcmp(F.expand[i], rel) == 0)
            return 1;
    if (F.nexpand >= FAST_MAX_EXPAND)
        return 0;
    strcpy(F.expand[F.nexpand++], rel);
    return 1;
}

static int expanded(const char *rel)
{
    for (int i = 0; i < F.nexpand; i++)
        if (strcmp(F.expand[i], rel) == 0)
            return 1;
    return 0;
}

static int openat2_(int dir, const char *path, int flags)
{
    struct {
        uint64_t flags, mode, resolve;
    } how = {(uint64_t)(flags | O_CLOEXEC), 0, RESOLVE_IN_ROOT_ | RESOLVE_NO_MAGICLINKS_};
    return (int)syscall(SYS_openat2, dir, path, &how, sizeof how);
}

/* Where `dest` lands in the image (`image`: its root): 1 if the start stays simple, with
 * m->missing set where the underlay must create it (and its ancestors expanded, as
 * rootpath.expansions), 0 for anything that needs Python's resolver (a symlink on the way,
 * a destination of another type, a mount point below /dev, /proc or /sys). */
static int probe(int image, struct fast_mount *m)
{
    char rel[PATH_MAX] = "";
    const char *p = m->dest;
    int dir = dup(image);
    if (dir < 0)
        return 0;
    while (*p == '/')
        p++;
    size_t first = strcspn(p, "/");
    if (*p == '\0' || reserved(p, first)) {
        close(dir);
        if (*p == '\0')
            return 0;         /* the root itself */
        if (p[first] == '\0')
            return 1;         /* a runtime directory of the underlay, always there */
        if (strncmp(p, "tmp", first) != 0)
            return 0;         /* below /dev, /proc or /sys */
        m->missing = 1;       /* below /tmp: made in the underlay's own /tmp */
        return 1;
    }
    while (*p != '\0') {
        size_t len = strcspn(p, "/");
        char comp[NAME_MAX + 1];
        if (len > NAME_MAX || (len == 1 && p[0] == '.') || (len == 2 && !strncmp(p, "..", 2))) {
            close(dir);
            return 0;
        }
        memcpy(comp, p, len);
        comp[len] = '\0';
        p += len;
        while (*p == '/')
            p++;
        int last = *p == '\0';
        struct stat st;
        if (fstatat(dir, comp, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            close(dir);
            if (errno != ENOENT)
                return 0;
            m->missing = 1; /* every ancestor that exists becomes a real directory */
            char walk[PATH_MAX];
            strcpy(walk, rel);
            for (char *slash = walk; (slash = strchr(slash + 1, '/')) != NULL;) {
                *slash = '\0';
                if (!expand_add(walk))
                    return 0;
                *slash = '/';
            }
            return rel[0] == '\0' || expand_add(rel);
        }
        size_t used = strlen(rel);
        if (used + len + 2 >= sizeof rel) {
            close(dir);
            return 0;
        }
        snprintf(rel + used, sizeof rel - used, "/%s", comp);
        if (S_ISLNK(st.st_mode)) {
            close(dir);
            if (!last || m->nofollow)
                return 0;
            /* A final symlink (Debian's /etc/localtime): followed inside the root, as
             * rootpath.resolve does; simple only if it lands on what the mount needs,
             * outside the runtime's own directories. */
            int fd = openat2_(image, m->dest, O_PATH);
            if (fd < 0)
                return 0;
            char link[64], target[PATH_MAX];
            snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
            ssize_t n = readlink(link, target, sizeof target - 1);
            int good = fstat(fd, &st) == 0 && n > 0 && (S_ISDIR(st.st_mode) != 0) == m->is_dir;
            close(fd);
            if (!good)
                return 0;
            target[n] = '\0';
            size_t top = strcspn(target + 1, "/");
            return target[0] == '/' && !reserved(target + 1, top);
        }
        if (last) {
            close(dir);
            return (S_ISDIR(st.st_mode) != 0) == m->is_dir;
        }
        if (!S_ISDIR(st.st_mode)) {
            close(dir);
            return 0;
        }
        int next = openat(dir, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        close(dir);
        if (next < 0)
            return 0;
        dir = next;
    }
    close(dir);
    return 0;
}

/* assemble: the working directory's bind (where the image lacks it and nothing shows it),
 * then every mount point probed; 0: Python. */
static int probe_all(int image)
{
    int shown = 0;
    for (int i = 0; i < F.n; i++)
        if (F.m[i].kind == K_BIND && under(F.cwd, F.m[i].dest))
            shown = 1;
    if (F.cwd_fd >= 0 && strcmp(F.cwd, "/") != 0 && !shown) {
        struct fast_mount cwd;
        memset(&cwd, 0, sizeof cwd);
        strcpy(cwd.dest, F.cwd);
        cwd.is_dir = 1;
        int nexpand = F.nexpand;
        if (!probe(image, &cwd))
            return 0;
        F.nexpand = nexpand; /* probed only: the bind's own probe below expands */
        if (cwd.missing) {
            struct fast_mount *m = add(F.cwd, K_BIND, F.cwd_fd);
            if (m == NULL)
                return 0;
            F.cwd_fd = -1; /* the plan's now */
        }
    }
    for (int i = 0; i < F.n; i++) {
        for (int j = 0; j < i; j++) /* no mount point inside an earlier mount */
            if (under(F.m[i].dest, F.m[j].dest) && strcmp(F.m[i].dest, F.m[j].dest) != 0)
                return 0;
        if (!probe(image, &F.m[i]))
            return 0;
    }
    return 1;
}

/* --- the container's first process (assemble, first_process, exec_command) ------------ */

static _Noreturn void die(const char *what)
{
    fprintf(stderr, "error: can't start container: %s: %s\n", what, strerror(errno));
    _exit(EXIT_LAUNCH_FAILED);
}

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
        die(what);
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
        die(src);
    char **names = NULL;
    size_t n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        names = realloc(names, (n + 1) * sizeof *names);
        if (names == NULL || (names[n++] = strdup(e->d_name)) == NULL)
            die("underlay");
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
        snprintf(src, sizeof src, "%s%s/%s", image, rel, name);
        snprintf(dst, sizeof dst, "%s%s/%s", root, rel, name);
        snprintf(path, sizeof path, "%s/%s", rel, name);
        struct stat st;
        if (lstat(src, &st) != 0)
            die(src);
        if (S_ISLNK(st.st_mode)) {
            char target[PATH_MAX];
            ssize_t len = readlink(src, target, sizeof target - 1);
            if (len < 0)
                die(src);
            target[len] = '\0';
            if (symlink(target, dst) != 0)
                die(dst);
        } else if (S_ISDIR(st.st_mode)) {
            if (mkdir(dst, 0777) != 0 || chmod(dst, st.st_mode & 07777) != 0)
                die(dst);
            if (expanded(path))
                fill(image, root, path);
            else
                do_mount(src, dst, NULL, MS_BIND | MS_REC, NULL, rel[0] ? rel : "/");
        } else {
            int fd = open(dst, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
            if (fd < 0)
                die(dst);
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
        die("memory");
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
        die(path);
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
        die(path);
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
        while (*p == '/')
            p++;
        size_t len = strcspn(p, "/");
        char comp[NAME_MAX + 1];
        memcpy(comp, p, len);
        comp[len] = '\0';
        p += len;
        while (*p == '/')
            p++;
        int last = *p == '\0';
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
        die(m->dest);
    snprintf(target, sizeof target, "/proc/self/fd/%d", tfd);
    if (m->kind == K_BIND)
        snprintf(src, sizeof src, "/proc/self/fd/%d", m->fd);
    else
        snprintf(src, sizeof src, "%s/%s", SIFPY_FILES, m->file);
    do_mount(src, target, NULL, MS_BIND | MS_REC, NULL, m->dest);
    if (m->harden) { /* through a lookup that crosses into the new mount */
        int nfd = openat2_(root, m->dest, O_PATH | (m->nofollow ? O_NOFOLLOW : 0));
        if (nfd < 0)
            die(m->dest);
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
        die("capabilities");
    caps[0].inheritable = caps[1].inheritable = 0;
    if (capset(&hdr, caps) != 0)
        die("capabilities");
}

/* env.process_env for the default options: HOME, PATH, the runtime's variables, each host
 * variable env.host_env forwards as __SIFPY_H_<name>, then the action script's lists. */
static char **container_env(void)
{
    extern char **environ;
    static const char *const never[] = SIFPY_NEVER_FORWARDED;
    static const char *const drop[] = SIFPY_NOT_FORWARDED_PREFIXES;
    size_t n = 0, names_len = 1;
    for (char **e = environ; *e; e++)
        n++, names_len += strlen(*e) + 1;
    char **env = calloc(n + 32, sizeof *env);
    char *names = calloc(1, names_len + 32);
    if (env == NULL || names == NULL)
        die("memory");
    size_t k = 0;
    char *s;
#define PUT(...) (asprintf(&s, __VA_ARGS__) < 0 ? die("memory") : (void)(env[k++] = s))
    const char *base = strrchr(F.image, '/');
    PUT("HOME=%s", F.home);
    PUT("PATH=%s", SIFPY_DEFAULT_PATH);
    static const char *const prefixes[] = {"APPTAINER_", "SINGULARITY_"};
    for (int i = 0; i < 2; i++) {
        PUT("%sCONTAINER=%s", prefixes[i], F.image);
        PUT("%sNAME=%s", prefixes[i], base ? base + 1 : F.image);
        PUT("%sCOMMAND=%s", prefixes[i], F.action);
        PUT("%sENVIRONMENT=%s", prefixes[i], SIFPY_ENVIRONMENT_SCRIPT);
        PUT("%sBIND=", prefixes[i]);
    }
    for (char **e = environ; *e; e++) {
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
        for (char **prev = environ; ok && prev < e; prev++)
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

static _Noreturn void first_process(pid_t parent)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(EXIT_LAUNCH_FAILED);
    const char *root = SIFPY_ROOT;
    if (mkdir(root, 0777) != 0)
        die(root);
    do_mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", "root");
    fill(SIFPY_IMAGE, root, "");
    static const char *const names[] = SIFPY_RESERVED;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", root, names[i]);
        if (mkdir(path, 0755) != 0)
            die(path);
    }
    write_files();
    int root_fd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0)
        die(root);
    for (int i = 0; i < F.n; i++)
        apply(root_fd, &F.m[i]);
    close(root_fd);
    remount(root, 1, "container root");
    if (unshare(CLONE_NEWNS) != 0)
        die("mount namespace");
    if (chdir(root) != 0 || syscall(SYS_pivot_root, ".", ".") != 0 || umount2(".", MNT_DETACH) != 0 ||
        chdir("/") != 0)
        die("pivot_root");
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
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
        die("no_new_privs");
    static const unsigned char filter[] = SIFPY_PAYLOAD_FILTER;
    struct {
        unsigned short len;
        const void *filter;
    } prog = {sizeof filter / 8, filter};
    char **env = container_env();
    clean_state();
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER_, &prog, 0, 0) != 0)
        die("seccomp filter");
    char **argv = calloc((size_t)F.nargs + 5, sizeof *argv);
    if (argv == NULL)
        die("memory");
    argv[0] = (char *)SIFPY_ACTION_SHELL;
    argv[1] = (char *)"-c";
    argv[2] = (char *)SIFPY_ACTION_SCRIPT;
    argv[3] = (char *)F.action;
    for (int i = 0; i < F.nargs; i++)
        argv[4 + i] = F.args[i];
    execve(argv[0], argv, env);
    int code = errno == ENOENT || errno == ENOTDIR ? 127 : 126;
    fprintf(stderr, "error: can't execute: %s: %s\n", argv[0], strerror(errno));
    _exit(code);
}

/* --- the monitor (supervise, with the --runscript-timeout deadline) -------------------- */

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
    kill(server, SIGKILL); /* mount.stop_server */
    while (waitpid(server, NULL, 0) < 0 && errno == EINTR)
        ;
    if (expired) {
        report_expired(killed);
        _exit(EXIT_LAUNCH_FAILED);
    }
    _exit(WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status));
}

/* After serve(): start the container here, or return (0) to let Python do it. `image` is
 * the image's detached mount (the image's root), `server` its FUSE server. */
static int fast_start(int image, pid_t server)
{
    if (!make_plan() || !probe_all(image)) {
        for (int i = 0; i < F.n; i++)
            if (F.m[i].fd >= 0)
                close(F.m[i].fd);
        if (F.cwd_fd >= 0)
            close(F.cwd_fd);
        return 0;
    }
    /* /etc/passwd and /etc/group: plain files of ASCII lines (Python decodes them). */
    static const char *const dbs[] = {"etc/passwd", "etc/group"};
    for (int i = 0; i < 2; i++) {
        int fd = openat(image, dbs[i], O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            continue;
        unsigned char buf[1 << 16];
        ssize_t n;
        int plain = 1;
        while (plain && (n = read(fd, buf, sizeof buf)) > 0)
            for (ssize_t j = 0; j < n; j++)
                plain &= buf[j] < 0x80 && (buf[j] >= 0x20 || buf[j] == '\n' || buf[j] == '\t');
        close(fd);
        if (!plain || n < 0)
            return 0; /* the plan's fds are closed by Python's exec (close-on-exec) */
    }
    /* The session (session.set_up): from here on, no way back to Python. */
    do_mount("tmpfs", SIFPY_SESSION, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700", "session");
    do_mount(NULL, SIFPY_SESSION, NULL, MS_UNBINDABLE, NULL, "session (make unbindable)");
    if (mkdir(SIFPY_IMAGE, 0777) != 0 || mkdir(SIFPY_FILES, 0777) != 0)
        die(SIFPY_SESSION);
    do_mount("tmpfs", SIFPY_FILES, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", "files");
    if (syscall(SYS_move_mount, image, "", AT_FDCWD, SIFPY_IMAGE, MOVE_MOUNT_F_EMPTY_PATH) != 0)
        die("squashfuse mount");
    close(image);
    sigset_t waited;
    waited_signals(&waited);
    sigprocmask(SIG_BLOCK, &waited, NULL);
    pid_t me = getpid();
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0)
        first_process(me);
    /* Only the container holds the caller's fds now (a PMI socket: its peer must see it
     * closed when the rank ends), and the plan's. */
    closefrom(3);
    char **argv = calloc((size_t)F.nargs + 5, sizeof *argv);
    if (argv == NULL)
        die("memory");
    argv[0] = (char *)SIFPY_ACTION_SHELL;
    argv[1] = (char *)"-c";
    argv[2] = (char *)SIFPY_ACTION_SCRIPT;
    argv[3] = (char *)F.action;
    for (int i = 0; i < F.nargs; i++)
        argv[4 + i] = F.args[i];
    monitor(child, server, argv);
}
