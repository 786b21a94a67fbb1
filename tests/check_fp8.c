/* SPDX-License-Identifier: MIT */
/*
 * The fp8 KV cache (RESA_DTYPE_FP8_E4M3 as KV_DTYPE, lib/kv_fp8.h):
 *  - its codec against the test's own e4m3 table and quantizer (ref.c, from
 *    the OCP definition): every byte decodes to its table value (NaN bytes
 *    too); encoding is round to nearest even with saturation, on every table
 *    value, every midpoint between neighbours (ties) and its two float
 *    neighbours, subnormals, +-0, the saturation edge, infinities, NaN and
 *    200000 random floats of every magnitude;
 *  - a head vector's scale and read-back values, bit for bit, on random rows
 *    of every magnitude (subnormal amax included), IO dtypes f32/f16/bf16,
 *    and rows with NaN or an infinity (which read back as NaN);
 *  - the parameter: FP8_E4M3 is a KV_DTYPE, never an IO_DTYPE;
 *  - the reference's two readings of an fp8 cache (ref.h fp8_exact): the
 *    IO_DTYPE rounding that the CPU backend attends, and the exact products
 *    that CUDA's sparse decode attends, each against a softmax over the
 *    library codec's bytes and scales.
 * The decode, rectification and fork paths with an fp8 cache are in
 * check_decode, check_rectify, check_fork, check_random and check_nonfinite.
 *
 * fp8 block summaries (RESA_SUMMARY_FP8_E4M3).
 *  - The codec of lib/summary_fp8.h against the test's own e4m3 table (ref.c,
 *    from the OCP definition): every byte decodes to its table value; the
 *    scale exponent is the smallest that fits; directed rounding gives the
 *    nearest table value on the requested side, on random values of every
 *    magnitude and on the table values themselves.
 *  - What the rounding costs: on the same random cache and queries, the
 *    blocks chosen with fp8 summaries against those chosen with exact ones
 *    (at least 80% the same on Gaussian keys with outlier channels, where
 *    scores crowd together; 87-97% measured),
 *    and planted blocks that align with the query are chosen by both.
 * The decode path with fp8 summaries against the float64 reference is in
 * check_decode, check_random and check_cuda.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "kv_fp8.h"
#include "summary_fp8.h"

/* ---- the fp8 KV cache's codec ---- */

static int same_value(double a, double b)
{
    return (isnan(a) && isnan(b)) || (a == b && !signbit(a) == !signbit(b));
}

START_TEST(test_kv_decode_all)
{
    for (int b = 0; b < 256; b++) {
        double want = ref_e4m3_value((uint8_t)b), got = resa_fp8_decode((uint8_t)b);
        TCHECK(same_value(got, want), "byte 0x%02x decodes to %.9g, table %.9g", b, got, want);
        if (!isnan(want)) /* a value encodes to its own byte */
            TCHECK(resa_fp8_encode((float)want) == b, "%.9g encodes to 0x%02x, not 0x%02x",
                   want, resa_fp8_encode((float)want), b);
    }
}
END_TEST

/* The library's byte for x equals the reference's (same value, same sign). */
static void check_encode(float x)
{
    uint8_t got = resa_fp8_encode(x);
    double want = ref_e4m3_rne((double)x);
    TCHECK(same_value(ref_e4m3_value(got), want),
           "e4m3(%.9g) = 0x%02x (%.9g), reference %.9g", (double)x, got,
           ref_e4m3_value(got), want);
    if (isnan(x))
        TCHECK(got == RESA_FP8_NAN, "NaN encodes to 0x%02x", got);
}

