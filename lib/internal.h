/* SPDX-License-Identifier: MIT */
/*
 * Private state of a resa_ctx, shared by the core (lib/) and the backends
 * (lib/cpu/, cuda/).  Plain C so that the CUDA module can include it.
 * Nothing here is part of the ABI: the CUDA module is built from the same tree
 * and checked with RESA_BACKEND_API_VERSION when it is loaded.
 */
#ifndef RESA_INTERNAL_H
#define RESA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "resa.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#  define RESA_HIDDEN __attribute__((visibility("hidden")))
#else
#  define RESA_HIDDEN
#endif

/* The parameters, resolved.  Integer fields are what resa_ctx_get_param returns. */
typedef struct resa_config {
    int64_t n_layers, n_q_heads, n_kv_heads, head_dim;
    int64_t kv_dtype, io_dtype;
    int64_t max_tokens, max_seqs, max_seq_tokens, max_step_tokens, summary_format;
    int64_t block_size;
    double select_fraction;
    int64_t min_blocks, local_blocks, sink_blocks, rectify_interval;
    double softmax_scale; /* 0 = 1/sqrt(head_dim) */
    double score_width;   /* w of the block score (RESA_PARAM_SCORE_WIDTH) */
    int64_t group_score;  /* resa_group_score (RESA_PARAM_GROUP_SCORE) */
    int64_t num_threads, record_selection;
    uint32_t shape_set;   /* bit p - NUM_LAYERS for each of NUM_LAYERS .. HEAD_DIM the host
                             set: the model's shape has no safe default (resa_ctx_lock) */
} resa_config;

/* Derived sizes, fixed while the context is locked. */
typedef struct resa_layout {
    int32_t n_layers, hq, hkv, group, d, b, log2_b;
    int32_t n_pages;         /* pool pages, one block of b tokens each (all layers) */
    int32_t max_seqs;
    int32_t max_seq_blocks;  /* page-table entries per sequence */
    int32_t sel_words;       /* uint32 words of one selection bitmap (max_seq_blocks bits) */
    int64_t max_step_tokens;
    resa_dtype kv_dtype, io_dtype;
    size_t kv_elt, io_elt;   /* bytes per element (1 for an fp8 cache) */
    int32_t kv_fp8;          /* KV_DTYPE FP8_E4M3: K/V bytes plus per-token scales
                                (lib/kv_fp8.h) */
    resa_dtype val_dtype;    /* the dtype of the values the cache holds: kv_dtype, or
                                for an fp8 cache io_dtype (its dequantized values are
                                rounded to it); summaries without sum_fp8 use it */
    int32_t sum_fp8;         /* RESA_SUMMARY_FP8_E4M3 (lib/summary_fp8.h) */
    size_t sum_elt;          /* bytes per summary element: val_dtype's, or 1 with sum_fp8 */
} resa_layout;

/*
 * KV pool layout, identical on every backend (only the memory space differs):
 *   K, V:        [layer][page][kv_head][b][d]       (kv_dtype)
 *   kscale, vscale: [layer][page][kv_head][b]       (kv_fp8 only: fp32 scale of
 *                each token's K and V head vector; index = K/V offset / d)
 *   kmin, kmax:  [layer][page][kv_head][d]          (val_dtype; min/max of the
 *                valid keys of the block, exact, so the KV dtype loses nothing;
 *                or, with sum_fp8, e4m3 bytes rounded outward)
 *   kexp:        [layer][page][kv_head]             (sum_fp8 only: int8 scale
 *                exponent of the block's fp8 summary; index = summary offset / d)
 *   selection:   [seq_slot][layer][kv_head][sel_words] bits (RECORD_SELECTION)
 */
static inline size_t resa_kv_offset(const resa_layout *lo, int32_t layer, int32_t page,
                                    int32_t head)
{
    return (((size_t)layer * (size_t)lo->n_pages + (size_t)page) * (size_t)lo->hkv +
            (size_t)head) * (size_t)lo->b * (size_t)lo->d;
}
/* Index of the scale of (layer, page, head) slot 0 in kscale/vscale (kv_fp8). */
static inline size_t resa_scale_offset(const resa_layout *lo, int32_t layer, int32_t page,
                                       int32_t head)
{
    return resa_kv_offset(lo, layer, page, head) / (size_t)lo->d;
}
static inline size_t resa_summary_offset(const resa_layout *lo, int32_t layer, int32_t page,
                                         int32_t head)
{
    return (((size_t)layer * (size_t)lo->n_pages + (size_t)page) * (size_t)lo->hkv +
            (size_t)head) * (size_t)lo->d;
}
static inline size_t resa_selection_offset(const resa_layout *lo, int32_t slot, int32_t layer,
                                           int32_t head)
{
    return (((size_t)slot * (size_t)lo->n_layers + (size_t)layer) * (size_t)lo->hkv +
            (size_t)head) * (size_t)lo->sel_words;
}

