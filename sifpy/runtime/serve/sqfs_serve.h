/* sifpy's squashfs FUSE server (sqfs_serve.c), for the starter that links it in. */
#ifndef SIFPY_SQFS_SERVE_H
#define SIFPY_SQFS_SERVE_H
#include <stdint.h>

/* Serve the squashfs at byte `offset` of `image_fd` on the FUSE connection `fuse_fd` (a
 * mount already made with it) with up to `threads` threads, until the mount goes; 0 then,
 * 1 on failure (a message on stderr). */
int sqfs_serve(int image_fd, uint64_t offset, int fuse_fd, int threads);

#endif