START_TEST(test_kv_encode_edges)
{
    /* every midpoint between neighbouring finite values (a tie: the even
     * byte), and the float just below and above it, both signs */
    for (int b = 0; b < 0x7e; b++) {
        float lo = (float)ref_e4m3_value((uint8_t)b), hi = (float)ref_e4m3_value((uint8_t)(b + 1));
        float mid = 0.5f * (lo + hi); /* exact: at most 5 significant bits */
        float xs[3] = {mid, nextafterf(mid, 0.0f), nextafterf(mid, INFINITY)};
        for (int i = 0; i < 3; i++) {
            check_encode(xs[i]);
            check_encode(-xs[i]);
        }
        uint8_t even = (b & 1) ? (uint8_t)(b + 1) : (uint8_t)b;
        TCHECK(resa_fp8_encode(mid) == even, "tie %.9g: 0x%02x, not the even 0x%02x",
               (double)mid, resa_fp8_encode(mid), even);
    }
    static const float edge[] = {0.0f, -0.0f, 448.0f, 449.0f, 463.99f, 464.0f, 464.01f, 480.0f,
                                 1e4f, 3.4e38f, INFINITY, -INFINITY, 1.401298e-45f,
                                 0.0009765625f /* 2^-10: the tie below the smallest subnormal */,
                                 0.00097656256f, 0.015625f, 0.0146484375f};
    for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++) {
        check_encode(edge[i]);
        check_encode(-edge[i]);
    }
    check_encode(NAN);
    TCHECK(resa_fp8_encode(INFINITY) == 0x7e && resa_fp8_encode(-INFINITY) == 0xfe &&
               resa_fp8_encode(1e30f) == 0x7e,
           "saturation: inf 0x%02x, -inf 0x%02x, 1e30 0x%02x", resa_fp8_encode(INFINITY),
           resa_fp8_encode(-INFINITY), resa_fp8_encode(1e30f));
    TCHECK(resa_fp8_encode(-0.0f) == 0x80, "-0 encodes to 0x%02x", resa_fp8_encode(-0.0f));
}
END_TEST

START_TEST(test_kv_encode_random)
{
    ref_rng rng = {th_test_seed("fp8_kv_encode_random")};
    for (int i = 0; i < 200000; i++) {
        double mag = ldexp(1.0 + ref_rng_uniform(&rng), (int)ref_rng_range(&rng, -150, 12));
        float x = (float)(ref_rng_uniform(&rng) < 0.5 ? -mag : mag);
        check_encode(x);
    }
}
END_TEST

/* Rows of d values of IO dtype io: scale, read-back values and exact
 * products (what CUDA's sparse decode attends) equal the reference
 * quantizer's bit for bit. */
static void check_row(resa_dtype io, const float *x, int32_t d)
{
    double xd[RESA_MAX_HEAD_DIM], want[RESA_MAX_HEAD_DIM], want_x[RESA_MAX_HEAD_DIM], want_scale;
    float amax = 0.0f;
    for (int32_t j = 0; j < d; j++) {
        xd[j] = x[j];
        amax = resa_fp8_amax(amax, x[j]);
    }
    ref_fp8_quantize(io, xd, d, want, want_x, &want_scale);
    float scale = resa_fp8_scale(amax);
    TCHECK(same_value(scale, want_scale), "row of amax %.9g: scale %.9g, reference %.9g",
           (double)amax, (double)scale, want_scale);
    for (int32_t j = 0; j < d; j++) {
        uint8_t c = resa_fp8_quantize(x[j], scale);
        /* read back as the library defines it: the test's table value times
         * the scale, an fp32 product, rounded to the IO dtype */
        double got_x = ref_round(RESA_DTYPE_F32, ref_e4m3_value(c) * (double)scale);
        double got = ref_round(io, got_x);
        TCHECK(same_value(got_x, want_x[j]) || (got_x == 0 && want_x[j] == 0),
               "io %d, element %d of a row of amax %.9g: byte 0x%02x times the scale is %.9g, "
               "reference %.9g", (int)io, j, (double)amax, c, got_x, want_x[j]);
        TCHECK(same_value(got, want[j]) || (got == 0 && want[j] == 0),
               "io %d, element %d of a row of amax %.9g: %.9g (byte 0x%02x) reads back as "
               "%.9g, reference %.9g", (int)io, j, (double)amax, (double)x[j], c, got, want[j]);
        if (isnan(want_scale) || isinf(want_scale))
            TCHECK(isnan(got), "a non-finite row reads back %.9g", got);
    }
}

