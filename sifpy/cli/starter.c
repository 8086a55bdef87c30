/* sifpy's starter: the `sifpy` program, compiled by `python -m sifpy.cli.launcher DEST`.
 *
 * It runs sifpy's Python CLI (the interpreter with -I -S and the package paths baked in at
 * build time, see launcher.py), and for `exec`, `run`, `shell` and `test` of a SIF image it
 * first does the one thing that can't wait for Python's start-up: it enters the user and
 * mount namespaces and starts serving the image with squashfuse (a detached FUSE mount)
 * and reads the programs the container starts with ahead, so that squashfuse decompresses them while Python starts and plans the
 * container (~10 ms of interpreter start, imports and planning, about the time squashfuse
 * needs for a 2 MB busybox on one core).
 *
 * Everything else stays in Python: the image is validated, verified and adopted there
 * (sifpy.runtime.start.adopt, through SIFPY_SERVED), and any case this file does not
 * recognize (an option it doesn't know, a sandbox directory, root, a site policy file, no
 * FUSE or squashfuse) simply starts Python, which then does all of it itself, in order
 * (this file is the only code that serves an image early). No privilege
 * is involved: this is the caller's own process, as the Python code is.
 *
 * Failures before unshare(2) fall back silently; after it, the process is in new
 * namespaces, so a failure there ends the start with sifpy's status 125 and a message.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include <linux/capability.h>

int capget(cap_user_header_t header, cap_user_data_t data); /* in glibc, not in its headers */
int capset(cap_user_header_t header, const cap_user_data_t data);

/* sifpy exec's options (generated from sifpy.cli.exec_options.OPTIONS into starter_config.h). */
enum { OPT_PLAIN, OPT_FAKEROOT, OPT_DRIVER, OPT_NO_EARLY, OPT_SHARENS };
struct option_kind {
    const char *name;
    int takes_value;
    int kind;
};

#include "starter_config.h"

#ifdef SIFPY_SERVE_INLINE
#include "sqfs_serve.h" /* sifpy/runtime/serve: the FUSE server, linked in (launcher.py) */
#endif

#ifndef SYS_fsopen
#define SYS_fsopen 430
#define SYS_fsconfig 431
#define SYS_fsmount 432
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#define FSOPEN_CLOEXEC_ 0x1
#define FSMOUNT_CLOEXEC_ 0x1
#define FSCONFIG_SET_FLAG_ 0
#define FSCONFIG_SET_STRING_ 1
#define FSCONFIG_CMD_CREATE_ 6
#define MOUNT_ATTR_RDONLY_ 0x1
#define MOUNT_ATTR_NOSUID_ 0x2
#define MOUNT_ATTR_NODEV_ 0x4

#define EXIT_LAUNCH_FAILED 125

/* bench/exec_breakdown builds a starter with SIFPY_PHASES 1: each phase's end is then
 * written to stderr as "sifpy-phase NAME NANOSECONDS" (CLOCK_MONOTONIC). */
#if SIFPY_PHASES
#include <time.h>
static void phase(const char *name)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    fprintf(stderr, "sifpy-phase %s %lld\n", name, (long long)t.tv_sec * 1000000000LL + t.tv_nsec);
}
#define PHASE(name) phase(name)
#else
#define PHASE(name) ((void)0)
#endif

struct start {
    const char *image;
    const char *command; /* exec's command, read ahead after the action shell */
    int fakeroot;
    int image_at; /* the image's index in argv */
    int sharens;  /* --sharens */
    int action_at;      /* exec, run, shell or test: its index in argv */
    int options;        /* how many of the action's options were given */
    int global_options; /* how many of sifpy's own (-q, -v, --debug) */
    int fast;           /* the starter may start the container itself (starter_fast.c) */
};

/* Exec Python with the CLI; never returns. */
static void boot(int argc, char **argv)
{
    char **args = calloc((size_t)argc + 4, sizeof *args);
    if (args == NULL) {
        fputs("sifpy: error: out of memory\n", stderr);
        exit(EXIT_LAUNCH_FAILED);
    }
    args[0] = (char *)SIFPY_PYTHON;
    args[1] = (char *)"-IS";
    args[2] = (char *)"-c";
    args[3] = (char *)SIFPY_BOOT;
    for (int i = 1; i < argc; i++)
        args[3 + i] = argv[i];
    execv(SIFPY_PYTHON, args);
    fprintf(stderr, "sifpy: error: can't execute %s: %s\n", SIFPY_PYTHON, strerror(errno));
    exit(EXIT_LAUNCH_FAILED);
}

