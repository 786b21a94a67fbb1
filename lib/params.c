/* SPDX-License-Identifier: MIT */
/*
 * The parameter table: one row per resa_param with its type, default, bounds
 * and whether it locks with the pool.  Everything about parameters is driven
 * from this table so that a new parameter is one new row.
 */
#include <math.h>
#include <stddef.h>

#include "internal.h"

typedef struct param_row {
    resa_param id;
    const char *name;
    int is_real;      /* set with the _f64 functions */
    int locks;        /* fixed once the pool is allocated */
    double def, lo, hi;
    size_t offset;    /* field of resa_config: int64_t or double */
} param_row;

#define INT_ROW(id, field, locks, def, lo, hi) \
    { id, #id, 0, locks, def, lo, hi, offsetof(resa_config, field) }
#define REAL_ROW(id, field, locks, def, lo, hi) \
    { id, #id, 1, locks, def, lo, hi, offsetof(resa_config, field) }

static const param_row rows[] = {
    INT_ROW(RESA_PARAM_NUM_LAYERS, n_layers, 1, 1, 1, 4096),
    INT_ROW(RESA_PARAM_NUM_Q_HEADS, n_q_heads, 1, 1, 1, 1024),
    INT_ROW(RESA_PARAM_NUM_KV_HEADS, n_kv_heads, 1, 1, 1, 1024),
    INT_ROW(RESA_PARAM_HEAD_DIM, head_dim, 1, 128, 1, RESA_MAX_HEAD_DIM),
    INT_ROW(RESA_PARAM_KV_DTYPE, kv_dtype, 1, RESA_DTYPE_F32, RESA_DTYPE_F32,
            RESA_DTYPE_FP8_E4M3),
    INT_ROW(RESA_PARAM_IO_DTYPE, io_dtype, 1, RESA_DTYPE_F32, RESA_DTYPE_F32, RESA_DTYPE_BF16),
    INT_ROW(RESA_PARAM_MAX_TOKENS, max_tokens, 1, 65536, 1, (double)(1ll << 40)),
    INT_ROW(RESA_PARAM_MAX_SEQUENCES, max_seqs, 1, 64, 1, 65535),
    INT_ROW(RESA_PARAM_MAX_SEQ_TOKENS, max_seq_tokens, 1, 0, 0, (double)(1ll << 40)),
    INT_ROW(RESA_PARAM_MAX_STEP_TOKENS, max_step_tokens, 1, 8192, 1, (double)(1ll << 30)),
    INT_ROW(RESA_PARAM_SUMMARY_FORMAT, summary_format, 1, RESA_SUMMARY_FP8_E4M3,
            RESA_SUMMARY_KV_DTYPE, RESA_SUMMARY_FP8_E4M3),
    INT_ROW(RESA_PARAM_BLOCK_SIZE, block_size, 1, RESA_DEFAULT_BLOCK_SIZE, 1, 256),
    REAL_ROW(RESA_PARAM_SELECT_FRACTION, select_fraction, 0, 0.15, 0.0, 1.0),
    INT_ROW(RESA_PARAM_SELECT_MIN_BLOCKS, min_blocks, 0, 16, 0, (double)(1ll << 30)),
    INT_ROW(RESA_PARAM_LOCAL_BLOCKS, local_blocks, 0, 1, 1, (double)(1ll << 30)),
    INT_ROW(RESA_PARAM_SINK_BLOCKS, sink_blocks, 0, 1, 0, (double)(1ll << 30)),
    INT_ROW(RESA_PARAM_RECTIFY_INTERVAL, rectify_interval, 0, 128, 0, (double)(1ll << 30)),
    REAL_ROW(RESA_PARAM_SOFTMAX_SCALE, softmax_scale, 0, 0.0, 0.0, 1e6),
    REAL_ROW(RESA_PARAM_SCORE_WIDTH, score_width, 0, 0.5, 0.0, 1.0),
    INT_ROW(RESA_PARAM_GROUP_SCORE, group_score, 0, RESA_GROUP_SCORE_POOLED,
            RESA_GROUP_SCORE_POOLED, RESA_GROUP_SCORE_HEAD_SHARE),
    INT_ROW(RESA_PARAM_NUM_THREADS, num_threads, 1, 0, 0, 1024),
    INT_ROW(RESA_PARAM_RECORD_SELECTION, record_selection, 1, 0, 0, 1),
};

static const param_row *find(resa_param p)
{
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        if (rows[i].id == p)
            return &rows[i];
    return NULL;
}

const char *resa_param_name(resa_param p)
{
    const param_row *r = find(p);
    return r ? r->name : NULL;
}

static int64_t *int_field(resa_config *c, const param_row *r)
{
    return (int64_t *)(void *)((char *)c + r->offset);
}
static double *real_field(resa_config *c, const param_row *r)
{
    return (double *)(void *)((char *)c + r->offset);
}

void resa_config_defaults(resa_config *c)
{
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        if (rows[i].is_real)
            *real_field(c, &rows[i]) = rows[i].def;
        else
            *int_field(c, &rows[i]) = (int64_t)rows[i].def;
    }
    c->shape_set = 0;
}

/* Checks of one parameter against the others happen when the pool locks
 * (resa_layout_from_config); here only the row's own bounds. */
static resa_status lookup(resa_ctx *ctx, resa_param p, int want_real, const param_row **out)
{
    const param_row *r = find(p);
    if (!r)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "param: unknown resa_param %d", (int)p);
    if (r->is_real != want_real)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "param: %s is %s; use resa_ctx_%s_param%s", r->name,
                         r->is_real ? "real" : "an integer", "set/get",
                         r->is_real ? "_f64" : "");
    *out = r;
    return RESA_OK;
}