START_TEST(test_kv_rows)
{
    static const resa_dtype ios[] = {RESA_DTYPE_F32, RESA_DTYPE_F16, RESA_DTYPE_BF16};
    ref_rng rng = {th_test_seed("fp8_kv_rows")};
    float x[RESA_MAX_HEAD_DIM];
    for (int i = 0; i < 20000; i++) {
        resa_dtype io = ios[i % 3];
        int32_t d = (int32_t)ref_rng_range(&rng, 1, RESA_MAX_HEAD_DIM);
        /* magnitudes the IO dtype holds: f32 down to subnormal amax (whose
         * scale underflows to 2^-149) and up to 1e38 */
        int lo = io == RESA_DTYPE_F16 ? -20 : -148, hi = io == RESA_DTYPE_F16 ? 14 : 126;
        int e = (int)ref_rng_range(&rng, lo, hi);
        for (int32_t j = 0; j < d; j++) {
            double v = ldexp(ref_rng_normal(&rng), e);
            if (i % 7 == 0 && j % 5 == 0)
                v = 0.0; /* exact zeros among the values */
            x[j] = (float)ref_round(io, v);
        }
        if (i % 101 == 0)
            for (int32_t j = 0; j < d; j++)
                x[j] = 0.0f; /* all zero: scale 0 */
        if (i % 97 == 1)
            x[ref_rng_range(&rng, 0, d - 1)] = (i % 2) ? NAN : (i % 3 ? INFINITY : -INFINITY);
        check_row(io, x, d);
    }
}
END_TEST

/* ref_attend over an fp8 cache, with and without fp8_exact, against a
 * float64 softmax written here over the values the library's codec gives:
 * e4m3 * scale (an fp32 product), and its bf16 rounding.  The two readings
 * must differ (else the test could not tell them apart). */
START_TEST(test_ref_fp8_exact)
{
    ref_rng rng = {th_test_seed("fp8_ref_exact")};
    ref_params p;
    ref_params_default(&p);
    p.d = 64;
    p.kv_dtype = RESA_DTYPE_FP8_E4M3;
    p.io_dtype = RESA_DTYPE_BF16;
    const int64_t n = 203; /* not a multiple of the block size */
    ref_seq *s = ref_seq_new(&p, 8);
    uint16_t *k = malloc(sizeof(uint16_t) * (size_t)(n * p.d));
    uint16_t *v = malloc(sizeof(uint16_t) * (size_t)(n * p.d));
    for (int64_t i = 0; i < n * p.d; i++) {
        ref_store(p.io_dtype, k, (size_t)i, 2.0 * ref_rng_normal(&rng));
        ref_store(p.io_dtype, v, (size_t)i, ref_rng_normal(&rng));
    }
    ref_write_kv(&p, s, 0, 0, n, k, v, 0);
    /* the library's codec, row by row */
    double *kx = malloc(sizeof(double) * (size_t)(n * p.d)), *vx = malloc(sizeof(double) * (size_t)(n * p.d));
    for (int is_v = 0; is_v < 2; is_v++)
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *src = (is_v ? v : k) + t * p.d;
            float amax = 0.0f;
            for (int32_t j = 0; j < p.d; j++)
                amax = resa_fp8_amax(amax, (float)ref_load(p.io_dtype, src, (size_t)j));
            const float sc = resa_fp8_scale(amax);
            for (int32_t j = 0; j < p.d; j++) {
                uint8_t c = resa_fp8_quantize((float)ref_load(p.io_dtype, src, (size_t)j), sc);
                (is_v ? vx : kx)[t * p.d + j] = (double)(resa_fp8_decode(c) * sc);
            }
        }
    double q[64], got[64], want[64];
    for (int32_t j = 0; j < p.d; j++)
        q[j] = ref_round(p.io_dtype, 1.5 * ref_rng_normal(&rng));
    for (int exact = 0; exact < 2; exact++) {
        p.fp8_exact = exact;
        ref_attend(&p, s, 0, 0, q, n, NULL, 0, got);
        double w[203], mx = -INFINITY, sum = 0;
        for (int64_t t = 0; t < n; t++) {
            double dot = 0;
            for (int32_t j = 0; j < p.d; j++) {
                double x = kx[t * p.d + j];
                dot += q[j] * (exact ? x : ref_round(p.io_dtype, x));
            }
            w[t] = dot / sqrt((double)p.d);
            mx = fmax(mx, w[t]);
        }
        for (int64_t t = 0; t < n; t++)
            sum += (w[t] = exp(w[t] - mx));
        for (int32_t j = 0; j < p.d; j++) {
            want[j] = 0;
            for (int64_t t = 0; t < n; t++) {
                double x = vx[t * p.d + j];
                want[j] += w[t] / sum * (exact ? x : ref_round(p.io_dtype, x));
            }
            TCHECK(fabs(got[j] - want[j]) <= 1e-12 * (1 + fabs(want[j])),
                   "fp8_exact %d, dim %d: reference %.15g, softmax over the codec's values %.15g",
                   exact, j, got[j], want[j]);
        }
    }
    /* the rows of the two readings differ by the bf16 rounding's effect
     * (p.fp8_exact is 1 here) */
    double diff = 0;
    ref_attend(&p, s, 0, 0, q, n, NULL, 0, got);
    p.fp8_exact = 0;
    ref_attend(&p, s, 0, 0, q, n, NULL, 0, want);
    for (int32_t j = 0; j < p.d; j++)
        diff = fmax(diff, fabs(got[j] - want[j]));
    TCHECK(diff > 0, "the two readings of the cache gave the same row");
    free(kx);
    free(vx);
    free(k);
    free(v);
    ref_seq_free(s);
}
END_TEST

