/* sifpy's own FUSE server for a squashfs image: libsquashfuse's low-level code (the same
 * code as squashfuse_ll; Debian: libsquashfuse-dev) around libfuse3's multi-threaded loop.
 *
 * Two ways in, one code:
 *  - the program `sifpy-sqfs-serve` (built by `make venv`, see sifpy/cli/launcher.py), which
 *    takes squashfuse_ll's command line as sifpy gives it (`-f -o offset=N [-s] IMAGE
 *    /dev/fd/N`), so sifpy.runtime.mount runs either program the same way;
 *  - sqfs_serve(), linked into the starter (sifpy/cli/starter.c), which calls it in a forked
 *    child, without exec, as ch-run serves its images from its own process.
 *
 * What it does differently from squashfuse_ll 0.1.105, each measured with bench/read.py:
 *  - Threads. libsquashfuse's caches are not thread-safe (cache.h: "No thread safety"), so
 *    every call into it holds one mutex; but the expensive part of a read, decompressing
 *    data and fragment blocks, runs outside it, on this file's own small block cache (its
 *    own mutex, reference counts), so several reads (the kernel's asynchronous read-ahead,
 *    several readers) decompress in parallel.
 *  - No FUSE_OPEN, FUSE_OPENDIR or FUSE_RELEASE round trips: open and opendir answer ENOSYS,
 *    after which the kernel opens files by itself with FOPEN_KEEP_CACHE (and directories
 *    with FOPEN_CACHE_DIR too; fs/fuse/file.c fuse_file_open, "Default for no-open"). Keeping
 *    the page cache across opens is correct here because the image cannot change under the
 *    mount: the server reads a file sifpy opened O_RDONLY (verified or not) through that
 *    open file, and squashfs is read-only by format; nothing ever needs invalidating, so
 *    FUSE_CAP_AUTO_INVAL_DATA (an attribute round trip to check for changes) is turned off.
 *  - Symlink targets are cached by the kernel (FUSE_CAP_CACHE_SYMLINKS), and the kernel's
 *    read-ahead is asked for its largest window (max_readahead), in requests up to libfuse's
 *    maximum (max_pages: 1 MiB).
 */
#define _GNU_SOURCE
#include <squashfuse/config.h>
#undef FUSE_USE_VERSION
#define FUSE_USE_VERSION 312 /* fuse_loop_cfg_*; libsquashfuse is built for 32, a subset */
#include <fuse3/fuse_lowlevel.h>

#include <squashfuse/ll.h>

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "sqfs_serve.h"

/* Decompressed blocks, by their position in the image: read-ahead requests rarely start on
 * a block boundary, and a fragment block holds the tails of many small files. */
#define CACHE_SLOTS 64

struct block {
    uint64_t pos; /* 0: empty (no data block starts at the superblock) */
    size_t size;
    int refs;
    char *data;
};

struct server {
    sqfs_ll ll;
    pthread_mutex_t lock; /* every call into libsquashfuse */
    pthread_mutex_t cache_lock;
    struct block cache[CACHE_SLOTS];
    unsigned next_evict;
};

static struct block *cache_get(struct server *sv, uint64_t pos)
{
    struct block *found = NULL;
    pthread_mutex_lock(&sv->cache_lock);
    for (int i = 0; i < CACHE_SLOTS; i++)
        if (sv->cache[i].pos == pos) {
            found = &sv->cache[i];
            found->refs++;
            break;
        }
    pthread_mutex_unlock(&sv->cache_lock);
    return found;
}

static void cache_put(struct server *sv, struct block *b)
{
    pthread_mutex_lock(&sv->cache_lock);
    b->refs--;
    pthread_mutex_unlock(&sv->cache_lock);
}

/* Keep `data` (malloc'd, `size` bytes) as the block at `pos`, held once; NULL when every
 * slot is in use (the caller then uses its own copy). Another thread may have added the
 * same block meanwhile: that one is used and `data` freed. */
