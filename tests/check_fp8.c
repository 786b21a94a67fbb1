/* SPDX-License-Identifier: MIT */
/*
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

#include "harness.h"
#include "summary_fp8.h"

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
    TCHECK(v == RESA_SUMMARY_KV_DTYPE, "default summary format %lld", (long long)v);
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
    tcase_add_test(tc, test_codec_table);
    tcase_add_test(tc, test_codec_random);
    tcase_add_test(tc, test_selection_overlap);
    tcase_add_test(tc, test_param);
    suite_add_tcase(s, tc);
    return th_run_suite(s, 1);
}
