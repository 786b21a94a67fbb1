/* SPDX-License-Identifier: MIT */
/*
 * An independent, naive float64 reference of what libresa computes and
 * stores: dtype rounding, dense causal attention, block summaries, block
 * scores, the budget and the selection, and a model of the cache of each
 * sequence (per layer, per position, K/V as the values rounded to KV_DTYPE).
 * Nothing here calls or includes the library's private code.
 */
#ifndef RESA_TEST_REF_H
#define RESA_TEST_REF_H

#include <stddef.h>
#include <stdint.h>

#include "resa.h"

typedef struct ref_params {
    int32_t n_layers, hq, hkv, d, b;
    resa_dtype kv_dtype, io_dtype;
    double fraction;       /* r */
    int64_t min_blocks;    /* n_min */
    int64_t local_blocks, sink_blocks;
    int64_t interval;      /* f */
    double scale;          /* 0 = 1/sqrt(d) */
    double score_width;    /* w of the block score (RESA_PARAM_SCORE_WIDTH), default 0.5 */
    int32_t group_score;   /* resa_group_score (RESA_PARAM_GROUP_SCORE), default POOLED */
    int32_t summary_fp8;   /* RESA_PARAM_SUMMARY_FORMAT = RESA_SUMMARY_FP8_E4M3 */
    int32_t fp8_exact;     /* the attention (ref_attend*, ref_explain_block) reads an
                              fp8 cache's exact products e4m3 * scale, not their
                              IO_DTYPE rounding: what CUDA's sparse decode and
                              Hopper's wgmma dense kernel attend (docs/API.md,
                              "fp8 KV cache"); the summaries read the rounding */
} ref_params;

/* The defaults documented in resa.h (shape: 1 layer, 1/1 heads, d 128, f32). */
void ref_params_default(ref_params *p);
double ref_scale(const ref_params *p);

/* ---- dtypes (round to nearest even, written from the IEEE definitions) ---- */
size_t ref_dtype_size(resa_dtype t);
/* x rounded to the nearest value of type t (overflow to +-inf for f16; for
 * FP8_E4M3 the unscaled e4m3 value, ref_e4m3_rne). */
double ref_round(resa_dtype t, double x);
/* Element i of a buffer of type t. */
double ref_load(resa_dtype t, const void *buf, size_t i);
/* Stores ref_round(t, x) as element i of a buffer of type t. */
void ref_store(resa_dtype t, void *buf, size_t i, double x);

/* ---- the budget rule ---- */
int64_t ref_forced_count(int64_t M, int64_t local, int64_t sink);
int ref_is_forced(int64_t blk, int64_t M, int64_t local, int64_t sink);
int64_t ref_budget(int64_t M, double r, int64_t n_min, int64_t local, int64_t sink);
int64_t ref_blocks(int64_t tokens, int32_t b); /* ceil(tokens / b) */

/* ---- the cache model of one sequence ---- */
typedef struct ref_seq {
    int64_t len;          /* tokens stored */
    int64_t rect_start;   /* first pending position; == len when none */
    int64_t cap;          /* positions allocated */
    int32_t n_layers, hkv, d;
    double **k, **v;      /* [layer] -> [cap][hkv][d], values as stored (rounded; an
                             fp8 cache: dequantized, ref_fp8_quantize) */
    double **ks, **vs;    /* [layer] -> [cap][hkv]: an fp8 cache's K and V scales */
    double **kx, **vx;    /* an fp8 cache: [layer] -> [cap][hkv][d], the exact products
                             e4m3 * scale (k, v are their IO_DTYPE rounding); else NULL */
} ref_seq;

ref_seq *ref_seq_new(const ref_params *p, int64_t cap);
ref_seq *ref_seq_clone(const ref_seq *s);
void ref_seq_free(ref_seq *s);
int64_t ref_seq_pending(const ref_seq *s);
static inline double *ref_k(const ref_seq *s, int32_t layer, int64_t pos, int32_t h)
{
    return s->k[layer] + ((size_t)pos * (size_t)s->hkv + (size_t)h) * (size_t)s->d;
}
static inline double *ref_v(const ref_seq *s, int32_t layer, int64_t pos, int32_t h)
{
    return s->v[layer] + ((size_t)pos * (size_t)s->hkv + (size_t)h) * (size_t)s->d;
}
static inline double *ref_kx(const ref_seq *s, int32_t layer, int64_t pos, int32_t h)
{
    return s->kx[layer] + ((size_t)pos * (size_t)s->hkv + (size_t)h) * (size_t)s->d;
}
static inline double *ref_vx(const ref_seq *s, int32_t layer, int64_t pos, int32_t h)
{
    return s->vx[layer] + ((size_t)pos * (size_t)s->hkv + (size_t)h) * (size_t)s->d;
}
static inline double *ref_scale_at(const ref_seq *s, int is_v, int32_t layer, int64_t pos,
                                   int32_t h)
{
    return (is_v ? s->vs : s->ks)[layer] + (size_t)pos * (size_t)s->hkv + (size_t)h;
}

/* Writes n rows of IO-dtype K/V (layout [rows][hkv][d], starting at row `row`)
 * to positions [pos, pos + n) of one layer, rounded to KV_DTYPE. */
void ref_write_kv(const ref_params *p, ref_seq *s, int32_t layer, int64_t pos, int64_t n,
                  const void *k, const void *v, int64_t row);

/* Commits a step entry to the model (lengths and the pending span; RECTIFY
 * of n tokens makes the oldest n pending tokens exact).  n_select/n_blocks
 * only matter for DECODE. */