static struct block *cache_add(struct server *sv, uint64_t pos, char *data, size_t size)
{
    struct block *b = NULL;
    pthread_mutex_lock(&sv->cache_lock);
    for (int i = 0; i < CACHE_SLOTS; i++)
        if (sv->cache[i].pos == pos) {
            b = &sv->cache[i];
            free(data);
            goto out;
        }
    for (int n = 0; n < CACHE_SLOTS; n++) {
        struct block *c = &sv->cache[sv->next_evict++ % CACHE_SLOTS];
        if (c->refs == 0) {
            free(c->data);
            c->pos = pos;
            c->size = size;
            c->data = data;
            b = c;
            goto out;
        }
    }
out:
    if (b != NULL)
        b->refs++;
    pthread_mutex_unlock(&sv->cache_lock);
    return b;
}

/* Read and decompress the block of `header` at `pos` (relative to the squashfs); a malloc'd
 * buffer of *size bytes, or NULL. Thread-safe: pread on the shared fd, and every
 * decompressor libsquashfuse has is a pure function of its buffers (ZSTD_decompress,
 * uncompress, lzma_stream_buffer_decode, LZ4_decompress_safe, lzo1x_decompress_safe). */
static char *decompress(struct server *sv, uint64_t pos, uint32_t header, size_t *size)
{
    sqfs *fs = &sv->ll.fs;
    bool compressed;
    uint32_t stored;
    sqfs_data_header(header, &compressed, &stored);
    size_t block_size = fs->sb.block_size;
    if (stored > block_size)
        return NULL;
    char *raw = malloc(stored ? stored : 1), *out = raw;
    if (raw == NULL || pread(fs->fd, raw, stored, (off_t)(pos + fs->offset)) != (ssize_t)stored) {
        free(raw);
        return NULL;
    }
    *size = stored;
    if (compressed) {
        out = malloc(block_size);
        *size = block_size;
        if (out == NULL || fs->decompressor(raw, stored, out, size) != SQFS_OK) {
            free(out);
            out = NULL;
        }
        free(raw);
    }
    return out;
}

struct piece {
    uint64_t pos;    /* the block's position; 0 for a hole (zeros) */
    uint32_t header; /* its size and compression bit */
    size_t from;     /* the first byte wanted in the decompressed block */
    size_t len;
};

/* Copy one piece into `out`; 0 or an errno. */
static int copy_piece(struct server *sv, const struct piece *p, char *out)
{
    if (p->pos == 0) {
        memset(out, 0, p->len);
        return 0;
    }
    struct block *b = cache_get(sv, p->pos);
    char *own = NULL;
    size_t size = 0;
    const char *data;
    if (b != NULL) {
        data = b->data;
        size = b->size;
    } else {
        own = decompress(sv, p->pos, p->header, &size);
        if (own == NULL)
            return EIO;
        b = cache_add(sv, p->pos, own, size);
        data = b != NULL ? b->data : own;
        if (b != NULL) {
            size = b->size;
            own = NULL;
        }
    }
    int err = p->from + p->len > size ? EIO : 0;
    if (!err)
        memcpy(out, data + p->from, p->len);
    if (b != NULL)
        cache_put(sv, b);
    free(own);
    return err;
}