/* One sequence slot. */
typedef struct resa_seq {
    int32_t in_use;
    int32_t generation;   /* bumped at release; part of the public id */
    int64_t length;       /* tokens stored */
    int64_t rect_start;   /* first position pending rectification; == length when none */
    int32_t n_pages;      /* ceil(length / b), pages in the table */
    int32_t dev_synced;   /* leading table entries known equal on the device (CUDA); the
                             core lowers it on every change, the backend raises it */
    int32_t *pages;       /* [max_seq_blocks] page ids (host copy of the page table) */
    /* Context parallelism (resa_seq_set_span): this context holds positions
     * [first_token, first_token + length) of the sequence; global_length is
     * the whole sequence's length, or -1 when this context holds its tail. */
    int64_t first_token;
    int64_t global_length;
} resa_seq;

/* The page allocator (host side, for every backend). */
typedef struct resa_pool {
    int32_t n_pages;
    int32_t n_free;
    int32_t *free_list;   /* stack of free page ids */
    int32_t *refcount;    /* per page: sequences whose table holds it */
} resa_pool;

/* One entry of a step, resolved by resa_ctx_step_begin. */
typedef struct resa_step_entry {
    int32_t slot;         /* sequence slot */
    int32_t mode;         /* resa_mode */
    int32_t n;            /* tokens (rows) */
    int32_t n_pages;      /* pages of the sequence after the step's writes */
    int64_t row;          /* first row in q, k, v, out */
    int64_t start;        /* position of the first row */
    int64_t end;          /* start + n: positions visible to the last row */
    int64_t old_length;   /* sequence length before the step */
    int64_t valid;        /* positions that hold keys after the step's writes:
                             max(end, old_length); summaries cover [block start, valid) */
    int32_t n_blocks;     /* DECODE, QUERY_SPARSE: M, the sequence's blocks so far including
                             the current one, over all contexts (resa_seq_set_span) */
    int32_t n_select;     /* DECODE, QUERY_SPARSE: blocks attended over all contexts (budget,
                             forced blocks included) */
    int32_t n_pick;       /* DECODE, QUERY_SPARSE: n_select minus the forced blocks: the
                             candidates chosen by score (0 when n_select == n_blocks) */
    int32_t first_block;  /* global index of this context's block 0 (first_token / b) */
    int32_t local_blocks; /* DECODE, QUERY_SPARSE: blocks of this context the row may attend
                             (first_block + local_blocks <= n_blocks) */
    const int32_t *pages; /* host page table of the sequence */
} resa_step_entry;

/* A step, resolved.  The algorithm parameters are snapshotted at begin. */
typedef struct resa_step {
    int32_t n_entries;
    int64_t n_rows;
    int32_t has_output;   /* some entry writes out */
    int32_t n_decode;     /* entries in DECODE mode */
    uint64_t shape;       /* hash of everything a captured CUDA graph bakes in */
    int32_t replay;       /* begun with RESA_STEP_REPLAY: no step_attend calls */
    int32_t local_blocks, sink_blocks;
    float scale;          /* softmax scale */
    float score_width;    /* w of the block score: 1 = the paper's bound */
    int32_t group_score;  /* resa_group_score */
    int32_t has_kv;       /* some entry stores K/V (not only QUERY entries) */
    int32_t n_sparse;     /* DECODE and QUERY_SPARSE entries */
    resa_step_entry *entries;
} resa_step;

/* What one layer's attention call asks besides q, k, v, out
 * (resa_ctx_step_attend_ex); all NULL for resa_ctx_step_attend. */
typedef struct resa_attend_extra {
    float *lse;                      /* [T][hq] or NULL */
    const float *threshold_scores;   /* [n_entries][hkv] or NULL */
    const int32_t *threshold_blocks; /* [n_entries][hkv] or NULL */
} resa_attend_extra;

/* Mode groups. */
static inline int resa_mode_stores(int32_t mode)
{
    return mode >= 0 && mode <= 3; /* APPEND, DECODE, RECTIFY, APPEND_KV */
}
static inline int resa_mode_sparse(int32_t mode)
{
    return mode == 1 || mode == 5; /* DECODE, QUERY_SPARSE */
}
static inline int resa_mode_dense(int32_t mode)
{
    return mode == 0 || mode == 2 || mode == 4; /* APPEND, RECTIFY, QUERY_DENSE */
}

struct resa_backend_ops; /* lib/backend.h */

#define RESA_ERROR_CAP 512
#define RESA_FAULT_CAP 192