void ref_commit(ref_seq *s, int32_t mode, int64_t n, int64_t n_select, int64_t n_blocks);

/* ---- summaries, scores, selection ---- */
/* Element-wise min/max of the stored keys of block blk over positions < valid. */
void ref_block_minmax(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      int64_t blk, int64_t valid, double *kmin, double *kmax);
/* ---- fp8 e4m3 summaries, from the OCP FP8 definition (a table, not bit tricks) ---- */
/* Value of an e4m3 byte (bias 7, 3 mantissa bits, 0x7f/0xff NaN). */
double ref_e4m3_value(uint8_t byte);
/* x to the nearest e4m3 value (table search), ties to the even byte,
 * saturating at +-448 (infinities too), NaN kept, the sign of zero kept. */
double ref_e4m3_rne(double x);
/* The byte of an e4m3 value (0x7f for NaN). */
uint8_t ref_e4m3_byte(double v);
/* The fp8 KV cache (docs/API.md, "fp8 KV cache"), from its definition: the
 * head vector x[d] (IO values) as it reads back, out[d] = IO(fp32(e4m3(
 * fp32(x / scale)) * scale)), scale = fp32(amax / 448) (NaN with a NaN in x,
 * 2^-149 where it underflows), in *scale_out; exact[d] (if not NULL) gets the
 * products before the IO rounding, fp32(e4m3 * scale). */
void ref_fp8_quantize(resa_dtype io, const double *x, int32_t d, double *out, double *exact,
                      double *scale_out);
/* Smallest integer s with amax <= 448 * 2^s, clamped to [-128, 127]; 0 for amax 0. */
int ref_fp8_scale(double amax);
/* x * 2^-s rounded to the e4m3 value toward +inf (up) or -inf (!up), times 2^s. */
double ref_e4m3_outward(double x, int s, int up);
/* The summary the library keeps: ref_block_minmax, then with p->summary_fp8
 * each min rounded down and max rounded up to e4m3 under the block's scale
 * (*exp_out, if not NULL). */
void ref_block_summary(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                       int64_t blk, int64_t valid, double *kmin, double *kmax, int *exp_out);
/* Pooled query of KV head h from the q rows (IO dtype, [rows][hq][d]) at row. */
void ref_pooled_query(const ref_params *p, const void *q, int64_t row, int32_t h, double *qp);
/* Scores of blocks [0, M) over positions < valid.  Also returns in *mag (if
 * not NULL) a per-block magnitude sum_j |qp_j| * max(|kmin_j|, |kmax_j|) for
 * rounding tolerances. */
void ref_block_scores(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      const double *qp, int64_t M, int64_t valid, double *scores, double *mag);
/* The scores the selection ranks for KV head h of the query row `row` of q
 * (IO dtype, [rows][hq][d]), per p->group_score: POOLED, ref_block_scores of
 * the pooled query; HEAD_SHARE, log sum_j exp(s_ji - lse_j) over the group's
 * heads j, s_ji = head j's score of block i times the softmax scale, lse_j its
 * log-sum-exp over all M blocks.  *mag (if not NULL) bounds the rounding of
 * each score as ref_block_scores' does (HEAD_SHARE: the largest of the heads'
 * magnitudes in logits plus the largest over all blocks, which the
 * normalisers carry). */
void ref_group_scores(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      const void *q, int64_t row, int64_t M, int64_t valid, double *scores,
                      double *mag);
/* The selection: forced blocks, then the best others by score descending,
 * index ascending.  Writes the n chosen blocks in ascending order; returns n. */
int64_t ref_select(const ref_params *p, const double *scores, int64_t M, int32_t *sel);

/* Softmax attention of one query vector (IO values as doubles) over the
 * positions [0, end) of one layer and KV head; when blocks != NULL only the
 * positions of those blocks.  out[d]. */
void ref_attend(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                const double *q, int64_t end, const int32_t *blocks, int64_t n_blocks,
                double *out);

/* Why a backend's attention row `got` is wrong: of the blocks ref_attend
 * attends (same arguments), the one whose omission best accounts for
 * got - ref, by the least-squares fit got - ref ~ alpha (ref without the
 * block - ref).  Returns that block, or -1 (nothing attended, or got == ref),
 * with *alpha (1: the block was left out; -1: counted twice; otherwise read
 * wrongly) and *explained, the share of |got - ref|^2 the fit accounts for
 * (0 to 1).  For the harness's failure messages: a race that loses or garbles
 * one block's K/V shows as one block with a share near 1. */
int64_t ref_explain_block(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                          const double *q, int64_t end, const int32_t *blocks, int64_t n_blocks,
                          const double *got, double *alpha, double *explained);
/* ref_attend over the positions >= begin only (a context's part of a split
 * sequence), returning the log-sum-exp log sum exp(scale q.k) of the keys
 * attended (-inf, and out = 0, when there is none). */
double ref_attend_lse(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      const double *q, int64_t begin, int64_t end, const int32_t *blocks,
                      int64_t n_blocks, double *out);

/* ---- small helpers ---- */
typedef struct ref_rng { uint64_t s; } ref_rng;
uint64_t ref_rng_next(ref_rng *r);
double ref_rng_uniform(ref_rng *r);     /* [0, 1) */
double ref_rng_normal(ref_rng *r);
int64_t ref_rng_range(ref_rng *r, int64_t lo, int64_t hi); /* [lo, hi] */

#endif