static _Noreturn void fail(const char *what)
{
    fprintf(stderr, "error: can't start container: %s: %s\n", what, strerror(errno));
    exit(EXIT_LAUNCH_FAILED);
}

static const struct option_kind *find_option(const char *name, size_t len)
{
    for (const struct option_kind *o = SIFPY_OPTIONS; o->name != NULL; o++)
        if (strlen(o->name) == len && strncmp(o->name, name, len) == 0)
            return o;
    return NULL;
}

/* Parse argv as sifpy's CLI would, for the cases served early; 0 for any other. */
static int parse(int argc, char **argv, struct start *s)
{
    int i = 1;
    memset(s, 0, sizeof *s);
    for (; i < argc && argv[i][0] == '-'; i++, s->global_options++) /* sifpy's own options */
        if (strcmp(argv[i], "-q") && strcmp(argv[i], "--quiet") && strcmp(argv[i], "-v") &&
            strcmp(argv[i], "--verbose") && strcmp(argv[i], "--debug"))
            return 0;
    if (i >= argc)
        return 0;
    s->action_at = i;
    const char *action = argv[i++];
    int exec = strcmp(action, "exec") == 0;
    if (!exec && strcmp(action, "run") && strcmp(action, "shell") && strcmp(action, "test"))
        return 0;
    while (i < argc && argv[i][0] == '-' && argv[i][1] != '\0') {
        const char *tok = argv[i], *value = NULL;
        s->options++;
        if (strcmp(tok, "--") == 0) {
            i++;
            break;
        }
        size_t len = strlen(tok);
        if (tok[1] == '-') {
            const char *eq = strchr(tok, '=');
            if (eq != NULL) {
                len = (size_t)(eq - tok);
                value = eq + 1;
            }
        } else if (len != 2) {
            return 0; /* -Bvalue or combined short flags: left to Python */
        }
        const struct option_kind *o = find_option(tok, len);
        if (o == NULL || o->kind == OPT_NO_EARLY)
            return 0;
        if (o->takes_value) {
            if (value == NULL) {
                if (i + 1 >= argc)
                    return 0;
                value = argv[++i];
            }
            if (o->kind == OPT_DRIVER && strcmp(value, "auto") && strcmp(value, "squashfuse"))
                return 0;
        } else if (value != NULL) {
            return 0;
        }
        if (o->kind == OPT_FAKEROOT)
            s->fakeroot = 1;
        if (o->kind == OPT_SHARENS)
            s->sharens = 1;
        i++;
    }
    if (argc - i < (exec ? 2 : 1))
        return 0;
    s->image = argv[i];
    s->image_at = i;
    s->command = exec ? argv[i + 1] : NULL;
    return 1;
}