/* FP8_E4M3 is a storage type: KV_DTYPE takes it, IO_DTYPE refuses it by name. */
START_TEST(test_kv_param)
{
    resa_ctx *c = NULL;
    TCHECK(resa_ctx_create(RESA_BACKEND_CPU, NULL, &c) == RESA_OK, "create");
    int64_t lo = -1, hi = -1;
    TOK(c, resa_param_bounds(RESA_PARAM_KV_DTYPE, &lo, &hi));
    TCHECK(lo == RESA_DTYPE_F32 && hi == RESA_DTYPE_FP8_E4M3, "KV_DTYPE bounds [%lld, %lld]",
           (long long)lo, (long long)hi);
    TOK(c, resa_param_bounds(RESA_PARAM_IO_DTYPE, &lo, &hi));
    TCHECK(lo == RESA_DTYPE_F32 && hi == RESA_DTYPE_BF16, "IO_DTYPE bounds [%lld, %lld]",
           (long long)lo, (long long)hi);
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "RESA_PARAM_IO_DTYPE",
          resa_ctx_set_param(c, RESA_PARAM_IO_DTYPE, RESA_DTYPE_FP8_E4M3));
    TCHECK(strstr(resa_ctx_last_error(c), "RESA_PARAM_KV_DTYPE") != NULL,
           "the error should say where fp8 goes: %s", resa_ctx_last_error(c));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_KV_DTYPE, RESA_DTYPE_FP8_E4M3));
    int64_t v = -1;
    TOK(c, resa_ctx_get_param(c, RESA_PARAM_KV_DTYPE, &v));
    TCHECK(v == RESA_DTYPE_FP8_E4M3, "KV_DTYPE reads back %lld", (long long)v);
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "RESA_PARAM_KV_DTYPE",
          resa_ctx_set_param(c, RESA_PARAM_KV_DTYPE, 4));
    resa_ctx_destroy(c);
}
END_TEST

START_TEST(test_codec_table)
{
    for (int b = 0; b < 256; b++) {
        double want = ref_e4m3_value((uint8_t)b);
        if (isnan(want))
            continue;
        double got = resa_e4m3_to_f32((uint8_t)b);
        TCHECK(got == want, "e4m3 byte 0x%02x decodes to %.9g, table %.9g", b, got, want);
        /* a representable value rounds to itself both ways, at any scale */
        for (int s = -20; s <= 20; s += 7) {
            float x = ldexpf((float)want, s);
            for (int up = 0; up < 2; up++) {
                uint8_t r = resa_e4m3_round(x, s, up);
                TCHECK(ldexp(ref_e4m3_value(r), s) == (double)x || (want == 0 && x == 0),
                       "0x%02x * 2^%d rounds (up %d) to 0x%02x", b, s, up, r);
            }
        }
    }
}
END_TEST