struct resa_ctx {
    resa_allocator alloc;
    resa_backend backend;                   /* CPU or CUDA, never AUTO */
    resa_backend requested;                 /* as passed to resa_ctx_create */
    const struct resa_backend_ops *ops;
    void *impl;                             /* backend-private state */
    void *stream;

    resa_config cfg;
    int32_t locked;                         /* pool allocated, shape parameters fixed */
    int32_t id_epoch;                       /* bumped at every unlock, so that ids from before a
                                               session reset are not live again after it */
    resa_layout lo;
    resa_pool pool;
    resa_seq *seqs;                         /* [max_seqs] */
    int32_t *page_tables;                   /* [max_seqs][max_seq_blocks] */

    /* the open step */
    int32_t step_open;
    resa_step step;
    resa_step_entry *step_entries;          /* [max_seqs] */
    int32_t *step_new_pages;                /* [max_seqs] pages allocated at begin, per entry */
    uint8_t *layer_done;                    /* [n_layers] */
#define RESA_CAPTURED_SHAPES 8
    uint64_t captured[RESA_CAPTURED_SHAPES];/* shapes of the steps last captured in CUDA graphs
                                               (the CUDA backend records them), 0 = none */
    int32_t captured_next;                  /* ring index of the next record */
    int32_t *scratch_slots;                 /* [max_seqs] validation scratch */
    int32_t *page_marks;                    /* [n_pages] copy-on-write counting scratch */

    /* A sticky CUDA error (docs/API.md, "After a device fault") lost the
     * process's CUDA context: set once by the CUDA backend, with the fault's
     * text; from then on the core refuses every call but resa_ctx_destroy and
     * the host-side queries (resa_refuse_lost). */
    int32_t device_lost;
    char device_fault[RESA_FAULT_CAP];

    char error[RESA_ERROR_CAP];
};

/* ---- helpers of the core (lib/) ---- */
/* Host memory through the context's hooks (alloc.c); the default hooks
 * (posix_memalign and free) for a context created without any. */
RESA_HIDDEN void *resa_alloc(const resa_ctx *ctx, size_t size);   /* zeroed, 64-byte aligned */
RESA_HIDDEN void resa_free(const resa_ctx *ctx, void *ptr);
RESA_HIDDEN resa_allocator resa_default_allocator(void);
/* The context's last-error text (error.c): resa_fail sets it and returns s;
 * resa_clear_error empties it at the start of a call. */
RESA_HIDDEN resa_status resa_fail(resa_ctx *ctx, resa_status s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
RESA_HIDDEN void resa_clear_error(resa_ctx *ctx);
/* RESA_ERR_BACKEND, naming the call and the device fault, when the context's
 * CUDA context was lost (ctx->device_lost); else RESA_OK. */
static inline resa_status resa_refuse_lost(resa_ctx *ctx, const char *what)
{
    if (!ctx->device_lost)
        return RESA_OK;
    return resa_fail(ctx, RESA_ERR_BACKEND,
                     "%s: refused: a device fault lost the CUDA context (%s); only "
                     "resa_ctx_destroy and the queries work now", what, ctx->device_fault);
}
/* The checks every call inside an open step starts with (step.c): clears the
 * last error, then a lost device, flags != 0, no open step, a step begun with
 * RESA_STEP_REPLAY (replay_hint, "" or a sentence, ends that message). */
RESA_HIDDEN resa_status resa_open_step_preamble(resa_ctx *ctx, const char *what, uint32_t flags,
                                                const char *replay_hint);
RESA_HIDDEN size_t resa_dtype_size(resa_dtype t);

/* Parameters (params.c): every field of c to its default, nothing set by the
 * host; and a parameter's name as the header spells it (NULL if unknown). */
RESA_HIDDEN void resa_config_defaults(resa_config *c);
RESA_HIDDEN const char *resa_param_name(resa_param p);

/* The ReSA budget rule (spec: resa-algorithm.md), shared by every backend:
 * n = max(ceil(r * M), min(M, n_min)), then at least the forced blocks, at most M.
 * r is taken to 6 decimals so that ceil() is exact (0.07 * 100 is 7, not 8). */
RESA_HIDDEN int32_t resa_select_budget(int64_t n_blocks, double fraction, int64_t min_blocks,
                                       int64_t local_blocks, int64_t sink_blocks);
/* Number of distinct forced blocks among M: the last `local`, the first `sink`. */
RESA_HIDDEN int32_t resa_forced_blocks(int64_t n_blocks, int64_t local_blocks,
                                       int64_t sink_blocks);

#ifdef __cplusplus
}
#endif
#endif /* RESA_INTERNAL_H */