/* The helper as sifpy's mount.find_program finds it: the system directories, then PATH. */
static int find_program(const char *name, char *out)
{
    const char *path = getenv("PATH");
    char dirs[8192];
    snprintf(dirs, sizeof dirs, "%s:%s", SIFPY_SYSTEM_DIRS, path ? path : "");
    for (char *save = NULL, *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        struct stat st;
        if (d[0] != '/')
            continue;
        if (snprintf(out, PATH_MAX, "%s/%s", d, name) >= PATH_MAX)
            continue;
        if (access(out, X_OK) == 0 && stat(out, &st) == 0 && !S_ISDIR(st.st_mode))
            return 1;
    }
    return 0;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int64_t le64(const unsigned char *p)
{
    return (int64_t)((uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32);
}

struct span {
    int64_t start, end;
};

static int by_id(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int by_start(const void *a, const void *b)
{
    const struct span *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* The primary system squashfs partition of a SIF file (the layout comes from
 * sifpy.sif.format, through starter_config.h), in a file sifpy.sif.image would read: the
 * same checks of the header and of every used descriptor (version, counts, the table and
 * the data inside the file, ids, objects that overlap the header, the table or each other;
 * offset + size can overflow: checked, never computed unchecked), then exactly one primary
 * partition, of squashfs. Anything this refuses goes to Python, which reports it (the
 * image's bytes are the attacker's); the starter's own start runs only what passes here. */
static int primary_partition(int fd, off_t file_size, int64_t *offset, int64_t *size)
{
    unsigned char hdr[SIF_HEADER_SIZE];
    if (pread(fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr)
        return 0;
    if (memcmp(hdr + SIF_MAGIC_AT, SIF_MAGIC, sizeof SIF_MAGIC - 1) != 0 ||
        memcmp(hdr + SIF_VERSION_AT, SIF_VERSION, sizeof SIF_VERSION) != 0)
        return 0;
    int64_t total = le64(hdr + SIF_DESCRIPTORS_TOTAL_AT), free_ = le64(hdr + SIF_DESCRIPTORS_FREE_AT);
    int64_t desc_off = le64(hdr + SIF_DESCRIPTORS_OFFSET_AT);
    int64_t desc_size = le64(hdr + SIF_DESCRIPTORS_SIZE_AT);
    int64_t data_off = le64(hdr + SIF_DATA_OFFSET_AT), data_size = le64(hdr + SIF_DATA_SIZE_AT);
    int64_t data_end;
    if (total <= 0 || total > SIF_MAX_DESCRIPTORS || free_ < 0 || free_ > total ||
        desc_size != total * SIF_DESCRIPTOR_SIZE || desc_off < SIF_HEADER_SIZE ||
        desc_off > file_size || desc_size > file_size - desc_off || data_off < 0 ||
        data_size < 0 || __builtin_add_overflow(data_off, data_size, &data_end) ||
        data_end > file_size)
        return 0;
    size_t len = (size_t)desc_size;
    int64_t desc_end = desc_off + desc_size; /* both bounded above: no overflow */
    unsigned char *desc = malloc(len);
    struct span *spans = calloc((size_t)total, sizeof *spans);
    uint32_t *ids = calloc((size_t)total, sizeof *ids);
    int ok = desc != NULL && spans != NULL && ids != NULL &&
             pread(fd, desc, len, desc_off) == (ssize_t)len;
    int found = 0, squashfs = 0, nspans = 0, nids = 0;
    for (int64_t i = 0; ok && i < total; i++) {
        const unsigned char *d = desc + i * SIF_DESCRIPTOR_SIZE;
        const unsigned char *extra = d + SIF_EXTRA_AT;
        if (d[SIF_USED_AT] == 0)
            continue;
        uint32_t id = le32(d + SIF_ID_AT);
        int64_t off = le64(d + SIF_OFFSET_AT), sz = le64(d + SIF_SIZE_AT), end = 0;
        ok = d[SIF_USED_AT] == 1 && id != 0 && off >= 0 && sz >= 0 &&
             !__builtin_add_overflow(off, sz, &end) && end <= file_size;
        ids[nids++] = id; /* unique: checked sorted, below (65,536 of them at most) */
        if (ok && sz > 0) { /* data may not cover the header or the table */
            ok = off >= SIF_HEADER_SIZE && !(off < desc_end && desc_off < end);
            spans[nspans++] = (struct span){off, end};
        }
        if (!ok || le32(d) != SIF_PARTITION || le32(extra + SIF_PARTTYPE_AT) != SIF_PRIMSYS)
            continue;
        found++;
        squashfs = le32(extra + SIF_FSTYPE_AT) == SIF_SQUASH;
        *offset = off;
        *size = sz;
    }
    if (ok) {
        qsort(ids, (size_t)nids, sizeof *ids, by_id);
        for (int i = 1; ok && i < nids; i++)
            ok = ids[i] != ids[i - 1];
        qsort(spans, (size_t)nspans, sizeof *spans, by_start);
        for (int i = 1; ok && i < nspans; i++)
            ok = spans[i].start >= spans[i - 1].end;
    }
    free(desc);
    free(spans);
    free(ids);
    return ok && found == 1 && squashfs;
}

/* In the FUSE server's child, before it execs squashfuse: no capability at all, and none
 * to gain at exec (even as uid 0 of the namespace, with --fakeroot). squashfuse parses the
 * image, which is untrusted input; it needs no privilege to serve the fds it is given. The
 * starter raised the ambient set for Python's sake (see serve): that must not reach it. */
static void drop_all_caps(void)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct none[2];
    memset(none, 0, sizeof none);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0)
        _exit(1);
    for (unsigned long cap = 0; prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0; cap++)
        ; /* until EINVAL: past the kernel's last capability */
    if (errno != EINVAL || capset(&hdr, none) != 0)
        _exit(1);
}

static void write_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, data, strlen(data)) != (ssize_t)strlen(data))
        fail(path);
    close(fd);
}

