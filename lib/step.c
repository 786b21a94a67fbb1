/* SPDX-License-Identifier: MIT */
/*
 * The step protocol: begin (validate, reserve pages, resolve the batch),
 * attend (one layer, in the backend), end (commit lengths and rectification
 * state) or cancel.  All bookkeeping is here, on the host, for every backend.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "pool.h"
#include "sequence.h"

static int32_t blocks_for(int64_t tokens, int32_t b)
{
    return (int32_t)((tokens + b - 1) / b);
}

/* Validates one entry; returns the pages it needs from the pool. */
static resa_status check_entry(resa_ctx *ctx, int32_t i, int32_t slot, int32_t mode, int32_t n,
                               int64_t *need_pages)
{
    const resa_seq *q = &ctx->seqs[slot];
    const resa_layout *lo = &ctx->lo;
    int64_t max_len = (int64_t)lo->max_seq_blocks * lo->b;
    int64_t cap = ctx->cfg.max_seq_tokens ? ctx->cfg.max_seq_tokens : ctx->cfg.max_tokens;
    if (cap < max_len)
        max_len = cap;
    /* HEAD_SHARE ranks a block by its share of a softmax over every block of
     * the sequence: a context holding part of it cannot rank alone. */
    if (ctx->cfg.group_score == RESA_GROUP_SCORE_HEAD_SHARE && resa_mode_sparse(mode) &&
        (q->first_token != 0 || mode == RESA_MODE_QUERY_SPARSE))
        return resa_fail(ctx, RESA_ERR_NOT_SUPPORTED,
                         "step_begin: seqs[%d]: RESA_GROUP_SCORE_HEAD_SHARE needs the whole "
                         "sequence in one context; a split sequence (resa_seq_set_span) "
                         "selects with RESA_GROUP_SCORE_POOLED", i);
    /* A context that does not hold the sequence's tail (resa_seq_set_span)
     * only answers queries: its tokens are final. */
    if (resa_mode_stores(mode) && q->global_length >= 0 &&
        q->global_length != q->first_token + q->length)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "step_begin: modes[%d] = %d stores tokens, but this context does not "
                         "hold the tail of seqs[%d] (its span ends at %lld, the sequence's "
                         "global_length is %lld): only RESA_MODE_QUERY_DENSE and "
                         "RESA_MODE_QUERY_SPARSE", i, mode, i,
                         (long long)(q->first_token + q->length), (long long)q->global_length);
    switch (mode) {
    case RESA_MODE_QUERY_DENSE:
    case RESA_MODE_QUERY_SPARSE:
        if (n < 1 || (mode == RESA_MODE_QUERY_SPARSE && n != 1))
            return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                             "step_begin: n_tokens[%d] = %d; %s", i, n,
                             mode == RESA_MODE_QUERY_SPARSE
                                 ? "RESA_MODE_QUERY_SPARSE takes exactly 1"
                                 : "RESA_MODE_QUERY_DENSE needs at least 1");
        /* Pending tokens of a context that answers queries would never be
         * rectified right: their rows' queries are another context's. */
        if (q->length != q->rect_start)
            return resa_fail(ctx, RESA_ERR_BAD_STATE,
                             "step_begin: seqs[%d] has %lld tokens pending rectification; a "
                             "context that answers queries must have none (rectify before the "
                             "tail moves to another context)",
                             i, (long long)(q->length - q->rect_start));
        return RESA_OK;
    case RESA_MODE_APPEND:
    case RESA_MODE_APPEND_KV:
    case RESA_MODE_DECODE:
        if (n < 1 || (mode == RESA_MODE_DECODE && n != 1))
            return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                             "step_begin: n_tokens[%d] = %d; %s", i, n,
                             mode == RESA_MODE_DECODE ? "RESA_MODE_DECODE takes exactly 1"
                                                      : "an append needs at least 1");
        if (q->length + n > max_len)
            return resa_fail(ctx, RESA_ERR_CAPACITY,
                             "step_begin: seqs[%d] would hold %lld tokens, over "
                             "RESA_PARAM_MAX_SEQ_TOKENS (%lld)",
                             i, (long long)(q->length + n), (long long)max_len);
        *need_pages += blocks_for(q->length + n, lo->b) - q->n_pages;
        return RESA_OK;
    case RESA_MODE_RECTIFY: {
        int64_t pending = q->length - q->rect_start;
        if (pending == 0)
            return resa_fail(ctx, RESA_ERR_BAD_STATE,
                             "step_begin: seqs[%d] has no tokens pending rectification", i);
        if (n < 1 || n > pending)
            return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                             "step_begin: n_tokens[%d] = %d but the sequence has %lld tokens "
                             "pending rectification (1 to all of them, oldest first)",
                             i, n, (long long)pending);
        return RESA_OK; /* copies of shared pages are counted by count_copies() */
    }
    default:
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "step_begin: modes[%d] = %d is not a resa_mode", i, mode);
    }
}