START_TEST(test_codec_random)
{
    ref_rng rng = {th_test_seed("fp8_codec_random")};
    for (int i = 0; i < 200000; i++) {
        /* magnitudes from 2^-140 to 2^120, both signs, some exact zeros */
        double mag = ldexp(1.0 + ref_rng_uniform(&rng), (int)ref_rng_range(&rng, -140, 120));
        float x = i % 97 == 0 ? 0.0f : (float)(ref_rng_uniform(&rng) < 0.5 ? -mag : mag);
        /* a block maximum at or above |x|, so x fits the scale */
        float amax = fabsf(x) * (float)(1.0 + ref_rng_uniform(&rng) * (i % 3 ? 1.0 : 1e6));
        if (!(amax <= 3.0e38f))
            amax = fabsf(x);
        int s = resa_fp8_scale_exp(amax);
        TCHECK(s == ref_fp8_scale(amax), "scale of %.9g: %d, reference %d", (double)amax, s,
               ref_fp8_scale(amax));
        for (int up = 0; up < 2; up++) {
            double got = ldexp(ref_e4m3_value(resa_e4m3_round(x, s, up)), s);
            double want = ref_e4m3_outward(x, s, up);
            TCHECK(got == want && (up ? got >= x : got <= x),
                   "%.9g at scale 2^%d rounded %s: %.9g, reference %.9g", (double)x, s,
                   up ? "up" : "down", got, want);
        }
    }
}
END_TEST

/* A cache of `len` random tokens and one decode, with summaries `fmt`; the
 * chosen blocks of every (layer 0, head) in sel[hkv][cap], counts in n[hkv]. */
typedef struct session {
    resa_ctx *ctx;
    int32_t seq;
} session;

static void open_session(session *s, int32_t fmt, int32_t hq, int32_t hkv, int32_t d)
{
    TCHECK(resa_ctx_create(RESA_BACKEND_CPU, NULL, &s->ctx) == RESA_OK, "create");
    resa_ctx *c = s->ctx;
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, 1));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, hq));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, hkv));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, d));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 8192));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 1));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_RECORD_SELECTION, 1));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_SUMMARY_FORMAT, fmt));
    TOK(c, resa_seq_create(c, &s->seq));
}

static void run_step(session *s, int32_t mode, int32_t n, const float *q, const float *k,
                     const float *v, float *out)
{
    TOK(s->ctx, resa_ctx_step_begin(s->ctx, 1, &s->seq, &mode, &n, 0));
    TOK(s->ctx, resa_ctx_step_attend(s->ctx, 0, q, k, v, out, 0));
    TOK(s->ctx, resa_ctx_step_end(s->ctx, 0));
}