static void fsconfig_string(int fs, const char *key, const char *value)
{
    if (syscall(SYS_fsconfig, fs, FSCONFIG_SET_STRING_, key, value, 0) != 0)
        fail("fsconfig");
}

/* In a forked child: PDEATHSIG (never outlive sifpy), checked against a parent already
 * gone, and the fds given moved to 3, 4, ...; 0 and 1 on /dev/null. */
static void become_helper(pid_t parent, const int *fds, int n)
{
    sigset_t none;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(1);
    setpgid(0, 0);
    if (chdir("/") != 0)
        _exit(1);
    int high[8];
    for (int i = 0; i < n; i++) {
        high[i] = fcntl(fds[i], F_DUPFD, 3 + n);
        if (high[i] < 0)
            _exit(1);
    }
    for (int i = 0; i < n; i++)
        if (dup2(high[i], 3 + i) < 0)
            _exit(1);
    int null = open("/dev/null", O_RDWR);
    if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0)
        _exit(1);
    closefrom(3 + n);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* The FUSE server: "" for sifpy's own where it is linked in (SIFPY_SERVE_INLINE), else
 * squashfuse_ll's path; 0 if there is none (Python starts it, or says why). Sifpy's own
 * serves with SIFPY_FUSE_SERVER=sifpy (as in Python: sifpy.runtime.start.server_program;
 * not linked in: 0) and, unless SIFPY_FUSE_SERVER names squashfuse_ll, every start the
 * starter means to make itself (`own`): as ch-run serves its images, from a forked child
 * with no exec and no second dynamic loading (bench/exec, bench/mpi). */
static int server_program(char *program, int own)
{
    const char *want = getenv("SIFPY_FUSE_SERVER");
    int sifpy = want != NULL && strcmp(want, "sifpy") == 0;
    if (sifpy || (own && (want == NULL || *want == '\0'))) {
#ifdef SIFPY_SERVE_INLINE
        program[0] = '\0';
        return 1;
#else
        if (sifpy)
            return 0;
#endif
    }
    return find_program(SIFPY_SQUASHFUSE, program);
}

/* In the server's child, instead of exec'ing squashfuse_ll (as ch-run serves its images:
 * no exec, no dynamic loading, no second start-up): the image as fd 3, the connection as 4.
 * Named for ps and the tests; never returns. */
static _Noreturn void serve_inline(int64_t offset)
{
#ifdef SIFPY_SERVE_INLINE
    prctl(PR_SET_NAME, "sifpy-sqfs-serve", 0, 0, 0);
    _exit(sqfs_serve(3, (uint64_t)offset, 4, SIFPY_SERVER_THREADS));
#else
    (void)offset;
    _exit(127);
#endif
}

/* Read `name` (a path, or a command looked up in the default PATH) in the image, whose root
 * is `root`; symlinks resolve inside the image (RESOLVE_IN_ROOT). */
static void read_ahead(int root, const char *name, dev_t *seen_dev, ino_t *seen_ino)
{
    static char buf[1 << 17];
    char path[PATH_MAX], dirs[] = SIFPY_DEFAULT_PATH;
    struct {
        uint64_t flags, mode, resolve;
    } how = {O_RDONLY | O_NONBLOCK | O_CLOEXEC, 0, 0x10 | 0x02}; /* IN_ROOT, NO_MAGICLINKS */
    char *save = NULL, *d = strchr(name, '/') ? NULL : strtok_r(dirs, ":", &save);
    do {
        if (d != NULL)
            snprintf(path, sizeof path, "%s/%s", d, name);
        else
            snprintf(path, sizeof path, "%s", name);
        int fd = (int)syscall(SYS_openat2, root, path, &how, sizeof how);
        if (fd < 0)
            continue;
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
            !(st.st_dev == *seen_dev && st.st_ino == *seen_ino)) {
            *seen_dev = st.st_dev;
            *seen_ino = st.st_ino;
            for (size_t left = 16 << 20; left > 0;) {
                ssize_t n = read(fd, buf, sizeof buf);
                if (n <= 0)
                    break;
                left = (size_t)n < left ? left - (size_t)n : 0;
            }
        }
        close(fd);
        return;
    } while (d != NULL && (d = strtok_r(NULL, ":", &save)) != NULL);
}

#include "starter_fast.c"

/* What serve_image leaves: the image's fd, its detached mount, its FUSE server. */
struct served {
    int image, root;
    pid_t server;
    int64_t offset;
    uid_t uid; /* the caller's, outside the namespace */
    gid_t gid;
};