/* Pages of a RECTIFY entry's span: [first, last]. */
static void rectify_pages(const resa_seq *q, int32_t n, int32_t log2_b, int32_t *first,
                          int32_t *last)
{
    *first = (int32_t)(q->rect_start >> log2_b);
    *last = (int32_t)((q->rect_start + n - 1) >> log2_b);
}

/* Exact number of copy-on-write copies the RECTIFY entries need: a shared
 * page (refcount r) overwritten by k sequences of the step is copied
 * min(k, r - 1) times (the last holder keeps the original). */
static int64_t count_copies(resa_ctx *ctx, int32_t n_seqs, const int32_t *seqs,
                            const int32_t *modes, const int32_t *n_tokens)
{
    int32_t *marks = ctx->page_marks; /* all zero between calls */
    int64_t copies = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int32_t i = 0; i < n_seqs; i++) {
            if (modes[i] != RESA_MODE_RECTIFY)
                continue;
            const resa_seq *q = &ctx->seqs[seqs[i] & 0xffff];
            int32_t first, last;
            rectify_pages(q, n_tokens[i], ctx->lo.log2_b, &first, &last);
            for (int32_t p = first; p <= last; p++) {
                int32_t page = q->pages[p], r = ctx->pool.refcount[page];
                if (r <= 1)
                    continue;
                if (pass == 0) {
                    marks[page]++;
                } else if (marks[page] > 0) {
                    copies += marks[page] < r ? marks[page] : r - 1;
                    marks[page] = 0;
                }
            }
        }
    return copies;
}

/* FNV-1a over what a captured CUDA graph bakes into its launches. */
static uint64_t step_shape(const resa_ctx *ctx, int32_t n_seqs, const int32_t *seqs,
                           const int32_t *modes, const int32_t *n_tokens)
{
    uint64_t h = 1469598103934665603ull;
#define MIX(x) (h = (h ^ (uint64_t)(x)) * 1099511628211ull)
    MIX(n_seqs);
    for (int32_t i = 0; i < n_seqs; i++) {
        const resa_seq *q = &ctx->seqs[seqs[i] & 0xffff];
        int64_t start = modes[i] == RESA_MODE_RECTIFY ? q->rect_start : q->length;
        MIX(modes[i]);
        MIX(n_tokens[i]);
        /* blocks whose summaries the writes refresh: a launch size too */
        MIX(((start + n_tokens[i] - 1) >> ctx->lo.log2_b) - (start >> ctx->lo.log2_b));
    }
    uint64_t scale;
    memcpy(&scale, &ctx->cfg.softmax_scale, sizeof scale);
    MIX(scale);
    MIX(ctx->cfg.local_blocks);
    MIX(ctx->cfg.sink_blocks);
    uint64_t width;
    memcpy(&width, &ctx->cfg.score_width, sizeof width);
    MIX(width);
    MIX(ctx->cfg.group_score);
#undef MIX
    return h | 1; /* never 0, which means "nothing captured" */
}

static int was_captured(const resa_ctx *ctx, uint64_t shape)
{
    for (int i = 0; i < RESA_CAPTURED_SHAPES; i++)
        if (ctx->captured[i] == shape)
            return 1;
    return 0;
}

/* Gives back the growth pages of the first `n` entries (begin failed or cancel). */
static void return_growth(resa_ctx *ctx, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        resa_seq *q = &ctx->seqs[ctx->step_entries[i].slot];
        for (int32_t k = 0; k < ctx->step_new_pages[i]; k++)
            resa_pool_unref(&ctx->pool, q->pages[--q->n_pages]);
        if (q->dev_synced > q->n_pages)
            q->dev_synced = q->n_pages;
        ctx->step_new_pages[i] = 0;
    }
}