START_TEST(test_selection_overlap)
{
    enum { HQ = 8, HKV = 2, D = 128, LEN = 6000, PLANT = 4 };
    ref_rng rng = {th_test_seed("fp8_selection_overlap")};
    float *k = malloc(sizeof(float) * LEN * HKV * D), *v = malloc(sizeof(float) * LEN * HKV * D);
    float q[HQ * D], out[HQ * D];
    /* keys: Gaussian, per-channel scales from 0.1 to 10 (outlier channels) */
    double chan[D];
    for (int j = 0; j < D; j++)
        chan[j] = pow(10.0, ref_rng_uniform(&rng) * 2 - 1);
    for (size_t i = 0; i < (size_t)LEN * HKV * D; i++) {
        k[i] = (float)(ref_rng_normal(&rng) * chan[i % D]);
        v[i] = (float)ref_rng_normal(&rng);
    }
    for (int i = 0; i < HQ * D; i++)
        q[i] = (float)ref_rng_normal(&rng);
    /* planted blocks: every key of the block leans along the group's query */
    int32_t planted[PLANT];
    for (int p = 0; p < PLANT; p++) {
        planted[p] = (int32_t)ref_rng_range(&rng, 0, LEN / 16 - 2);
        for (int t = planted[p] * 16; t < planted[p] * 16 + 16; t++)
            for (int h = 0; h < HKV; h++)
                for (int j = 0; j < D; j++)
                    k[((size_t)t * HKV + h) * D + j] += (float)(3.0 * chan[j] * q[h * 4 * D + j]);
    }
    session s[2];
    int32_t sel[2][HKV][LEN / 16 + 1];
    int64_t n[2][HKV];
    for (int f = 0; f < 2; f++) {
        open_session(&s[f], f ? RESA_SUMMARY_FP8_E4M3 : RESA_SUMMARY_KV_DTYPE, HQ, HKV, D);
        run_step(&s[f], RESA_MODE_APPEND_KV, LEN - 1, NULL, k, v, NULL);
        run_step(&s[f], RESA_MODE_DECODE, 1, q, k + (size_t)(LEN - 1) * HKV * D,
                 v + (size_t)(LEN - 1) * HKV * D, out);
        for (int h = 0; h < HKV; h++)
            TOK(s[f].ctx, resa_seq_selected_blocks(s[f].ctx, s[f].seq, 0, h, sel[f][h],
                                                   LEN / 16 + 1, &n[f][h]));
        resa_ctx_destroy(s[f].ctx);
    }
    for (int h = 0; h < HKV; h++) {
        TCHECK(n[0][h] == n[1][h] && n[0][h] > 30, "head %d: %lld blocks exact, %lld fp8", h,
               (long long)n[0][h], (long long)n[1][h]);
        int64_t same = 0;
        for (int64_t i = 0, j = 0; i < n[0][h] && j < n[1][h];) {
            if (sel[0][h][i] == sel[1][h][j])
                same++, i++, j++;
            else if (sel[0][h][i] < sel[1][h][j])
                i++;
            else
                j++;
        }
        TCHECK(same >= (int64_t)(0.80 * (double)n[0][h]),
               "head %d: fp8 summaries chose %lld of the %lld blocks the exact ones chose", h,
               (long long)same, (long long)n[0][h]);
        printf("fp8 selection overlap, head %d: %lld of %lld blocks\n", h, (long long)same,
               (long long)n[0][h]);
        for (int p = 0; p < PLANT; p++)
            for (int f = 0; f < 2; f++) {
                int found = 0;
                for (int64_t i = 0; i < n[f][h]; i++)
                    found |= sel[f][h][i] == planted[p];
                TCHECK(found, "head %d: planted block %d not chosen with %s summaries", h,
                       planted[p], f ? "fp8" : "exact");
            }
    }
    free(k);
    free(v);
}
END_TEST

/* The format locks with the pool and rejects out-of-range values. */
START_TEST(test_param)
{
    resa_ctx *c = NULL;
    TCHECK(resa_ctx_create(RESA_BACKEND_CPU, NULL, &c) == RESA_OK, "create");
    int64_t v = -1;
    TOK(c, resa_ctx_get_param(c, RESA_PARAM_SUMMARY_FORMAT, &v));
    TCHECK(v == RESA_SUMMARY_FP8_E4M3, "default summary format %lld (fp8 since 0.3.0)", (long long)v);
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "RESA_PARAM_SUMMARY_FORMAT",
          resa_ctx_set_param(c, RESA_PARAM_SUMMARY_FORMAT, 2));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_SUMMARY_FORMAT, RESA_SUMMARY_FP8_E4M3));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, 1));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, 1));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, 1));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, 128));
    int32_t id;
    TOK(c, resa_seq_create(c, &id));
    TFAIL(c, RESA_ERR_BAD_STATE, "RESA_PARAM_SUMMARY_FORMAT",
          resa_ctx_set_param(c, RESA_PARAM_SUMMARY_FORMAT, RESA_SUMMARY_KV_DTYPE));
    resa_ctx_destroy(c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("fp8");
    TCase *tc = tcase_create("fp8");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_kv_decode_all);
    tcase_add_test(tc, test_kv_encode_edges);
    tcase_add_test(tc, test_kv_encode_random);
    tcase_add_test(tc, test_kv_rows);
    tcase_add_test(tc, test_kv_param);
    tcase_add_test(tc, test_ref_fp8_exact);
    tcase_add_test(tc, test_codec_table);
    tcase_add_test(tc, test_codec_random);
    tcase_add_test(tc, test_selection_overlap);
    tcase_add_test(tc, test_param);
    suite_add_tcase(s, tc);
    return th_run_suite(s, 1);
}
