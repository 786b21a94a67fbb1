/* SPDX-License-Identifier: MIT */
/* The float64 reference (see ref.h).  Deliberately naive. */
#include "ref.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void ref_params_default(ref_params *p)
{
    memset(p, 0, sizeof *p);
    p->n_layers = 1;
    p->hq = 1;
    p->hkv = 1;
    p->d = 128;
    p->b = 16;
    p->kv_dtype = RESA_DTYPE_F32;
    p->io_dtype = RESA_DTYPE_F32;
    p->fraction = 0.1;
    p->min_blocks = 16;
    p->local_blocks = 1;
    p->sink_blocks = 1;
    p->score_width = 0.5;
    p->interval = 32;
    p->scale = 0.0;
}

double ref_scale(const ref_params *p)
{
    return p->scale > 0 ? p->scale : 1.0 / sqrt((double)p->d);
}

/* ------------------------------------------------------------------------ */
/* dtypes                                                                     */
/* ------------------------------------------------------------------------ */
size_t ref_dtype_size(resa_dtype t)
{
    return t == RESA_DTYPE_F32 ? 4 : t == RESA_DTYPE_FP8_E4M3 ? 1 : 2;
}

/* Rounds x to `mant` fraction bits, exponent >= emin (subnormals below), ties to even. */
static double round_bits(double x, int mant, int emin)
{
    if (x == 0.0 || !isfinite(x))
        return x;
    int e;
    (void)frexp(x, &e);       /* |x| in [2^(e-1), 2^e) */
    int q = e - 1 - mant;     /* weight of the last kept bit */
    if (q < emin - mant)
        q = emin - mant;
    double s = ldexp(x, -q);
    double r = s - floor(s) == 0.5 ? (fmod(floor(s), 2.0) == 0.0 ? floor(s) : floor(s) + 1.0)
                                   : floor(s + 0.5);
    return ldexp(r, q);
}

double ref_round(resa_dtype t, double x)
{
    if (isnan(x))
        return x;
    switch (t) {
    case RESA_DTYPE_F32: {
        double r = round_bits(x, 23, -126);
        return fabs(r) > (double)FLT_MAX ? copysign(INFINITY, x) : r;
    }
    case RESA_DTYPE_F16: {
        double r = round_bits(x, 10, -14);
        return fabs(r) > 65504.0 ? copysign(INFINITY, x) : r;
    }
    case RESA_DTYPE_BF16: {
        double r = round_bits(x, 7, -126);
        return fabs(r) > 3.3895313892515355e38 ? copysign(INFINITY, x) : r;
    }
    case RESA_DTYPE_FP8_E4M3:
        return ref_e4m3_rne(x);
    }
    return x;
}