resa_status resa_ctx_step_begin(resa_ctx *ctx, int32_t n_seqs, const int32_t *seqs,
                                const int32_t *modes, const int32_t *n_tokens, uint32_t flags)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "step_begin");
    if (flags & ~RESA_STEP_REPLAY)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "step_begin: flags = 0x%x; only RESA_STEP_REPLAY is defined", flags);
    if (ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE,
                         "step_begin: a step is already open; end or cancel it first");
    if (!ctx->locked)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "step_begin: no sequence exists yet");
    if (n_seqs < 1 || n_seqs > ctx->lo.max_seqs)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "step_begin: n_seqs = %d is outside [1, %d]", n_seqs, ctx->lo.max_seqs);
    if (!seqs || !modes || !n_tokens)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "step_begin: %s is NULL",
                         !seqs ? "seqs" : !modes ? "modes" : "n_tokens");

    /* 1. validate, without changing anything */
    const resa_layout *lo = &ctx->lo;
    int32_t *mark = ctx->scratch_slots; /* all zero between calls */
    int64_t rows = 0, need = 0;
    resa_status s = RESA_OK;
    int32_t i;
    for (i = 0; i < n_seqs && s == RESA_OK; i++) {
        int32_t slot = resa_seq_slot(ctx, seqs[i], NULL);
        if (slot < 0) {
            s = resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                          "step_begin: seqs[%d] = %d is not a live sequence id", i, seqs[i]);
            break;
        }
        if (mark[slot]) {
            s = resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                          "step_begin: seqs[%d] = %d appears twice in the batch", i, seqs[i]);
            break;
        }
        mark[slot] = 1;
        s = check_entry(ctx, i, slot, modes[i], n_tokens[i], &need);
        rows += n_tokens[i] > 0 ? n_tokens[i] : 0;
    }
    for (int32_t j = 0; j < i && j < n_seqs; j++) /* clear the marks we set */
        mark[seqs[j] & 0xffff] = 0;
    if (s != RESA_OK)
        return s;
    need += count_copies(ctx, n_seqs, seqs, modes, n_tokens);
    uint64_t shape = step_shape(ctx, n_seqs, seqs, modes, n_tokens);
    if ((flags & RESA_STEP_REPLAY) && !was_captured(ctx, shape))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "step_begin: flags: RESA_STEP_REPLAY, but no CUDA graph was captured "
                         "from a step of this shape (entries, modes, token counts, scale, "
                         "local and sink blocks)");
    if (rows > lo->max_step_tokens)
        return resa_fail(ctx, RESA_ERR_CAPACITY,
                         "step_begin: %lld tokens in the step, over RESA_PARAM_MAX_STEP_TOKENS (%lld)",
                         (long long)rows, (long long)lo->max_step_tokens);
    if (need > ctx->pool.n_free)
        return resa_fail(ctx, RESA_ERR_CAPACITY,
                         "step_begin: the step needs %lld free pages, the pool has %d "
                         "(RESA_PARAM_MAX_TOKENS)", (long long)need, ctx->pool.n_free);

    /* 2. reserve pages and resolve the entries (cannot fail for capacity now) */
    resa_step *st = &ctx->step;
    memset(st, 0, sizeof *st);
    st->entries = ctx->step_entries;
    st->local_blocks = (int32_t)ctx->cfg.local_blocks;
    st->sink_blocks = (int32_t)ctx->cfg.sink_blocks;
    st->score_width = (float)ctx->cfg.score_width;
    st->group_score = (int32_t)ctx->cfg.group_score;
    st->scale = ctx->cfg.softmax_scale > 0 ? (float)ctx->cfg.softmax_scale
                                           : (float)(1.0 / sqrt((double)lo->d));
    int64_t row = 0;
    for (i = 0; i < n_seqs; i++) {
        int32_t slot = seqs[i] & 0xffff;
        resa_seq *q = &ctx->seqs[slot];
        resa_step_entry *e = &ctx->step_entries[i];
        memset(e, 0, sizeof *e);
        e->slot = slot;
        e->mode = modes[i];
        e->n = n_tokens[i];
        e->row = row;
        e->old_length = q->length;
        e->pages = q->pages;
        ctx->step_new_pages[i] = 0;
        if (e->mode == RESA_MODE_RECTIFY) {
            e->start = q->rect_start;
            e->end = q->rect_start + e->n;
            int32_t first, last;
            rectify_pages(q, e->n, lo->log2_b, &first, &last);
            for (int32_t p = first; p <= last; p++) {
                int32_t old = q->pages[p];
                if (ctx->pool.refcount[old] <= 1)
                    continue;
                int32_t fresh = resa_pool_take(&ctx->pool);
                s = ctx->ops->copy_pages(ctx, 1, &fresh, &old);
                if (s != RESA_OK) {
                    resa_pool_unref(&ctx->pool, fresh);
                    return_growth(ctx, i);
                    return s;
                }
                resa_pool_unref(&ctx->pool, old);
                q->pages[p] = fresh;
                if (q->dev_synced > p)
                    q->dev_synced = p;
            }
        } else if (!resa_mode_stores(e->mode)) {
            e->start = q->length; /* QUERY rows come after every stored token */
            e->end = q->length;   /* keys they may see: [0, length) */
        } else {
            e->start = q->length;
            e->end = q->length + e->n;
            int32_t want = blocks_for(e->end, lo->b);
            while (q->n_pages < want) {
                q->pages[q->n_pages++] = resa_pool_take(&ctx->pool);
                ctx->step_new_pages[i]++;
            }
        }
        e->n_pages = q->n_pages;
        e->valid = e->end > e->old_length ? e->end : e->old_length;
        e->first_block = (int32_t)(q->first_token >> lo->log2_b);
        if (resa_mode_sparse(e->mode)) {
            /* The budget and the forced blocks come from the whole sequence
             * (over every context of a split one); this context attends only
             * its own blocks. */
            int64_t global_pos = e->mode == RESA_MODE_DECODE
                                     ? q->first_token + q->length
                                     : (q->global_length >= 0 ? q->global_length
                                                              : q->first_token + q->length);
            e->n_blocks = blocks_for(global_pos + 1, lo->b);
            e->local_blocks = e->mode == RESA_MODE_DECODE ? blocks_for(e->end, lo->b)
                                                          : q->n_pages;
            e->n_select = resa_select_budget(e->n_blocks, ctx->cfg.select_fraction,
                                             ctx->cfg.min_blocks, ctx->cfg.local_blocks,
                                             ctx->cfg.sink_blocks);
            e->n_pick = e->n_select < e->n_blocks
                            ? e->n_select - resa_forced_blocks(e->n_blocks, ctx->cfg.local_blocks,
                                                               ctx->cfg.sink_blocks)
                            : 0;
            st->n_sparse++;
            if (e->mode == RESA_MODE_DECODE)
                st->n_decode++;
        }
        if (e->mode != RESA_MODE_APPEND_KV)
            st->has_output = 1;
        if (resa_mode_stores(e->mode))
            st->has_kv = 1;
        row += e->n;
    }
    st->n_entries = n_seqs;
    st->n_rows = row;
    st->shape = shape;
    st->replay = (flags & RESA_STEP_REPLAY) != 0;
    s = ctx->ops->step_prepare(ctx, st);
    if (s != RESA_OK) {
        return_growth(ctx, n_seqs);
        return s;
    }
    /* a replayed step's layers run in the host's graph launch */
    memset(ctx->layer_done, st->replay ? 1 : 0, (size_t)lo->n_layers);
    ctx->step_open = 1;
    return RESA_OK;
}

