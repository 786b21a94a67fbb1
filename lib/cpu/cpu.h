/* SPDX-License-Identifier: MIT */
/* Private state and operations of the CPU backend. */
#ifndef RESA_CPU_H
#define RESA_CPU_H

#include "../internal.h"
#include "threadpool.h"

/* Dense attention processes query tiles of this many rows (tokens x group);
 * a group larger than that is one token per tile. */
#define RESA_CPU_TILE_ROWS 128
#define RESA_CPU_MAX_TILE_ROWS 1024 /* largest group: NUM_Q_HEADS bound */

/* Scratch of one worker thread, sized at pool creation (no allocation later). */
typedef struct resa_cpu_scratch {
    void *base;      /* the one allocation the pointers below point into */
    float *q;        /* [tile_rows][d] queries, fp32, pre-scaled */
    float *acc;      /* [tile_rows][d] output accumulators */
    float *m, *l;    /* [tile_rows] running max and sum of the online softmax */
    float *s;        /* [tile_rows][b rounded up to 16] scores of one block */
    float *kt, *vt;  /* [b][d] one block of K and V, fp32 */
    float *ktr;      /* [d][b rounded up to 16] K transposed */
    float *qp;       /* [d] pooled query */
    float *kmin, *kmax; /* [d] */
    float *score;    /* [max_seq_blocks] block scores */
    float *qg;       /* [group][d] the group's queries, fp32, unscaled (block selection) */
    float *hscore;   /* [group][max_seq_blocks] per-head block scores in logits (HEAD_SHARE) */
    float *hlse;     /* [group] per-head log-sum-exp of those scores (HEAD_SHARE) */
    int32_t *order;  /* [max_seq_blocks] candidate blocks for top-n */
    uint32_t *sel;   /* [sel_words] selected-block bitmap */
} resa_cpu_scratch;

/* One unit of attention work: an entry, a KV head and (dense) a query tile. */
typedef struct resa_cpu_item {
    int32_t entry, head, t0, t1;
} resa_cpu_item;

typedef struct resa_cpu_state {
    void *k, *v, *kmin, *kmax;   /* the pool, layout in internal.h */
    float *kscale, *vscale;      /* fp8 cache: per-token scales of K and V, or NULL */
    float fp8[256];              /* fp8 cache: resa_fp8_decode of every byte, a table */
    int8_t *kexp;                /* fp8 summaries' scale exponents, or NULL */
    float e4m3[256];             /* fp8 summaries: resa_e4m3_to_f32 of every byte, a table */
    uint32_t *selection;         /* RECORD_SELECTION bitmaps, or NULL */
    resa_threadpool *tp;
    resa_cpu_scratch *scratch;   /* [n_scratch], one per worker */
    int32_t n_scratch;
    int32_t tile_tokens;         /* tokens per dense tile: max(1, TILE_ROWS / group) */
    int32_t tile_rows;           /* tile_tokens * group */
    resa_cpu_item *items;        /* attention work list of the open step */
    int64_t items_cap, n_items;
} resa_cpu_state;

/* Everything one layer's work needs, handed to the thread pool. */
typedef struct resa_cpu_job {
    resa_ctx *ctx;
    resa_cpu_state *st;
    const resa_step *step;
    int32_t layer;
    const void *q, *k, *v;
    void *out;
    const resa_attend_extra *x; /* lse and thresholds (resa_ctx_step_attend_ex), or NULL */
} resa_cpu_job;

/* kv_codec.c: `rows` rows of K (is_v 0) or V (1) from element offset `at`
 * (a row start) of the pool, as fp32 values of lo.val_dtype, into dst. */
RESA_HIDDEN void resa_cpu_kv_load(const resa_ctx *ctx, const resa_cpu_state *st, int is_v,
                                  size_t at, int32_t rows, float *dst);
/* kv_codec.c: one row of d fp32 values into the pool at element offset `at`
 * (rounded to KV_DTYPE, or quantized with its scale for an fp8 cache). */
RESA_HIDDEN void resa_cpu_kv_store(const resa_ctx *ctx, const resa_cpu_state *st, int is_v,
                                   size_t at, const float *src);
/* kv_write.c: store one entry's rows of K and V for one head, then recompute
 * the summaries of the blocks they touch. */
RESA_HIDDEN void resa_cpu_kv_write(const resa_cpu_job *job, const resa_step_entry *e,
                                   int32_t head);