static double f16_decode(uint16_t h)
{
    int sign = h >> 15, ex = (h >> 10) & 31, m = h & 1023;
    double v;
    if (ex == 0)
        v = ldexp((double)m, -24);
    else if (ex == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexp(1.0 + m / 1024.0, ex - 15);
    return sign ? -v : v;
}

static uint16_t f16_encode(double r) /* r representable */
{
    uint16_t sign = signbit(r) ? 0x8000u : 0;
    double a = fabs(r);
    if (isnan(r))
        return 0x7e00u;
    if (isinf(r))
        return (uint16_t)(sign | 0x7c00u);
    if (a < ldexp(1.0, -14))
        return (uint16_t)(sign | (uint16_t)ldexp(a, 24));
    int e;
    double f = frexp(a, &e); /* a = f * 2^e, f in [0.5, 1) */
    int ex = e - 1 + 15;
    uint16_t m = (uint16_t)((f * 2.0 - 1.0) * 1024.0);
    return (uint16_t)(sign | (ex << 10) | m);
}

static double bf16_decode(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t bf16_encode(double r) /* r representable */
{
    if (isnan(r))
        return 0x7fc0u;
    float f = (float)r;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

double ref_load(resa_dtype t, const void *buf, size_t i)
{
    switch (t) {
    case RESA_DTYPE_FP8_E4M3:
        return ref_e4m3_value(((const uint8_t *)buf)[i]);
    case RESA_DTYPE_F32: {
        float f;
        memcpy(&f, (const char *)buf + 4 * i, 4);
        return f;
    }
    case RESA_DTYPE_F16: {
        uint16_t h;
        memcpy(&h, (const char *)buf + 2 * i, 2);
        return f16_decode(h);
    }
    case RESA_DTYPE_BF16: {
        uint16_t h;
        memcpy(&h, (const char *)buf + 2 * i, 2);
        return bf16_decode(h);
    }
    }
    return NAN;
}

void ref_store(resa_dtype t, void *buf, size_t i, double x)
{
    double r = ref_round(t, x);
    if (t == RESA_DTYPE_FP8_E4M3) {
        ((uint8_t *)buf)[i] = ref_e4m3_byte(r);
        return;
    }
    if (t == RESA_DTYPE_F32) {
        float f = (float)r;
        memcpy((char *)buf + 4 * i, &f, 4);
    } else {
        uint16_t h = t == RESA_DTYPE_F16 ? f16_encode(r) : bf16_encode(r);
        memcpy((char *)buf + 2 * i, &h, 2);
    }
}

/* ------------------------------------------------------------------------ */
/* budget                                                                     */
/* ------------------------------------------------------------------------ */
int64_t ref_blocks(int64_t tokens, int32_t b)
{
    return (tokens + b - 1) / b;
}

int ref_is_forced(int64_t blk, int64_t M, int64_t local, int64_t sink)
{
    return blk >= M - local || blk < sink;
}

int64_t ref_forced_count(int64_t M, int64_t local, int64_t sink)
{
    int64_t c = 0;
    for (int64_t i = 0; i < M; i++)
        c += ref_is_forced(i, M, local, sink);
    return c;
}

int64_t ref_budget(int64_t M, double r, int64_t n_min, int64_t local, int64_t sink)
{
    int64_t ppm = llround(r * 1e6);
    int64_t n = (ppm * M + 999999) / 1000000;
    int64_t lo = n_min < M ? n_min : M;
    if (n < lo)
        n = lo;
    int64_t forced = ref_forced_count(M, local, sink);
    if (n < forced)
        n = forced;
    if (n > M)
        n = M;
    return n;
}

/* ------------------------------------------------------------------------ */
/* the cache model                                                           */
/* ------------------------------------------------------------------------ */
/* The per-layer arrays of a sequence: K, V, their scales, and an fp8
 * cache's exact products (NULL otherwise); *elems: elements per position. */
enum { REF_ARRAYS = 6 };
static double ***seq_arrays(ref_seq *s, int i, size_t *elems)
{
    double ***a[REF_ARRAYS] = {&s->k, &s->v, &s->ks, &s->vs, &s->kx, &s->vx};
    *elems = (size_t)s->hkv * (i == 2 || i == 3 ? 1 : (size_t)s->d);
    return a[i];
}

ref_seq *ref_seq_new(const ref_params *p, int64_t cap)
{
    ref_seq *s = calloc(1, sizeof *s);
    s->n_layers = p->n_layers;
    s->hkv = p->hkv;
    s->d = p->d;
    s->cap = cap < 1 ? 1 : cap;
    const int fams = p->kv_dtype == RESA_DTYPE_FP8_E4M3 ? REF_ARRAYS : REF_ARRAYS - 2;
    for (int i = 0; i < fams; i++) {
        size_t elems;
        double ***a = seq_arrays(s, i, &elems);
        *a = calloc((size_t)p->n_layers, sizeof(double *));
        for (int32_t l = 0; l < p->n_layers; l++)
            (*a)[l] = calloc((size_t)s->cap * elems, sizeof(double));
    }
    return s;
}

ref_seq *ref_seq_clone(const ref_seq *o)
{
    ref_seq *s = calloc(1, sizeof *s);
    *s = *o;
    for (int i = 0; i < REF_ARRAYS; i++) {
        size_t elems;
        double ***a = seq_arrays(s, i, &elems);
        if (!*a)
            continue;
        double **src = *a;
        *a = calloc((size_t)o->n_layers, sizeof(double *));
        for (int32_t l = 0; l < o->n_layers; l++) {
            (*a)[l] = malloc((size_t)o->cap * elems * sizeof(double));
            memcpy((*a)[l], src[l], (size_t)o->cap * elems * sizeof(double));
        }
    }
    return s;
}

void ref_seq_free(ref_seq *s)
{
    if (!s)
        return;
    for (int i = 0; i < REF_ARRAYS; i++) {
        size_t elems;
        double ***a = seq_arrays(s, i, &elems);
        for (int32_t l = 0; *a && l < s->n_layers; l++)
            free((*a)[l]);
        free(*a);
    }
    free(s);
}

int64_t ref_seq_pending(const ref_seq *s)
{
    return s->len - s->rect_start;
}

static void ref_seq_reserve(ref_seq *s, int64_t need)
{
    if (need <= s->cap)
        return;
    int64_t cap = s->cap * 2 > need ? s->cap * 2 : need;
    for (int i = 0; i < REF_ARRAYS; i++) {
        size_t elems;
        double ***a = seq_arrays(s, i, &elems);
        const size_t old = (size_t)s->cap * elems, per = (size_t)cap * elems;
        for (int32_t l = 0; *a && l < s->n_layers; l++) {
            (*a)[l] = realloc((*a)[l], per * sizeof(double));
            memset((*a)[l] + old, 0, (per - old) * sizeof(double));
        }
    }
    s->cap = cap;
}

void ref_write_kv(const ref_params *p, ref_seq *s, int32_t layer, int64_t pos, int64_t n,
                  const void *k, const void *v, int64_t row)
{
    ref_seq_reserve(s, pos + n);
    if (p->kv_dtype == RESA_DTYPE_FP8_E4M3) {
        double *x = malloc(sizeof(double) * (size_t)p->d);
        for (int64_t t = 0; t < n; t++)
            for (int32_t h = 0; h < p->hkv; h++)
                for (int is_v = 0; is_v < 2; is_v++) {
                    size_t src = ((size_t)(row + t) * (size_t)p->hkv + (size_t)h) * (size_t)p->d;
                    for (int32_t j = 0; j < p->d; j++)
                        x[j] = ref_load(p->io_dtype, is_v ? v : k, src + (size_t)j);
                    double *dst = is_v ? ref_v(s, layer, pos + t, h) : ref_k(s, layer, pos + t, h);
                    double *exact = is_v ? ref_vx(s, layer, pos + t, h) : ref_kx(s, layer, pos + t, h);
                    ref_fp8_quantize(p->io_dtype, x, p->d, dst, exact,
                                     ref_scale_at(s, is_v, layer, pos + t, h));
                }
        free(x);
        return;
    }
    for (int64_t t = 0; t < n; t++)
        for (int32_t h = 0; h < p->hkv; h++)
            for (int32_t j = 0; j < p->d; j++) {
                size_t src = ((size_t)(row + t) * (size_t)p->hkv + (size_t)h) * (size_t)p->d +
                             (size_t)j;
                ref_k(s, layer, pos + t, h)[j] =
                    ref_round(p->kv_dtype, ref_load(p->io_dtype, k, src));
                ref_v(s, layer, pos + t, h)[j] =
                    ref_round(p->kv_dtype, ref_load(p->io_dtype, v, src));
            }
}

void ref_commit(ref_seq *s, int32_t mode, int64_t n, int64_t n_select, int64_t n_blocks)
{
    if (mode == RESA_MODE_RECTIFY) {
        s->rect_start += n; /* the oldest n pending tokens are exact now */
        return;
    }
    int none_pending = s->rect_start == s->len;
    int64_t old = s->len;
    s->len += n;
    int approximate = mode == RESA_MODE_DECODE && n_select < n_blocks;
    if (none_pending)
        s->rect_start = approximate ? old : s->len;
}

/* ------------------------------------------------------------------------ */
/* summaries, scores, selection                                              */
/* ------------------------------------------------------------------------ */
void ref_block_minmax(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      int64_t blk, int64_t valid, double *kmin, double *kmax)
{
    int64_t lo = blk * p->b, hi = lo + p->b;
    if (hi > valid)
        hi = valid;
    for (int32_t j = 0; j < p->d; j++) {
        kmin[j] = INFINITY;
        kmax[j] = -INFINITY;
    }
    for (int64_t t = lo; t < hi; t++) {
        const double *k = ref_k(s, layer, t, h);
        for (int32_t j = 0; j < p->d; j++) {
            if (k[j] < kmin[j])
                kmin[j] = k[j];
            if (k[j] > kmax[j])
                kmax[j] = k[j];
        }
    }
}

double ref_e4m3_value(uint8_t byte)
{
    int e = (byte >> 3) & 15, m = byte & 7;
    if (e == 15 && m == 7)
        return NAN;
    double mag = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, e - 7);
    return (byte & 0x80) ? -mag : mag;
}

double ref_e4m3_rne(double x)
{
    if (isnan(x))
        return x;
    if (fabs(x) >= 448.0)
        return copysign(448.0, x); /* saturating: e4m3 has no infinity, 448 is the nearest */
    double best = 0.0;
    int best_byte = 0;
    for (int b = 0; b < 256; b++) { /* the nearest finite value; ties to the even byte */
        double v = ref_e4m3_value((uint8_t)b);
        if (isnan(v))
            continue;
        double dv = fabs(v - x), db = fabs(best - x);
        if (dv < db || (dv == db && (b & 1) == 0 && (best_byte & 1) == 1)) {
            best = v;
            best_byte = b;
        }
    }
    return best == 0.0 ? copysign(0.0, x) : best;
}

uint8_t ref_e4m3_byte(double v)
{
    if (isnan(v))
        return 0x7f;
    for (int b = 0; b < 256; b++)
        if (ref_e4m3_value((uint8_t)b) == v && !signbit(ref_e4m3_value((uint8_t)b)) == !signbit(v))
            return (uint8_t)b;
    return 0x7f; /* not an e4m3 value */
}

void ref_fp8_quantize(resa_dtype io, const double *x, int32_t d, double *out, double *exact,
                      double *scale_out)
{
    int nan = 0;
    double amax = 0.0;
    for (int32_t j = 0; j < d; j++) {
        nan |= isnan(x[j]);
        amax = fmax(amax, fabs(x[j]));
    }
    /* fp32 quotients and products: the float64 operation is exact or rounds
     * once more than fp32, which for one division or one product of two
     * floats gives the fp32 result (53 >= 2 * 24 + 2 bits) */
    double scale = nan ? NAN : ref_round(RESA_DTYPE_F32, amax / 448.0);
    if (scale == 0.0 && amax > 0.0)
        scale = ldexp(1.0, -149);
    for (int32_t j = 0; j < d; j++) {
        double y = scale == 0.0 ? x[j] : ref_round(RESA_DTYPE_F32, x[j] / scale);
        double v = ref_round(RESA_DTYPE_F32, ref_e4m3_rne(y) * scale);
        if (exact)
            exact[j] = v;
        out[j] = ref_round(io, v);
    }
    *scale_out = scale;
}

int ref_fp8_scale(double amax)
{
    if (!(amax > 0))
        return 0;
    int s = -200;
    while (amax > 448.0 * ldexp(1.0, s))
        s++;
    return s < -128 ? -128 : s > 127 ? 127 : s;
}

double ref_e4m3_outward(double x, int s, int up)
{
    double y = ldexp(x, -s), best = up ? INFINITY : -INFINITY;
    for (int b = 0; b < 256; b++) { /* the nearest representable value on the chosen side */
        double v = ref_e4m3_value((uint8_t)b);
        if (isnan(v))
            continue;
        if (up ? (v >= y && v < best) : (v <= y && v > best))
            best = v;
    }
    return ldexp(best, s);
}

void ref_block_summary(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                       int64_t blk, int64_t valid, double *kmin, double *kmax, int *exp_out)
{
    ref_block_minmax(p, s, layer, h, blk, valid, kmin, kmax);
    if (!p->summary_fp8)
        return;
    double amax = 0;
    for (int32_t j = 0; j < p->d; j++)
        amax = fmax(amax, fmax(fabs(kmin[j]), fabs(kmax[j])));
    int e = ref_fp8_scale(amax);
    for (int32_t j = 0; j < p->d; j++) {
        kmin[j] = ref_e4m3_outward(kmin[j], e, 0);
        kmax[j] = ref_e4m3_outward(kmax[j], e, 1);
    }
    if (exp_out)
        *exp_out = e;
}

void ref_pooled_query(const ref_params *p, const void *q, int64_t row, int32_t h, double *qp)
{
    int32_t g = p->hq / p->hkv;
    for (int32_t j = 0; j < p->d; j++) {
        double acc = 0;
        for (int32_t i = 0; i < g; i++) {
            size_t at = ((size_t)row * (size_t)p->hq + (size_t)(h * g + i)) * (size_t)p->d +
                        (size_t)j;
            acc += ref_load(p->io_dtype, q, at);
        }
        qp[j] = acc / g;
    }
}

void ref_block_scores(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      const double *qp, int64_t M, int64_t valid, double *scores, double *mag)
{
    double *mn = malloc(sizeof(double) * (size_t)p->d);
    double *mx = malloc(sizeof(double) * (size_t)p->d);
    for (int64_t i = 0; i < M; i++) {
        ref_block_summary(p, s, layer, h, i, valid, mn, mx, NULL);
        double sc = 0, mg = 0;
        for (int32_t j = 0; j < p->d; j++) {
            double a = qp[j] * mx[j], c = qp[j] * mn[j];
            /* the box centre plus w times its half-width seen from q; at w = 1
             * that is max(a, c), the upper bound of the paper */
            sc += p->score_width == 1.0 ? (a > c ? a : c)
                                        : 0.5 * (a + c) + p->score_width * 0.5 * fabs(a - c);
            mg += fabs(qp[j]) * (fabs(mx[j]) > fabs(mn[j]) ? fabs(mx[j]) : fabs(mn[j]));
        }
        scores[i] = sc;
        if (mag)
            mag[i] = mg;
    }
    free(mn);
    free(mx);
}

void ref_group_scores(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      const void *q, int64_t row, int64_t M, int64_t valid, double *scores,
                      double *mag)
{
    double *qv = malloc(sizeof(double) * (size_t)p->d);
    if (p->group_score != RESA_GROUP_SCORE_HEAD_SHARE) {
        ref_pooled_query(p, q, row, h, qv);
        ref_block_scores(p, s, layer, h, qv, M, valid, scores, mag);
        free(qv);
        return;
    }
    int32_t g = p->hq / p->hkv;
    size_t m1 = (size_t)(M > 0 ? M : 1);
    double *hs = malloc(sizeof(double) * m1 * (size_t)g);
    double *hm = malloc(sizeof(double) * m1 * (size_t)g);
    double *lse = malloc(sizeof(double) * (size_t)g);
    double scale = ref_scale(p), mag_all = 0;
    for (int32_t j = 0; j < g; j++) {
        for (int32_t x = 0; x < p->d; x++)
            qv[x] = ref_load(p->io_dtype, q,
                             ((size_t)row * (size_t)p->hq + (size_t)(h * g + j)) * (size_t)p->d +
                                 (size_t)x);
        ref_block_scores(p, s, layer, h, qv, M, valid, hs + (size_t)j * m1, hm + (size_t)j * m1);
        double mx = -INFINITY;
        for (int64_t i = 0; i < M; i++) {
            hs[(size_t)j * m1 + (size_t)i] *= scale;
            hm[(size_t)j * m1 + (size_t)i] *= scale;
            mx = fmax(mx, hs[(size_t)j * m1 + (size_t)i]);
            mag_all = fmax(mag_all, hm[(size_t)j * m1 + (size_t)i]);
        }
        double sum = 0;
        for (int64_t i = 0; i < M; i++)
            sum += exp(hs[(size_t)j * m1 + (size_t)i] - mx);
        lse[j] = mx + log(sum);
    }
    for (int64_t i = 0; i < M; i++) {
        double sum = 0, mg = 0;
        for (int32_t j = 0; j < g; j++) {
            sum += exp(hs[(size_t)j * m1 + (size_t)i] - lse[j]);
            mg = fmax(mg, hm[(size_t)j * m1 + (size_t)i]);
        }
        scores[i] = log(sum);
        if (mag)
            mag[i] = mg + mag_all;
    }
    free(qv);
    free(hs);
    free(hm);
    free(lse);
}

static const double *g_sort_scores;
static int by_score(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    double sx = g_sort_scores[x], sy = g_sort_scores[y];
    if (sx > sy)
        return -1;
    if (sx < sy)
        return 1;
    return x < y ? -1 : x > y;
}
static int by_index(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

int64_t ref_select(const ref_params *p, const double *scores, int64_t M, int32_t *sel)
{
    int64_t n = ref_budget(M, p->fraction, p->min_blocks, p->local_blocks, p->sink_blocks);
    int32_t *others = malloc(sizeof(int32_t) * (size_t)(M > 0 ? M : 1));
    int64_t k = 0, no = 0;
    for (int64_t i = 0; i < M; i++) {
        if (ref_is_forced(i, M, p->local_blocks, p->sink_blocks))
            sel[k++] = (int32_t)i;
        else
            others[no++] = (int32_t)i;
    }
    g_sort_scores = scores;
    qsort(others, (size_t)no, sizeof(int32_t), by_score);
    for (int64_t i = 0; k < n && i < no; i++)
        sel[k++] = others[i];
    free(others);
    qsort(sel, (size_t)k, sizeof(int32_t), by_index);
    return k;
}

void ref_attend(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                const double *q, int64_t end, const int32_t *blocks, int64_t n_blocks,
                double *out)
{
    (void)ref_attend_lse(p, s, layer, h, q, 0, end, blocks, n_blocks, out);
}

/* The positions ref_attend reads, in order (the listed blocks', or all of
 * [begin, end)), and their softmax weights exp(score - max) in *w_out; returns
 * their number, with the max and the weights' sum.  The caller frees both. */
static int64_t attend_weights(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                              const double *q, int64_t begin, int64_t end, const int32_t *blocks,
                              int64_t n_blocks, int64_t **pos_out, double **w_out, double *mx_out,
                              double *sum_out)
{
    double scale = ref_scale(p);
    int64_t n_pos = 0;
    /* a list may name a block twice (ref_explain_block's test does) */
    const int64_t cap = blocks ? n_blocks * (int64_t)p->b : end;
    int64_t *pos = malloc(sizeof(int64_t) * (size_t)(cap > 0 ? cap : 1));
    if (blocks) {
        for (int64_t i = 0; i < n_blocks; i++)
            for (int64_t t = (int64_t)blocks[i] * p->b;
                 t < ((int64_t)blocks[i] + 1) * p->b && t < end; t++)
                if (t >= begin)
                    pos[n_pos++] = t;
    } else {
        for (int64_t t = begin; t < end; t++)
            pos[n_pos++] = t;
    }
    double *w = malloc(sizeof(double) * (size_t)(n_pos > 0 ? n_pos : 1));
    double mx = -INFINITY;
    for (int64_t i = 0; i < n_pos; i++) {
        const double *k = p->fp8_exact && s->kx ? ref_kx(s, layer, pos[i], h) : ref_k(s, layer, pos[i], h);
        double dot = 0;
        for (int32_t j = 0; j < p->d; j++)
            dot += q[j] * k[j];
        w[i] = dot * scale;
        if (w[i] > mx)
            mx = w[i];
    }
    double sum = 0;
    for (int64_t i = 0; i < n_pos; i++) {
        w[i] = exp(w[i] - mx);
        sum += w[i];
    }
    *pos_out = pos;
    *w_out = w;
    *mx_out = mx;
    *sum_out = sum;
    return n_pos;
}

/* out = the sum over positions [from, to) of attend_weights' list of
 * (w / sum) v, in order; returns the sum of their w / sum */
static double weighted_v(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                         const int64_t *pos, const double *w, int64_t from, int64_t to, double sum,
                         double *out)
{
    double W = 0;
    for (int32_t j = 0; j < p->d; j++)
        out[j] = 0;
    for (int64_t i = from; i < to; i++) {
        const double *v = p->fp8_exact && s->vx ? ref_vx(s, layer, pos[i], h) : ref_v(s, layer, pos[i], h);
        W += w[i] / sum;
        for (int32_t j = 0; j < p->d; j++)
            out[j] += w[i] / sum * v[j];
    }
    return W;
}

double ref_attend_lse(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                      const double *q, int64_t begin, int64_t end, const int32_t *blocks,
                      int64_t n_blocks, double *out)
{
    int64_t *pos;
    double *w, mx, sum;
    int64_t n_pos = attend_weights(p, s, layer, h, q, begin, end, blocks, n_blocks, &pos, &w, &mx, &sum);
    (void)weighted_v(p, s, layer, h, pos, w, 0, n_pos, sum, out);
    free(w);
    free(pos);
    return n_pos > 0 ? mx + log(sum) : -INFINITY;
}

int64_t ref_explain_block(const ref_params *p, const ref_seq *s, int32_t layer, int32_t h,
                          const double *q, int64_t end, const int32_t *blocks, int64_t n_blocks,
                          const double *got, double *alpha, double *explained)
{
    const int32_t d = p->d;
    double *ref = malloc(sizeof(double) * (size_t)d);
    double *diff = malloc(sizeof(double) * (size_t)d);
    double *cv = malloc(sizeof(double) * (size_t)d);
    int64_t *pos;
    double *w, mx, sum;
    int64_t n_pos = attend_weights(p, s, layer, h, q, 0, end, blocks, n_blocks, &pos, &w, &mx, &sum);
    (void)weighted_v(p, s, layer, h, pos, w, 0, n_pos, sum, ref); /* ref_attend's row */
    double dd = 0;
    for (int32_t j = 0; j < d; j++) {
        diff[j] = got[j] - ref[j];
        dd += diff[j] * diff[j];
    }
    int64_t best = -1;
    double best_share = 0, best_alpha = 0;
    /* each run of positions in one block: its weight W and weighted sum cv;
     * without it the row is (ref - cv) / (1 - W), a change of
     * delta = (W ref - cv) / (1 - W) */
    for (int64_t i = 0; i < n_pos && dd > 0;) {
        const int64_t blk = pos[i] / p->b, first = i;
        while (i < n_pos && pos[i] / p->b == blk)
            i++;
        const double W = weighted_v(p, s, layer, h, pos, w, first, i, sum, cv);
        if (W >= 1.0)
            continue; /* the only block: leaving it out leaves nothing */
        double dot = 0, nn = 0;
        for (int32_t j = 0; j < d; j++) {
            const double delta = (W * ref[j] - cv[j]) / (1.0 - W);
            dot += diff[j] * delta;
            nn += delta * delta;
        }
        const double share = nn > 0 ? dot * dot / (nn * dd) : 0;
        if (share > best_share) {
            best = blk;
            best_share = share;
            best_alpha = dot / nn;
        }
    }
    *alpha = best_alpha;
    *explained = best_share;
    free(w);
    free(pos);
    free(cv);
    free(diff);
    free(ref);
    return best;
}

/* ------------------------------------------------------------------------ */
/* rng (splitmix64)                                                          */
/* ------------------------------------------------------------------------ */
uint64_t ref_rng_next(ref_rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double ref_rng_uniform(ref_rng *r)
{
    return (double)(ref_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

double ref_rng_normal(ref_rng *r)
{
    double u1 = ref_rng_uniform(r), u2 = ref_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

int64_t ref_rng_range(ref_rng *r, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(ref_rng_next(r) % (uint64_t)(hi - lo + 1));
}