/* Enter the user and mount namespaces and serve the image from a detached FUSE mount, with
 * its programs read ahead; 0 (nothing done) where this start is not served early. */
static int serve_image(const struct start *s, struct served *out)
{
    char program[PATH_MAX], text[256];
    struct stat st;
    int64_t offset = 0, size = 0;
    uid_t uid = getuid();
    gid_t gid = getgid();

    /* Root's own paths; a policy may require verification first (a system file that can't
     * be looked up at all, EACCES included, counts as present: Python decides). */
    if (uid == 0 || getenv("SIFPY_CONFIG") != NULL || access(SIFPY_SYSTEM_CONFIG, F_OK) == 0 ||
        errno != ENOENT)
        return 0;
    if (access("/dev/fuse", R_OK | W_OK) != 0 || !server_program(program, s->fast))
        return 0;
    int probe = (int)syscall(SYS_fsopen, "fuse", FSOPEN_CLOEXEC_);
    if (probe >= 0)
        close(probe);
    else if (errno == ENOSYS)
        return 0;
    /* O_NONBLOCK: a FIFO (or a device) given as the image must not block the open; it is
     * no regular file, so Python reports it. */
    int image = open(s->image, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (image < 0)
        return 0;
    if (fstat(image, &st) != 0 || !S_ISREG(st.st_mode) ||
        fcntl(image, F_SETFL, 0) != 0 || !primary_partition(image, st.st_size, &offset, &size) ||
        unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) {
        close(image);
        return 0;
    }
    /* In the new namespaces: as sifpy.runtime.start.enter. */
    PHASE("checked");
    write_file("/proc/self/setgroups", "deny");
    snprintf(text, sizeof text, "%u %u 1\n", s->fakeroot ? 0U : (unsigned)uid, (unsigned)uid);
    write_file("/proc/self/uid_map", text);
    snprintf(text, sizeof text, "%u %u 1\n", s->fakeroot ? 0U : (unsigned)gid, (unsigned)gid);
    write_file("/proc/self/gid_map", text);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
        fail("no_new_privs");
    /* Our capabilities in the new namespace would end at execve (not uid 0 there): carry
     * them across in the ambient set; Python clears it and the inheritable set at once
     * (sifpy.runtime.ns.drop_inherited_caps). */
    struct __user_cap_header_struct caphdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[2];
    if (capget(&caphdr, caps) != 0)
        fail("capabilities");
    caps[0].inheritable = caps[0].permitted;
    caps[1].inheritable = caps[1].permitted;
    if (capset(&caphdr, caps) != 0)
        fail("capabilities");
    for (unsigned cap = 0; cap < 64; cap++)
        if (caps[cap / 32].permitted & (1U << (cap % 32)))
            if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0)
                fail("ambient capabilities");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        fail("/ (make private)");
    /* The detached FUSE mount (attributes and options as sifpy.runtime.mount.fuse_mount). */
    int fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    int fs = (int)syscall(SYS_fsopen, "fuse", FSOPEN_CLOEXEC_);
    if (fuse < 0 || fs < 0)
        fail("/dev/fuse");
    if (syscall(SYS_fsconfig, fs, FSCONFIG_SET_FLAG_, "ro", NULL, 0) != 0)
        fail("fsconfig");
    fsconfig_string(fs, "source", "squashfuse");
    snprintf(text, sizeof text, "%d", fuse);
    fsconfig_string(fs, "fd", text);
    fsconfig_string(fs, "rootmode", "40000");
    snprintf(text, sizeof text, "%u", (unsigned)getuid());
    fsconfig_string(fs, "user_id", text);
    snprintf(text, sizeof text, "%u", (unsigned)getgid());
    fsconfig_string(fs, "group_id", text);
    fsconfig_string(fs, "subtype", "squashfuse");
    if (syscall(SYS_fsconfig, fs, FSCONFIG_CMD_CREATE_, NULL, NULL, 0) != 0)
        fail("squashfuse mount");
    int attrs = MOUNT_ATTR_RDONLY_ | MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_;
    int root = (int)syscall(SYS_fsmount, fs, FSMOUNT_CLOEXEC_, attrs);
    if (root < 0)
        fail("squashfuse mount");
    close(fs);
    PHASE("namespaces");
    pid_t me = getpid();
    pid_t server = fork();
    if (server < 0)
        fail("fork");
    if (server == 0) {
        int fds[2] = {image, fuse};
        char opt[64];
        become_helper(me, fds, 2);
        drop_all_caps();
        if (program[0] == '\0')
            serve_inline(offset);
        snprintf(opt, sizeof opt, "offset=%lld", (long long)offset);
        char *env[] = {"PATH=" SIFPY_SYSTEM_DIRS, "LC_ALL=C", NULL};
        char *args[] = {program, "-f", "-o", opt, "/proc/self/fd/3", "/dev/fd/4", NULL, NULL};
        if (SIFPY_SINGLE_THREAD) { /* as mount.squashfuse_argv: -s before the two paths */
            args[4] = "-s";
            args[5] = "/proc/self/fd/3";
            args[6] = "/dev/fd/4";
        }
        execve(program, args, env);
        _exit(127);
    }
    close(fuse);
    pid_t reader = fork(); /* best effort: no reader, no read-ahead */
    if (reader == 0) {
        dev_t dev = 0;
        ino_t ino = 0;
        become_helper(me, &root, 1);
        read_ahead(3, SIFPY_ACTION_SHELL, &dev, &ino);
        if (s->command != NULL)
            read_ahead(3, s->command, &dev, &ino);
        _exit(0);
    }
    PHASE("forked");
    out->image = image;
    out->root = root;
    out->server = server;
    out->offset = offset;
    out->uid = uid;
    out->gid = gid;
    return 1;
}

