/* SPDX-License-Identifier: MIT */
/*
 * Context parallelism on the CPU: phase 1 of the two-phase selection (each
 * context's best candidates with their scores) and the thresholds from the
 * gathered lists (docs/API.md, "Context parallelism").  CUDA twins: phase 1
 * is cuda/select_blocks.cu's export mode (resa_cuda_block_scores), the
 * thresholds cuda/select_cp.cu.
 */
#include <math.h>
#include <string.h>

#include "cpu.h"

/* The arguments of resa_ctx_step_thresholds, handed to the workers. */
typedef struct resa_cpu_thr_args {
    const resa_step *step;
    int32_t hkv;
    int32_t n_ranks;
    int64_t capacity;
    const float *scores;
    const int32_t *blocks;
    const int32_t *counts;
    float *thr_scores;
    int32_t *thr_blocks;
} resa_cpu_thr_args;

typedef struct scores_job {
    resa_cpu_job job;
    int64_t capacity;
    float *scores;
    int32_t *blocks;
    int32_t *counts;
} scores_job;

static void score_item(void *arg, int64_t item, int32_t worker)
{
    const scores_job *sj = arg;
    const resa_cpu_job *job = &sj->job;
    const int32_t hkv = job->ctx->lo.hkv, head = (int32_t)(item % hkv);
    const resa_step_entry *e = &job->step->entries[item / hkv];
    int32_t n_cand = 0, c0, c1;
    if (resa_mode_sparse(e->mode))
        n_cand = resa_cpu_candidate_scores(job, e, head, &job->st->scratch[worker], &c0, &c1);
    const resa_cpu_scratch *sc = &job->st->scratch[worker];
    int32_t k = e->n_pick < n_cand ? e->n_pick : n_cand;
    resa_cpu_select_top(sc->order, n_cand, k, sc->score);
    /* scores and blocks may be NULL (capacity 0, nothing to list): index
     * them only when something is written (NULL + 0 is undefined in C) */
    for (int32_t i = 0; i < k; i++) {
        sj->scores[item * sj->capacity + i] = sc->score[sc->order[i]];       /* NaN already -inf */
        sj->blocks[item * sj->capacity + i] = e->first_block + sc->order[i]; /* global index */
    }
    sj->counts[item] = k;
}

resa_status resa_cpu_block_scores(resa_ctx *ctx, const resa_step *step, int32_t layer,
                                  const void *q, int64_t capacity, float *scores,
                                  int32_t *blocks, int32_t *counts)
{
    resa_cpu_state *st = ctx->impl;
    scores_job sj = {{ctx, st, step, layer, q, NULL, NULL, NULL, NULL}, capacity, scores,
                     blocks, counts};
    resa_threadpool_run(st->tp, (int64_t)step->n_entries * ctx->lo.hkv, score_item, &sj);
    return RESA_OK;
}

/* The selection's order as one unsigned 64-bit key, larger = better: the
 * score's order-preserving bits above (NaN as -inf, -0 as +0, as
 * cuda/select_blocks.cu's order_key), the complemented block index below
 * (lower index first on equal scores). */
static uint64_t rank_key(float s, int32_t block)
{
    if (s != s)
        s = -INFINITY;
    if (s == 0.0f)
        s = 0.0f;
    uint32_t u;
    memcpy(&u, &s, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)u << 32) | (uint64_t)(0xffffffffu - (uint32_t)block);
}

static void key_split(uint64_t key, float *s, int32_t *block)
{
    uint32_t u = (uint32_t)(key >> 32);
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
    memcpy(s, &u, sizeof *s);
    *block = (int32_t)(0xffffffffu - (uint32_t)key);
}

/* The k-th largest key among the lists of (entry, head) `item`: built bit by
 * bit from the top, keeping each bit whose prefix still has >= k keys at or
 * above it (64 counting passes, no allocation, no sort; the CUDA kernel does
 * the same).  Fewer than k keys (a context missing): the last one. */
static void threshold_item(void *arg, int64_t item, int32_t worker)
{
    (void)worker;
    const resa_cpu_thr_args *a = arg;
    const resa_step *step = a->step;
    const int64_t pairs = (int64_t)step->n_entries * a->hkv;
    const resa_step_entry *e = &step->entries[item / a->hkv];
    int64_t k = resa_mode_sparse(e->mode) ? e->n_pick : 0, total = 0;
    for (int32_t r = 0; r < a->n_ranks; r++) {
        int64_t c = a->counts[r * pairs + item];
        total += c < 0 ? 0 : c > a->capacity ? a->capacity : c;
    }
    k = k < total ? k : total;
    if (k <= 0) { /* nothing chosen by score: (+inf, -1) takes nothing */
        a->thr_scores[item] = INFINITY;
        a->thr_blocks[item] = -1;
        return;
    }
    uint64_t prefix = 0;
    for (int bit = 63; bit >= 0; bit--) {
        uint64_t want = prefix | ((uint64_t)1 << bit);
        int64_t n = 0;
        for (int32_t r = 0; r < a->n_ranks && n < k; r++) {
            int64_t c = a->counts[r * pairs + item];
            c = c < 0 ? 0 : c > a->capacity ? a->capacity : c;
            const size_t at = ((size_t)r * (size_t)pairs + (size_t)item) * (size_t)a->capacity;
            for (int64_t i = 0; i < c; i++)
                n += rank_key(a->scores[at + (size_t)i], a->blocks[at + (size_t)i]) >= want;
        }
        if (n >= k)
            prefix = want;
    }
    key_split(prefix, &a->thr_scores[item], &a->thr_blocks[item]);
}

resa_status resa_cpu_thresholds(resa_ctx *ctx, const resa_step *step, int32_t n_ranks,
                                int64_t capacity, const float *scores, const int32_t *blocks,
                                const int32_t *counts, float *thr_scores, int32_t *thr_blocks)
{
    resa_cpu_state *st = ctx->impl;
    resa_cpu_thr_args a = {step, ctx->lo.hkv, n_ranks, capacity, scores, blocks, counts,
                           thr_scores, thr_blocks};
    resa_threadpool_run(st->tp, (int64_t)step->n_entries * ctx->lo.hkv, threshold_item, &a);
    return RESA_OK;
}
