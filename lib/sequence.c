/* SPDX-License-Identifier: MIT */
/* Sequences: create, release, fork and the per-sequence queries. */
#include <string.h>

#include "backend.h"
#include "pool.h"
#include "sequence.h"

int32_t resa_seq_id(const resa_ctx *ctx, int32_t slot)
{
    return ((ctx->seqs[slot].generation & 0x7fff) << 16) | slot;
}

int32_t resa_seq_slot(resa_ctx *ctx, int32_t id, const char *what)
{
    int32_t slot = id & 0xffff;
    if (ctx->locked && id >= 0 && slot < ctx->lo.max_seqs && ctx->seqs[slot].in_use &&
        resa_seq_id(ctx, slot) == id)
        return slot;
    if (what)
        resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: %d is not a live sequence id", what, id);
    return -1;
}

static int32_t free_slot(const resa_ctx *ctx)
{
    for (int32_t i = 0; i < ctx->lo.max_seqs; i++)
        if (!ctx->seqs[i].in_use)
            return i;
    return -1;
}

static resa_status seq_preamble(resa_ctx *ctx, const char *what)
{
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, what);
    if (ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "%s: a step is open; end or cancel it first",
                         what);
    return RESA_OK;
}

resa_status resa_seq_create(resa_ctx *ctx, int32_t *seq)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = seq_preamble(ctx, "seq_create");
    if (s != RESA_OK)
        return s;
    if (!seq)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "seq_create: seq is NULL");
    s = resa_ctx_lock(ctx);
    if (s != RESA_OK)
        return s;
    int32_t slot = free_slot(ctx);
    if (slot < 0)
        return resa_fail(ctx, RESA_ERR_CAPACITY,
                         "seq_create: all %d sequence slots (RESA_PARAM_MAX_SEQUENCES) are in use",
                         ctx->lo.max_seqs);
    if (ctx->cfg.record_selection) {
        s = ctx->ops->clear_selection(ctx, slot);
        if (s != RESA_OK)
            return s;
    }
    resa_seq *q = &ctx->seqs[slot];
    q->in_use = 1;
    q->length = 0;
    q->rect_start = 0;
    q->n_pages = 0;
    q->dev_synced = 0;
    q->first_token = 0;
    q->global_length = -1;
    *seq = resa_seq_id(ctx, slot);
    return RESA_OK;
}

static void release_slot(resa_ctx *ctx, int32_t slot)
{
    resa_seq *q = &ctx->seqs[slot];
    for (int32_t i = 0; i < q->n_pages; i++)
        resa_pool_unref(&ctx->pool, q->pages[i]);
    q->n_pages = 0;
    q->length = 0;
    q->rect_start = 0;
    q->in_use = 0;
    q->generation = (q->generation + 1) & 0x7fff;
}

resa_status resa_seq_release(resa_ctx *ctx, int32_t seq)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = seq_preamble(ctx, "seq_release");
    if (s != RESA_OK)
        return s;
    int32_t slot = resa_seq_slot(ctx, seq, "seq_release: seq");
    if (slot < 0)
        return RESA_ERR_INVALID_ARGUMENT;
    release_slot(ctx, slot);
    return RESA_OK;
}

