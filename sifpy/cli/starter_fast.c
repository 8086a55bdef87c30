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
    const char *image_arg; /* the image as given */
    char **args;           /* the action's arguments */
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
static int fast_env_ok(char **envp)
{
    static const char *const prefixes[] = SIFPY_FAST_ENV_PREFIXES;
    static const char *const names[] = SIFPY_FAST_ENV_NAMES;
    for (char **e = envp; *e != NULL; e++) {
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
    extern char **environ;
    if (strcmp(argv[s->action_at], "shell") == 0 || !fast_env_ok(environ))
        return 0;
    if (access(SIFPY_HOOKS_DIR, F_OK) == 0 || errno != ENOENT)
        return 0;
    memset(&F, 0, sizeof F);
    F.action = argv[s->action_at];
    F.image_arg = argv[s->image_at];
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

/* The next component of the path at `*p` into `comp`, `*p` then past it and its slashes;
 * 0 for one that can't be taken as it is (empty, longer than NAME_MAX, "." or ".."). */
static int next_component(const char **p, char comp[NAME_MAX + 1], int *last)
{
    while (**p == '/')
        (*p)++;
    size_t len = strcspn(*p, "/");
    if (len == 0 || len > NAME_MAX || (len == 1 && **p == '.') ||
        (len == 2 && strncmp(*p, "..", 2) == 0))
        return 0;
    memcpy(comp, *p, len);
    comp[len] = '\0';
    *p += len;
    while (**p == '/')
        (*p)++;
    *last = **p == '\0';
    return 1;
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
        char comp[NAME_MAX + 1];
        for (int last = 0; !last;)
            if (!next_component(&p, comp, &last))
                return 0;     /* "..", ".": Python resolves those */
        m->missing = 1;       /* below /tmp: made in the underlay's own /tmp */
        return 1;
    }
    while (*p != '\0') {
        char comp[NAME_MAX + 1];
        int last;
        if (!next_component(&p, comp, &last)) {
            close(dir);
            return 0;
        }
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
        if (used + strlen(comp) + 2 >= sizeof rel) {
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

/* The action script's argv for `action` and its arguments. */
static char **action_argv(const char *action, char **args, int nargs)
{
    char **argv = calloc((size_t)nargs + 5, sizeof *argv);
    if (argv == NULL)
        fail("memory");
    argv[0] = (char *)SIFPY_ACTION_SHELL;
    argv[1] = (char *)"-c";
    argv[2] = (char *)SIFPY_ACTION_SCRIPT;
    argv[3] = (char *)action;
    for (int i = 0; i < nargs; i++)
        argv[4 + i] = args[i];
    return argv;
}

#include "starter_root.c"
#include "starter_monitor.c"

/* The plan made and the image probed (make_plan, probe_all), /etc/passwd and /etc/group
 * checked: plain files of ASCII lines (Python decodes them); 0: Python starts it. */
static int plan_and_probe(int image)
{
    int planned = make_plan();
    PHASE("planned");
    if (!planned || !probe_all(image)) {
        for (int i = 0; i < F.n; i++)
            if (F.m[i].fd >= 0)
                close(F.m[i].fd);
        if (F.cwd_fd >= 0)
            close(F.cwd_fd);
        return 0;
    }
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
    PHASE("probed");
    return 1;
}

/* The session (session.set_up): a tmpfs over /tmp, the image attached in it. */
static void make_session(int image)
{
    do_mount("tmpfs", SIFPY_SESSION, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700", "session");
    do_mount(NULL, SIFPY_SESSION, NULL, MS_UNBINDABLE, NULL, "session (make unbindable)");
    if (mkdir(SIFPY_IMAGE, 0777) != 0 || mkdir(SIFPY_FILES, 0777) != 0)
        fail(SIFPY_SESSION);
    do_mount("tmpfs", SIFPY_FILES, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", "files");
    if (syscall(SYS_move_mount, image, "", AT_FDCWD, SIFPY_IMAGE, MOVE_MOUNT_F_EMPTY_PATH) != 0)
        fail("squashfuse mount");
    close(image);
}

/* After serve_image(): start the container here, or return (0) to let Python do it.
 * `image` is the image's detached mount (the image's root), `server` its FUSE server. */
static int fast_start(int image, pid_t server)
{
    if (!plan_and_probe(image))
        return 0;
    /* From here on, no way back to Python. */
    make_session(image);
    sigset_t waited;
    waited_signals(&waited);
    sigprocmask(SIG_BLOCK, &waited, NULL);
    pid_t me = getpid();
    pid_t child = fork();
    if (child < 0)
        fail("fork");
    if (child == 0)
        first_process(me, -1);
    /* Only the container holds the caller's fds now (a PMI socket: its peer must see it
     * closed when the rank ends), and the plan's. */
    closefrom(3);
    monitor(child, server, action_argv(F.action, F.args, F.nargs));
}
