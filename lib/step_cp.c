/* SPDX-License-Identifier: MIT */
/*
 * Context parallelism, the two-phase block selection (docs/API.md, "Context
 * parallelism"): phase 1 (resa_ctx_step_block_scores) lists each context's
 * best candidates of every sparse entry and KV head; the host gathers the
 * lists of all contexts; resa_ctx_step_thresholds finds the global K-th best
 * (score, block) of each; phase 2 is resa_ctx_step_attend_ex with those
 * thresholds (lib/step.c).  Checks here, the work in the backend.
 */
#include "backend.h"

/* Checks common to the two calls: an open step, not replayed, flags 0. */
static resa_status cp_preamble(resa_ctx *ctx, const char *what, uint32_t flags)
{
    resa_status s = resa_open_step_preamble(ctx, what, flags, "");
    if (s != RESA_OK)
        return s;
    if (ctx->step.n_sparse > 0 && ctx->step.group_score == RESA_GROUP_SCORE_HEAD_SHARE)
        return resa_fail(ctx, RESA_ERR_NOT_SUPPORTED,
                         "%s: the two-phase selection ranks with RESA_GROUP_SCORE_POOLED only "
                         "(HEAD_SHARE's ranking needs a softmax over every block of the "
                         "sequence)", what);
    return RESA_OK;
}

/* The candidate lists: scores and blocks given when capacity > 0, and capacity
 * holding every entry's candidates. */
static resa_status check_lists(resa_ctx *ctx, const char *what, int64_t capacity,
                               const float *scores, const int32_t *blocks)
{
    if (capacity > 0 && (!scores || !blocks))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: %s is NULL with capacity %lld",
                         what, !scores ? "scores" : "blocks", (long long)capacity);
    if (capacity < 0)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: capacity = %lld is negative",
                         what, (long long)capacity);
    for (int32_t i = 0; i < ctx->step.n_entries; i++) {
        const resa_step_entry *e = &ctx->step.entries[i];
        if (resa_mode_sparse(e->mode) && e->n_pick > capacity)
            return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                             "%s: capacity = %lld, but entry %d chooses %d blocks by score "
                             "(budget %d of %d blocks, minus the forced ones)",
                             what, (long long)capacity, i, e->n_pick, e->n_select, e->n_blocks);
    }
    return RESA_OK;
}

resa_status resa_ctx_step_block_scores(resa_ctx *ctx, int32_t layer, const void *q,
                                       int64_t capacity, float *scores, int32_t *blocks,
                                       int32_t *counts, uint32_t flags)
{
    static const char what[] = "step_block_scores";
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = cp_preamble(ctx, what, flags);
    if (s != RESA_OK)
        return s;
    if (layer < 0 || layer >= ctx->lo.n_layers)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "%s: layer %d is outside [0, %d) (RESA_PARAM_NUM_LAYERS)", what, layer,
                         ctx->lo.n_layers);
    if (!counts || (ctx->step.n_sparse > 0 && !q))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: %s is NULL", what,
                         !counts ? "counts" : "q");
    s = check_lists(ctx, what, capacity, scores, blocks);
    if (s != RESA_OK)
        return s;
    return ctx->ops->block_scores(ctx, &ctx->step, layer, q, capacity, scores, blocks, counts);
}

resa_status resa_ctx_step_thresholds(resa_ctx *ctx, int32_t n_ranks, int64_t capacity,
                                     const float *scores, const int32_t *blocks,
                                     const int32_t *counts, float *threshold_scores,
                                     int32_t *threshold_blocks, uint32_t flags)
{
    static const char what[] = "step_thresholds";
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = cp_preamble(ctx, what, flags);
    if (s != RESA_OK)
        return s;
    if (n_ranks < 1)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: n_ranks = %d must be at least 1",
                         what, n_ranks);
    if (!counts || !threshold_scores || !threshold_blocks)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: %s is NULL", what,
                         !counts ? "counts" : !threshold_scores ? "threshold_scores"
                                                                : "threshold_blocks");
    s = check_lists(ctx, what, capacity, scores, blocks);
    if (s != RESA_OK)
        return s;
    return ctx->ops->thresholds(ctx, &ctx->step, n_ranks, capacity, scores, blocks, counts,
                                threshold_scores, threshold_blocks);
}