resa_status resa_seq_fork(resa_ctx *ctx, int32_t parent, int32_t *child)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = seq_preamble(ctx, "seq_fork");
    if (s != RESA_OK)
        return s;
    int32_t ps = resa_seq_slot(ctx, parent, "seq_fork: parent");
    if (ps < 0)
        return RESA_ERR_INVALID_ARGUMENT;
    if (!child)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "seq_fork: child is NULL");
    int32_t cs = free_slot(ctx);
    if (cs < 0)
        return resa_fail(ctx, RESA_ERR_CAPACITY,
                         "seq_fork: all %d sequence slots (RESA_PARAM_MAX_SEQUENCES) are in use",
                         ctx->lo.max_seqs);
    const resa_seq *p = &ctx->seqs[ps];
    int partial = p->length % ctx->lo.b != 0;
    int32_t copy = -1;
    if (partial) {
        copy = resa_pool_take(&ctx->pool);
        if (copy < 0)
            return resa_fail(ctx, RESA_ERR_CAPACITY,
                             "seq_fork: no free page for the copy of the partial last block");
        int32_t src = p->pages[p->n_pages - 1];
        s = ctx->ops->copy_pages(ctx, 1, &copy, &src);
        if (s != RESA_OK) {
            resa_pool_unref(&ctx->pool, copy);
            return s;
        }
    }
    if (ctx->cfg.record_selection) {
        s = ctx->ops->clear_selection(ctx, cs);
        if (s != RESA_OK) {
            if (copy >= 0)
                resa_pool_unref(&ctx->pool, copy);
            return s;
        }
    }
    resa_seq *c = &ctx->seqs[cs];
    c->in_use = 1;
    c->length = p->length;
    c->rect_start = p->rect_start;
    c->n_pages = p->n_pages;
    c->dev_synced = 0;
    c->first_token = p->first_token;
    c->global_length = p->global_length;
    int32_t shared = partial ? p->n_pages - 1 : p->n_pages;
    for (int32_t i = 0; i < shared; i++) {
        c->pages[i] = p->pages[i];
        resa_pool_ref(&ctx->pool, p->pages[i]);
    }
    if (partial)
        c->pages[shared] = copy;
    *child = resa_seq_id(ctx, cs);
    return RESA_OK;
}

/* Queries take a const context; only its error text changes. */
static resa_status query_slot(const resa_ctx *cctx, int32_t seq, const void *out,
                              const char *what, const char *out_name, int32_t *slot)
{
    resa_ctx *ctx = (resa_ctx *)cctx;
    resa_clear_error(ctx);
    *slot = resa_seq_slot(ctx, seq, NULL);
    if (*slot < 0)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: seq %d is not a live sequence id",
                         what, seq);
    if (!out)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "%s: %s is NULL", what, out_name);
    return RESA_OK;
}

resa_status resa_seq_length(const resa_ctx *ctx, int32_t seq, int64_t *length)
{
    int32_t slot;
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = query_slot(ctx, seq, length, "seq_length", "length", &slot);
    if (s == RESA_OK)
        *length = ctx->seqs[slot].length;
    return s;
}

resa_status resa_seq_pending(const resa_ctx *ctx, int32_t seq, int64_t *pending)
{
    int32_t slot;
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = query_slot(ctx, seq, pending, "seq_pending", "pending", &slot);
    if (s == RESA_OK)
        *pending = ctx->seqs[slot].length - ctx->seqs[slot].rect_start;
    return s;
}

resa_status resa_seq_rectify_due(const resa_ctx *ctx, int32_t seq, int32_t *due)
{
    int32_t slot;
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = query_slot(ctx, seq, due, "seq_rectify_due", "due", &slot);
    if (s == RESA_OK) {
        int64_t pending = ctx->seqs[slot].length - ctx->seqs[slot].rect_start;
        int64_t f = ctx->cfg.rectify_interval;
        *due = f > 0 && pending >= f;
    }
    return s;
}

resa_status resa_ctx_free_tokens(const resa_ctx *cctx, int64_t *tokens)
{
    resa_ctx *ctx = (resa_ctx *)cctx;
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (!tokens)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "free_tokens: tokens is NULL");
    if (!ctx->locked) /* the pool does not exist yet: all of it will be free */
        *tokens = (ctx->cfg.max_tokens + ctx->cfg.block_size - 1) / ctx->cfg.block_size *
                  ctx->cfg.block_size;
    else
        *tokens = (int64_t)ctx->pool.n_free * ctx->lo.b;
    return RESA_OK;
}