/* Plan a read under the library lock: the pieces of blocks that hold [off, off + *len). */
static int plan_read(struct server *sv, fuse_ino_t ino, off_t off, size_t *len,
                     struct piece *pieces, int max, int *n)
{
    sqfs *fs = &sv->ll.fs;
    sqfs_inode inode;
    sqfs_blocklist bl;
    if (sqfs_ll_inode(&sv->ll, &inode, ino) != SQFS_OK)
        return ENOENT;
    if (!S_ISREG(inode.base.mode))
        return EISDIR;
    uint64_t file_size = inode.xtra.reg.file_size, bs = fs->sb.block_size;
    *n = 0;
    if ((uint64_t)off >= file_size) {
        *len = 0;
        return 0;
    }
    if (*len > file_size - (uint64_t)off)
        *len = (size_t)(file_size - (uint64_t)off);
    uint64_t at = (uint64_t)off, end = at + *len;
    if (sqfs_blockidx_blocklist(fs, &inode, &bl, (sqfs_off_t)at) != SQFS_OK)
        return EIO;
    while (at < end) {
        if (*n == max)
            return EIO;
        struct piece *p = &pieces[(*n)++];
        if (bl.remain == 0) { /* the tail, in a fragment block */
            struct squashfs_fragment_entry frag;
            if (inode.xtra.reg.frag_idx == SQUASHFS_INVALID_FRAG ||
                sqfs_frag_entry(fs, &frag, inode.xtra.reg.frag_idx) != SQFS_OK)
                return EIO;
            uint64_t tail = file_size / bs * bs;
            if (at < tail)
                return EIO;
            p->pos = frag.start_block;
            p->header = frag.size;
            p->from = inode.xtra.reg.frag_off + (size_t)(at - tail);
            p->len = (size_t)(end - at);
            break;
        }
        if (sqfs_blocklist_next(&bl) != SQFS_OK)
            return EIO;
        if (bl.pos + bs <= at) {
            (*n)--;
            continue;
        }
        p->pos = bl.input_size == 0 ? 0 : bl.block;
        p->header = bl.header;
        p->from = (size_t)(at - bl.pos);
        uint64_t stop = bl.pos + bs < end ? bl.pos + bs : end;
        p->len = (size_t)(stop - at);
        at = stop;
    }
    return 0;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    (void)fi;
    struct server *sv = fuse_req_userdata(req);
    size_t bs = sv->ll.fs.sb.block_size;
    int max = (int)(size / bs) + 3, n = 0;
    struct piece *pieces = calloc((size_t)max, sizeof *pieces);
    char *buf = malloc(size ? size : 1);
    int err = pieces == NULL || buf == NULL ? ENOMEM : 0;
    if (!err) {
        pthread_mutex_lock(&sv->lock);
        err = plan_read(sv, ino, off, &size, pieces, max, &n);
        pthread_mutex_unlock(&sv->lock);
    }
    size_t done = 0;
    for (int i = 0; !err && i < n; i++) {
        err = copy_piece(sv, &pieces[i], buf + done);
        done += pieces[i].len;
    }
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_buf(req, buf, done);
    free(pieces);
    free(buf);
}

/* The kernel then opens without asking, keeping the page cache (see the top). */
static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, ENOSYS);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    /* libsquashfuse's readdir takes the directory's inode from fi->fh (its opendir); with
     * no opendir, look it up here, as its opendir does. */
    struct server *sv = fuse_req_userdata(req);
    sqfs_ll_i lli;
    struct fuse_file_info dir = *fi;
    pthread_mutex_lock(&sv->lock);
    lli.ll = &sv->ll;
    if (sqfs_ll_inode(&sv->ll, &lli.inode, ino) != SQFS_OK)
        fuse_reply_err(req, ENOENT);
    else if (!S_ISDIR(lli.inode.base.mode))
        fuse_reply_err(req, ENOTDIR);
    else {
        dir.fh = (uint64_t)(intptr_t)&lli;
        sqfs_ll_op_readdir(req, ino, size, off, &dir);
    }
    pthread_mutex_unlock(&sv->lock);
}

/* The rest: libsquashfuse's own operations, one at a time. */
#define LOCKED(name, params, args)                                                         \
    static void locked_##name params                                                       \
    {                                                                                      \
        struct server *sv = fuse_req_userdata(req);                                        \
        pthread_mutex_lock(&sv->lock);                                                     \
        sqfs_ll_op_##name args;                                                            \
        pthread_mutex_unlock(&sv->lock);                                                   \
    }
LOCKED(lookup, (fuse_req_t req, fuse_ino_t parent, const char *name), (req, parent, name))
LOCKED(getattr, (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi), (req, ino, fi))
LOCKED(readlink, (fuse_req_t req, fuse_ino_t ino), (req, ino))
LOCKED(listxattr, (fuse_req_t req, fuse_ino_t ino, size_t size), (req, ino, size))
LOCKED(getxattr, (fuse_req_t req, fuse_ino_t ino, const char *name, size_t size),
       (req, ino, name, size))
LOCKED(forget, (fuse_req_t req, fuse_ino_t ino, uint64_t nlookup), (req, ino, nlookup))

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct server *sv = fuse_req_userdata(req);
    pthread_mutex_lock(&sv->lock);
    stfs_ll_op_statfs(req, ino);
    pthread_mutex_unlock(&sv->lock);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
    if (conn->capable & FUSE_CAP_ASYNC_READ)
        conn->want |= FUSE_CAP_ASYNC_READ;
    /* The kernel offers its largest window (the mount's read_ahead_kb); it can only be
     * lowered here. Keep all of it. */
    conn->max_readahead = conn->max_readahead ? conn->max_readahead : UINT32_MAX;
}

