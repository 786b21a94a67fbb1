/* SPDX-License-Identifier: MIT */
/*
 * The private backend interface.  The core (lib/context.c, lib/sequence.c,
 * lib/step.c) does all validation, page allocation and bookkeeping on the
 * host; a backend only owns memory and runs the numerical operations.  Every
 * operation has a CPU implementation in lib/cpu/<op>.c and a CUDA one in
 * cuda/<op>.cu with the same name and the same semantics.
 *
 * The CUDA backend is a separate shared module (libresa-cuda.so.<abi>) loaded
 * with dlopen(), so that libresa.so itself never needs a CUDA library.  The
 * module exports one symbol, RESA_BACKEND_ENTRY, returning its ops table when
 * asked for RESA_BACKEND_API_VERSION.
 */
#ifndef RESA_BACKEND_H
#define RESA_BACKEND_H

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bump whenever resa_backend_ops or anything in internal.h changes shape. */
#define RESA_BACKEND_API_VERSION 3u
#define RESA_BACKEND_ENTRY "resa_backend_module_entry"

typedef struct resa_backend_ops {
    uint32_t api_version;
    const char *name;

    /* 1 when a device is usable now (CPU: always). */
    int32_t (*available)(void);
    /* Per-context state at resa_ctx_create (ctx->impl); no pool yet.  May
     * fail with RESA_ERR_NO_DEVICE. */
    resa_status (*ctx_init)(resa_ctx *ctx);
    void (*ctx_fini)(resa_ctx *ctx);
    /* Validates the configuration before it locks (dtypes, head dim).  */
    resa_status (*check_config)(resa_ctx *ctx, const resa_layout *lo);
    /* Allocates the pool (K, V, summaries, selection record) and all
     * workspace from ctx->lo; called once when the parameters lock. */
    resa_status (*pool_create)(resa_ctx *ctx);
    void (*pool_destroy)(resa_ctx *ctx);

    resa_status (*set_stream)(resa_ctx *ctx, void *stream);
    resa_status (*synchronize)(resa_ctx *ctx);

    /* Copies whole pages (K, V and summaries of every layer): dst[i] = src[i]. */
    resa_status (*copy_pages)(resa_ctx *ctx, int32_t n, const int32_t *dst, const int32_t *src);
    /* Recomputes the summaries of the blocks of `pages` that hold positions
     * [lo, hi), over the valid positions [block start, min(block end, valid)). */
    resa_status (*refresh_summaries)(resa_ctx *ctx, const int32_t *pages, int64_t lo, int64_t hi,
                                     int64_t valid);
    /* Clears the selection record of a sequence slot (every layer and head). */
    resa_status (*clear_selection)(resa_ctx *ctx, int32_t slot);

    /* Called by resa_ctx_step_begin after the step is resolved (upload of
     * metadata; no device allocation). */
    resa_status (*step_prepare)(resa_ctx *ctx, const resa_step *step);
    /* One layer of the step: writes K/V (and summaries) of every entry, then
     * the attention of every entry except APPEND_KV.  CUDA: enqueue only. */
    resa_status (*step_attend)(resa_ctx *ctx, const resa_step *step, int32_t layer,
                               const void *q, const void *k, const void *v, void *out);

    /* Copies the selection bitmap of (slot, layer, head) to host memory
     * (sel_words words).  CUDA: synchronizes. */
    resa_status (*read_selection)(resa_ctx *ctx, int32_t slot, int32_t layer, int32_t head,
                                  uint32_t *bits);

    /* Reports a fault of enqueued work that has already happened, without
     * waiting for the rest (CUDA: cudaStreamQuery outside graph capture);
     * called by resa_ctx_step_end.  NULL where work is synchronous (CPU). */
    resa_status (*check)(resa_ctx *ctx);
} resa_backend_ops;

/* The CPU backend (lib/cpu/backend_cpu.c). */
RESA_HIDDEN const resa_backend_ops *resa_cpu_backend(void);
/* The CUDA module, loaded once per process (lib/backend_loader.c); NULL with
 * *why set when it cannot be loaded. */
RESA_HIDDEN const resa_backend_ops *resa_cuda_backend(resa_status *why, const char **detail);

typedef const resa_backend_ops *(*resa_backend_entry_fn)(uint32_t api_version);

#ifdef __cplusplus
}
#endif
#endif /* RESA_BACKEND_H */