resa_status resa_seq_selected_blocks(resa_ctx *ctx, int32_t seq, int32_t layer, int32_t kv_head,
                                     int32_t *blocks, int64_t capacity, int64_t *count)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    if (ctx->device_lost) /* it reads the device */
        return resa_refuse_lost(ctx, "seq_selected_blocks");
    int32_t slot;
    resa_status s = query_slot(ctx, seq, count, "seq_selected_blocks", "count", &slot);
    if (s != RESA_OK)
        return s;
    if (!ctx->cfg.record_selection)
        return resa_fail(ctx, RESA_ERR_BAD_STATE,
                         "seq_selected_blocks: set RESA_PARAM_RECORD_SELECTION = 1 before the "
                         "first sequence to record selections");
    if (layer < 0 || layer >= ctx->lo.n_layers)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "seq_selected_blocks: layer %d is outside [0, %d)", layer,
                         ctx->lo.n_layers);
    if (kv_head < 0 || kv_head >= ctx->lo.hkv)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "seq_selected_blocks: kv_head %d is outside [0, %d)", kv_head,
                         ctx->lo.hkv);
    if (capacity < 0 || (capacity > 0 && !blocks))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "seq_selected_blocks: blocks is NULL or capacity (%lld) is negative",
                         (long long)capacity);
    if (ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE,
                         "seq_selected_blocks: a step is open; end or cancel it first");
    /* Introspection is off the hot path: a large bitmap may be allocated. */
    int32_t words = ctx->lo.sel_words;
    uint32_t stack[256];
    uint32_t *bits = words <= 256 ? stack : resa_alloc(ctx, sizeof(uint32_t) * (size_t)words);
    if (!bits)
        return resa_fail(ctx, RESA_ERR_OUT_OF_MEMORY, "seq_selected_blocks: host allocation");
    s = ctx->ops->read_selection(ctx, slot, layer, kv_head, bits);
    int64_t n = 0;
    for (int32_t w = 0; s == RESA_OK && w < words; w++)
        for (uint32_t x = bits[w]; x; x &= x - 1) {
            if (n < capacity) /* global indices (resa_seq_set_span) */
                blocks[n] = (int32_t)(ctx->seqs[slot].first_token >> ctx->lo.log2_b) + w * 32 +
                            __builtin_ctz(x);
            n++;
        }
    if (bits != stack)
        resa_free(ctx, bits);
    if (s != RESA_OK)
        return s;
    *count = n;
    return RESA_OK;
}

resa_status resa_seq_set_span(resa_ctx *ctx, int32_t seq, int64_t first_token,
                              int64_t global_length)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_status s = seq_preamble(ctx, "seq_set_span");
    if (s != RESA_OK)
        return s;
    int32_t slot = resa_seq_slot(ctx, seq, "seq_set_span: seq");
    if (slot < 0)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_seq *q = &ctx->seqs[slot];
    const int64_t b = ctx->lo.b;
    /* Global block indices stay below 2^30 (int32 in every kernel, with room). */
    const int64_t limit = ((int64_t)1 << 30) * b;
    if (first_token < 0 || first_token % b != 0 || first_token >= limit)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "seq_set_span: first_token = %lld must be a multiple of "
                         "RESA_PARAM_BLOCK_SIZE (%lld) in [0, 2^30 blocks), so that this "
                         "context's blocks are the sequence's blocks",
                         (long long)first_token, (long long)b);
    if (q->length > 0 && first_token != q->first_token)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "seq_set_span: first_token = %lld, but the sequence already holds "
                         "tokens from %lld; it may change only while the sequence is empty",
                         (long long)first_token, (long long)q->first_token);
    if (global_length != -1 &&
        (global_length < first_token + q->length || global_length >= limit - b))
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "seq_set_span: global_length = %lld must be -1 or at least "
                         "first_token + length = %lld (and below (2^30 - 1) blocks, so "
                         "that the row at global_length leaves fewer than 2^30 blocks)",
                         (long long)global_length, (long long)(first_token + q->length));
    q->first_token = first_token;
    q->global_length = global_length;
    return RESA_OK;
}
