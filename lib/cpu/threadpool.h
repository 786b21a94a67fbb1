/* SPDX-License-Identifier: MIT */
/* A small persistent thread pool, one per context (no global state).  The
 * calling thread works too; run() returns when every item is done. */
#ifndef RESA_THREADPOOL_H
#define RESA_THREADPOOL_H

#include "../internal.h"

typedef struct resa_threadpool resa_threadpool;
typedef void (*resa_work_fn)(void *arg, int64_t item, int32_t worker);

/* n_threads workers in all, the caller included (1 = no threads started). */
RESA_HIDDEN resa_status resa_threadpool_create(const resa_ctx *ctx, int32_t n_threads,
                                               resa_threadpool **out);
RESA_HIDDEN void resa_threadpool_destroy(const resa_ctx *ctx, resa_threadpool *tp);
RESA_HIDDEN void resa_threadpool_run(resa_threadpool *tp, int64_t n_items, resa_work_fn fn,
                                     void *arg);
RESA_HIDDEN int32_t resa_threadpool_size(const resa_threadpool *tp);

#endif