static resa_status check_settable(resa_ctx *ctx, const param_row *r)
{
    if (ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "param: %s cannot change inside an open step",
                         r->name);
    if (r->locks && ctx->locked)
        return resa_fail(ctx, RESA_ERR_BAD_STATE,
                         "param: %s is locked once sequences exist; "
                         "resa_ctx_reset(ctx, RESA_RESET_SESSION) unlocks it", r->name);
    return RESA_OK;
}

resa_status resa_ctx_set_param(resa_ctx *ctx, resa_param p, int64_t value)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "set_param");
    const param_row *r = NULL;
    resa_status s = lookup(ctx, p, 0, &r);
    if (s == RESA_OK)
        s = check_settable(ctx, r);
    if (s != RESA_OK)
        return s;
    if (p == RESA_PARAM_IO_DTYPE && value == RESA_DTYPE_FP8_E4M3)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "param: RESA_PARAM_IO_DTYPE cannot be RESA_DTYPE_FP8_E4M3: fp8 is a "
                         "storage type of the cache only (RESA_PARAM_KV_DTYPE); q, k, v and "
                         "out are F32, F16 or BF16");
    if ((double)value < r->lo || (double)value > r->hi)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "param: %s = %lld is outside [%.0f, %.0f]",
                         r->name, (long long)value, r->lo, r->hi);
    if (p == RESA_PARAM_BLOCK_SIZE && (value & (value - 1)) != 0)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "param: RESA_PARAM_BLOCK_SIZE = %lld is not a power of two",
                         (long long)value);
    *int_field(&ctx->cfg, r) = value;
    if (p >= RESA_PARAM_NUM_LAYERS && p <= RESA_PARAM_HEAD_DIM)
        ctx->cfg.shape_set |= 1u << (p - RESA_PARAM_NUM_LAYERS);
    return RESA_OK;
}

resa_status resa_ctx_set_param_f64(resa_ctx *ctx, resa_param p, double value)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "set_param_f64");
    const param_row *r = NULL;
    resa_status s = lookup(ctx, p, 1, &r);
    if (s == RESA_OK)
        s = check_settable(ctx, r);
    if (s != RESA_OK)
        return s;
    if (!(value >= r->lo && value <= r->hi)) /* NaN fails too */
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "param: %s = %g is outside [%g, %g]",
                         r->name, value, r->lo, r->hi);
    *real_field(&ctx->cfg, r) = value;
    return RESA_OK;
}

resa_status resa_ctx_get_param(const resa_ctx *cctx, resa_param p, int64_t *value)
{
    resa_ctx *ctx = (resa_ctx *)cctx; /* only the error text changes */
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    const param_row *r = NULL;
    resa_status s = lookup(ctx, p, 0, &r);
    if (s != RESA_OK)
        return s;
    if (!value)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "get_param: value is NULL");
    *value = *int_field(&ctx->cfg, r);
    if (p == RESA_PARAM_MAX_SEQ_TOKENS && *value == 0)
        *value = ctx->cfg.max_tokens;
    return RESA_OK;
}

resa_status resa_ctx_get_param_f64(const resa_ctx *cctx, resa_param p, double *value)
{
    resa_ctx *ctx = (resa_ctx *)cctx;
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    const param_row *r = NULL;
    resa_status s = lookup(ctx, p, 1, &r);
    if (s != RESA_OK)
        return s;
    if (!value)
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT, "get_param_f64: value is NULL");
    *value = *real_field(&ctx->cfg, r);
    if (p == RESA_PARAM_SOFTMAX_SCALE && *value == 0.0)
        *value = 1.0 / sqrt((double)ctx->cfg.head_dim);
    return RESA_OK;
}

resa_status resa_param_bounds(resa_param p, int64_t *lo, int64_t *hi)
{
    const param_row *r = find(p);
    if (!r || r->is_real || !lo || !hi)
        return RESA_ERR_INVALID_ARGUMENT;
    *lo = (int64_t)r->lo;
    *hi = (int64_t)r->hi;
    return RESA_OK;
}

resa_status resa_param_bounds_f64(resa_param p, double *lo, double *hi)
{
    const param_row *r = find(p);
    if (!r || !r->is_real || !lo || !hi)
        return RESA_ERR_INVALID_ARGUMENT;
    *lo = r->lo;
    *hi = r->hi;
    return RESA_OK;
}