int sqfs_serve(int image_fd, uint64_t offset, int fuse_fd, int threads)
{
    struct server *sv = calloc(1, sizeof *sv);
    char path[64], *argv[] = {(char *)"sifpy-sqfs-serve", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(1, argv);
    struct fuse_lowlevel_ops ops;
    int status = 1;
    if (sv == NULL)
        return 1;
    pthread_mutex_init(&sv->lock, NULL);
    pthread_mutex_init(&sv->cache_lock, NULL);
    if (sqfs_init(&sv->ll.fs, image_fd, offset) != SQFS_OK) {
        fprintf(stderr, "sifpy-sqfs-serve: not a squashfs at offset %llu\n",
                (unsigned long long)offset);
        return 1;
    }
    if (sqfs_ll_init(&sv->ll) != SQFS_OK) {
        fputs("sifpy-sqfs-serve: can't initialize the squashfs\n", stderr);
        return 1;
    }
    memset(&ops, 0, sizeof ops);
    ops.init = op_init;
    ops.lookup = locked_lookup;
    ops.forget = locked_forget;
    ops.getattr = locked_getattr;
    ops.readlink = locked_readlink;
    ops.open = op_open;
    ops.read = op_read;
    ops.opendir = op_open;
    ops.readdir = op_readdir;
    ops.statfs = op_statfs;
    ops.listxattr = locked_listxattr;
    ops.getxattr = locked_getxattr;
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, sv);
    snprintf(path, sizeof path, "/dev/fd/%d", fuse_fd); /* libfuse >= 3.3: no mount of its own */
    if (se == NULL || fuse_session_mount(se, path) != 0)
        return 1;
    if (threads <= 1) {
        status = fuse_session_loop(se);
    } else {
        struct fuse_loop_config *cfg = fuse_loop_cfg_create();
        if (cfg == NULL)
            return 1;
        fuse_loop_cfg_set_max_threads(cfg, (unsigned)threads);
        fuse_loop_cfg_set_idle_threads(cfg, (unsigned)threads);
        status = fuse_session_loop_mt(se, cfg);
        fuse_loop_cfg_destroy(cfg);
    }
    /* The connection ends when the mount goes (ENODEV): a normal end, status 0. */
    return status < 0 && status != -ENODEV ? 1 : 0;
}

#ifndef SQFS_SERVE_NO_MAIN
/* squashfuse_ll's command line as sifpy.runtime.mount.squashfuse_argv writes it. */
int main(int argc, char **argv)
{
    uint64_t offset = 0;
    int threads = 4, npos = 0;
    const char *pos[2] = {NULL, NULL};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-f") == 0)
            continue;
        if (strcmp(argv[i], "-s") == 0)
            threads = 1;
        else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc &&
                 strncmp(argv[i + 1], "offset=", 7) == 0)
            offset = strtoull(argv[++i] + 7, NULL, 10);
        else if (argv[i][0] != '-' && npos < 2)
            pos[npos++] = argv[i];
        else {
            fprintf(stderr, "usage: %s -f -o offset=N [-s] IMAGE /dev/fd/N\n", argv[0]);
            return 2;
        }
    }
    if (npos != 2 || strncmp(pos[1], "/dev/fd/", 8) != 0) {
        fprintf(stderr, "usage: %s -f -o offset=N [-s] IMAGE /dev/fd/N\n", argv[0]);
        return 2;
    }
    /* Exec'd through an fd, the kernel names us after the fd's number: take our own name
     * back (ps, and the tests look for it). */
    prctl(PR_SET_NAME, "sifpy-sqfs-serve", 0, 0, 0);
    int image = open(pos[0], O_RDONLY | O_CLOEXEC);
    if (image < 0) {
        fprintf(stderr, "%s: can't open: %s: %s\n", argv[0], pos[0], strerror(errno));
        return 1;
    }
    return sqfs_serve(image, offset, atoi(pos[1] + 8), threads);
}
#endif