/* kv_write.c: recompute summaries of the blocks holding [lo, hi), valid < `valid`. */
RESA_HIDDEN void resa_cpu_refresh_summaries(const resa_ctx *ctx, const resa_cpu_state *st,
                                            int32_t layer, int32_t head, const int32_t *pages,
                                            int64_t lo, int64_t hi, int64_t valid);
/* attention_dense.c: dense causal attention of one query tile. */
RESA_HIDDEN void resa_cpu_attention_dense(const resa_cpu_job *job, const resa_cpu_item *it,
                                          resa_cpu_scratch *sc);
/* attention_sparse.c: ReSA decode of one (entry, KV head): pooled query,
 * block scores, budgeted top-n selection, attention over the chosen blocks. */
RESA_HIDDEN void resa_cpu_attention_sparse(const resa_cpu_job *job, const resa_cpu_item *it,
                                           resa_cpu_scratch *sc);
/* attend_block.c: online-softmax update of `rows` query rows (pre-scaled)
 * with one block of n keys/values; row r sees keys [0, limit[r]) (all n when
 * limit is NULL).  Updates sc->m, sc->l, sc->acc. */
RESA_HIDDEN void resa_cpu_attend_block(const float *q, int32_t rows, int32_t d, const float *kt,
                                       const float *vt, int32_t n, const int32_t *limit,
                                       resa_cpu_scratch *sc);

/* attention_dense.c: the tile helpers the sparse decode shares. */
RESA_HIDDEN void resa_cpu_load_queries(const resa_cpu_job *job, const resa_step_entry *e,
                                       int32_t head, int32_t t0, int32_t t1, float *q);
/* Points kt/vt at n rows of one pool block as fp32 (directly for an fp32
 * pool, else converted into the worker's buffers). */
RESA_HIDDEN void resa_cpu_block_f32(const resa_cpu_job *job, int32_t page, int32_t head,
                                    int32_t n, resa_cpu_scratch *sc, const float **kt,
                                    const float **vt);
RESA_HIDDEN void resa_cpu_reset_rows(resa_cpu_scratch *sc, int32_t rows, int32_t d);
RESA_HIDDEN void resa_cpu_store_output(const resa_cpu_job *job, const resa_step_entry *e,
                                       int32_t head, int32_t t0, int32_t t1, int empty,
                                       resa_cpu_scratch *sc);
/* attention_sparse.c: the scores of this context's candidates of a sparse
 * entry and head into sc->score[c0 .. c1) (local indices; NaN as -inf) and
 * those indices into sc->order; returns their number (0 when nothing is
 * chosen by score). */
RESA_HIDDEN int32_t resa_cpu_candidate_scores(const resa_cpu_job *job, const resa_step_entry *e,
                                              int32_t head, resa_cpu_scratch *sc, int32_t *c0,
                                              int32_t *c1);
/* attention_sparse.c: ord[0 .. k) become the k best of ord[0 .. n) (score
 * descending, then lower index), in no particular order. */
RESA_HIDDEN void resa_cpu_select_top(int32_t *ord, int32_t n, int32_t k, const float *score);
/* block_scores.c: the backend's phase 1, thresholds and merge (backend.h). */
RESA_HIDDEN resa_status resa_cpu_block_scores(resa_ctx *ctx, const resa_step *step,
                                              int32_t layer, const void *q, int64_t capacity,
                                              float *scores, int32_t *blocks, int32_t *counts);
RESA_HIDDEN resa_status resa_cpu_thresholds(resa_ctx *ctx, const resa_step *step,
                                            int32_t n_ranks, int64_t capacity,
                                            const float *scores, const int32_t *blocks,
                                            const int32_t *counts, float *thr_scores,
                                            int32_t *thr_blocks);

/* For white-box tests: the pool's arrays. */
RESA_HIDDEN void resa_cpu_pool_views(const resa_ctx *ctx, void **k, void **v, void **kmin,
                                     void **kmax);
/* fp8 summaries' scale exponents (lib/internal.h: kexp), or NULL. */
RESA_HIDDEN const int8_t *resa_cpu_pool_kexp(const resa_ctx *ctx);
/* fp8 cache: the per-token scales of K and V (lib/internal.h), or NULL. */
RESA_HIDDEN void resa_cpu_pool_scales(const resa_ctx *ctx, const float **kscale,
                                      const float **vscale);

#endif