resa_status resa_open_step_preamble(resa_ctx *ctx, const char *what, uint32_t flags,
                                    const char *replay_hint)
{
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, what);
    if (flags != 0)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: flags = 0x%x must be 0", what,
                         flags);
    if (!ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "%s: no step is open", what);
    if (ctx->step.replay)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "%s: the step was begun with RESA_STEP_REPLAY%s",
                         what, replay_hint);
    return RESA_OK;
}

/* step_attend and step_attend_ex: checks, then the backend. */
static resa_status attend(resa_ctx *ctx, const char *what, int32_t layer, const void *q,
                          const void *k, const void *v, void *out, const resa_attend_extra *x,
                          uint32_t flags)
{
    resa_status s = resa_open_step_preamble(ctx, what, flags,
                                            "; launch the captured graph instead");
    if (s != RESA_OK)
        return s;
    if (layer < 0 || layer >= ctx->lo.n_layers)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "%s: layer %d is outside [0, %d) (RESA_PARAM_NUM_LAYERS)", what,
                         layer, ctx->lo.n_layers);
    if (ctx->step.has_kv && (!k || !v))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "%s: %s is NULL but the step has entries that store K/V", what,
                         !k ? "k" : "v");
    if (ctx->step.has_output && (!q || !out))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "%s: %s is NULL but the step has entries with attention", what,
                         !q ? "q" : "out");
    if (!x->threshold_scores != !x->threshold_blocks)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "%s: %s is NULL but %s is not; pass both or neither", what,
                         !x->threshold_scores ? "threshold_scores" : "threshold_blocks",
                         !x->threshold_scores ? "threshold_blocks" : "threshold_scores");
    if (x->threshold_scores && ctx->step.n_sparse > 0 &&
        ctx->step.group_score == RESA_GROUP_SCORE_HEAD_SHARE)
        return resa_fail(ctx, RESA_ERR_NOT_SUPPORTED,
                         "%s: threshold_scores: the two-phase selection ranks with "
                         "RESA_GROUP_SCORE_POOLED only (HEAD_SHARE's ranking needs a softmax "
                         "over every block of the sequence)", what);
    s = ctx->ops->step_attend(ctx, &ctx->step, layer, q, k, v, out, x);
    if (s == RESA_OK)
        ctx->layer_done[layer] = 1;
    return s;
}