/* Serve the image early (the only place that does) and start the container (the starter's
 * own start) or hand it to Python; 0 if this start is not served early. */
static int serve(const struct start *s)
{
    struct served v;
    char text[256];
    if (!serve_image(s, &v))
        return 0;
    int image = v.image, root = v.root;
    if (s->fast)
        fast_start(root, v.server); /* returns only where Python is to start the container */
    /* Hand the image, the mount and the server to Python (sifpy.runtime.start.adopt). Every
     * other fd of ours is close-on-exec or closed; these two are made close-on-exec again
     * by adopt(), before Python takes the fds still inheritable as the caller's, which the
     * command inherits (sifpy.runtime.start.passed_fds: an MPI launcher's PMI_FD). */
    if (fcntl(image, F_SETFD, 0) != 0 || fcntl(root, F_SETFD, 0) != 0)
        fail("fcntl");
    snprintf(text, sizeof text, "%d,%d,%d,%lld,%d,%u,%u", root, (int)v.server, image,
             (long long)v.offset, s->fakeroot, (unsigned)v.uid, (unsigned)v.gid);
    if (setenv("SIFPY_SERVED", text, 1) != 0)
        fail("setenv");
    return 1;
}

#include "starter_join.c"
#include "starter_holder.c"

/* Whether this start's container is shared (sifpy.runtime.sharens): --sharens, or a rank
 * of an MPI or Slurm job, unless --no-sharens says otherwise. Then the starter never
 * serves: it joins the node's container when its holder is up (join_fast), else Python
 * starts, which decides the rest (options that can't share get a container of their own). */
static int sharens_wanted(int argc, char **argv, int explicit)
{
    static const char *const rank_vars[] = {"SLURM_STEP_ID", "PMIX_RANK", "OMPI_COMM_WORLD_RANK",
                                            "PMI_RANK"};
    int rank = 0;
    for (size_t i = 0; i < sizeof rank_vars / sizeof *rank_vars; i++) {
        const char *v = getenv(rank_vars[i]);
        rank |= v != NULL && *v != '\0';
    }
    if (!rank && !explicit)
        return 0;
    if (!explicit && local_ranks() == 1)
        return 0; /* the node's only rank: nothing to share (sifpy.cli.exec._sharens_step) */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (strcmp(argv[i], "--no-sharens") == 0)
            return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    struct start s;
    /* A closed 0, 1 or 2 would be taken by the next open (the image) and then be missing
     * in the container: /dev/null in its place, as sifpy.cli.exec does. */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
            break;
    PHASE("main");
    if (getenv("SIFPY_SERVED") != NULL)
        unsetenv("SIFPY_SERVED"); /* only ever from this process */
    if (parse(argc, argv, &s)) {
        if (sharens_wanted(argc, argv, s.sharens)) {
            join_fast(&s, argc, argv, s.image_at, s.sharens);
        } else {
            s.fast = fast_wanted(&s, argc, argv);
            serve(&s);
        }
    }
    boot(argc, argv);
    return EXIT_LAUNCH_FAILED;
}
