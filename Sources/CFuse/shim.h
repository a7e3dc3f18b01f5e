// CFuse: libfuse3's low-level API for Swift, plus tiny shims for what Swift cannot call
// (macros, bitfields). A system-library target takes no cSettings, so FUSE_USE_VERSION is
// defined here, before the include.
#ifndef CFUSE_SHIM_H
#define CFUSE_SHIM_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <linux/falloc.h>
#include <sys/syscall.h>
#include <unistd.h>

/// fallocate(2), which glibc declares only under _GNU_SOURCE (tests punch holes with it).
static inline int cfuse_fallocate(int fd, int mode, off_t offset, off_t len) {
    return (int)syscall(SYS_fallocate, fd, mode, offset, len);
}

// fuse_file_info's flags are bitfields, which Swift does not import.
static inline void cfuse_fi_set_keep_cache(struct fuse_file_info *fi, int v) { fi->keep_cache = v ? 1 : 0; }
static inline void cfuse_fi_set_direct_io(struct fuse_file_info *fi, int v) { fi->direct_io = v ? 1 : 0; }

/// Negotiates the connection in `init`: request sizes, readahead, and the capabilities we want.
/// The page cache is kept (no auto_inval_data): measured, a guest whose RAM is a FUSE file
/// runs only with the cache kept.
static inline void cfuse_conn_setup(struct fuse_conn_info *conn, unsigned max_io, unsigned readahead, int writeback) {
    conn->max_write = max_io;
    conn->max_read = max_io;
    conn->max_readahead = readahead;
    conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
    if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
    if (writeback && (conn->capable & FUSE_CAP_WRITEBACK_CACHE)) conn->want |= FUSE_CAP_WRITEBACK_CACHE;
    else conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

/// fuse_session_new with FUSE_ARGS_INIT (a macro). `argv` must stay valid: libfuse keeps it.
static inline struct fuse_session *cfuse_session_new(int argc, char **argv,
        const struct fuse_lowlevel_ops *ops, void *userdata) {
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    return fuse_session_new(&args, ops, sizeof(*ops), userdata);
}

/// fuse_session_loop_mt (a versioned macro) with `max_threads` worker threads.
static inline int cfuse_session_loop_mt(struct fuse_session *se, unsigned max_threads) {
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (!cfg) return -ENOMEM;
    fuse_loop_cfg_set_clone_fd(cfg, 0);
    fuse_loop_cfg_set_max_threads(cfg, max_threads);
    fuse_loop_cfg_set_idle_threads(cfg, max_threads);
    int r = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return r;
}

#endif