resa_status resa_ctx_step_attend(resa_ctx *ctx, int32_t layer, const void *q, const void *k,
                                 const void *v, void *out, uint32_t flags)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    const resa_attend_extra none = {NULL, NULL, NULL};
    return attend(ctx, "step_attend", layer, q, k, v, out, &none, flags);
}

resa_status resa_ctx_step_attend_ex(resa_ctx *ctx, int32_t layer, const void *q, const void *k,
                                    const void *v, void *out, float *lse,
                                    const float *threshold_scores,
                                    const int32_t *threshold_blocks, uint32_t flags)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    const resa_attend_extra x = {lse, threshold_scores, threshold_blocks};
    return attend(ctx, "step_attend_ex", layer, q, k, v, out, &x, flags);
}

resa_status resa_ctx_step_end(resa_ctx *ctx, uint32_t flags)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "step_end");
    if (flags != 0)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "step_end: flags = 0x%x must be 0",
                         flags);
    if (!ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "step_end: no step is open");
    for (int32_t l = 0; l < ctx->lo.n_layers; l++)
        if (!ctx->layer_done[l])
            return resa_fail(ctx, RESA_ERR_BAD_STATE,
                             "step_end: layer %d was not attended; attend it or cancel the step",
                             l);
    /* A device fault the step's work (or earlier work) already hit is
     * reported here, and the step is not committed; no waiting. */
    if (ctx->ops->check) {
        resa_status s = ctx->ops->check(ctx);
        if (s != RESA_OK)
            return s;
    }
    const resa_step *st = &ctx->step;
    for (int32_t i = 0; i < st->n_entries; i++) {
        const resa_step_entry *e = &st->entries[i];
        resa_seq *q = &ctx->seqs[e->slot];
        if (!resa_mode_stores(e->mode))
            continue; /* QUERY entries store nothing */
        if (e->mode == RESA_MODE_RECTIFY) {
            q->rect_start = e->end; /* the oldest pending tokens are now exact */
            continue;
        }
        if (q->global_length >= 0) /* the tail grows with this context */
            q->global_length = q->first_token + e->end;
        int none_pending = q->rect_start == q->length;
        q->length = e->end;
        /* A decode that attended a true subset of the blocks is approximate:
         * it starts the pending span.  Dense work after it joins the span. */
        int approximate = e->mode == RESA_MODE_DECODE && e->n_select < e->n_blocks;
        if (none_pending && !approximate)
            q->rect_start = q->length;
        else if (none_pending)
            q->rect_start = e->start;
        ctx->step_new_pages[i] = 0;
    }
    ctx->step_open = 0;
    return RESA_OK;
}

resa_status resa_ctx_step_cancel(resa_ctx *ctx)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "step_cancel");
    if (!ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "step_cancel: no step is open");
    const resa_step *st = &ctx->step;
    int wrote = 0;
    for (int32_t l = 0; l < ctx->lo.n_layers; l++)
        wrote |= ctx->layer_done[l];
    resa_status first = RESA_OK;
    for (int32_t i = 0; wrote && i < st->n_entries; i++) {
        const resa_step_entry *e = &st->entries[i];
        /* The partial block the step appended into holds summaries of tokens
         * that are now gone: recompute it over the tokens that remain. */
        if (e->mode != RESA_MODE_RECTIFY && resa_mode_stores(e->mode) &&
            e->old_length % ctx->lo.b != 0) {
            resa_status s = ctx->ops->refresh_summaries(ctx, e->pages, e->old_length - 1,
                                                        e->old_length, e->old_length);
            if (first == RESA_OK)
                first = s;
        }
    }
    return_growth(ctx, st->n_entries);
    ctx->step_open = 0;
    return first;
}
