/* SPDX-License-Identifier: MIT */
/*
 * Context parallelism with libresa, R ranks as R CPU contexts in one process
 * (docs/integration.md, "Multi-GPU").  A real engine runs one context per GPU
 * and replaces the memcpy "all-gathers" below with ncclAllGather; everything
 * else is the same calls.  Next to the ranks, one context holds the whole
 * sequence; the program prints the largest difference between the merged
 * outputs and that context's, and whether the chosen blocks are the same.
 *
 * Build: cc context_parallel.c $(pkg-config --cflags --libs resa) -lm
 * Run:   ./context_parallel [R]      (R = 1 .. 8 ranks, default 3)
 */
#include <math.h>
#include <resa.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LAYERS = 2, HQ = 8, HKV = 2, D = 64, B = 16, PROMPT = 1000, TOKENS = 48, CAP = 64,
       MAXR = 8 };

static resa_ctx *one, *rank[MAXR];
static int32_t one_seq, rank_seq[MAXR];
static int64_t first[MAXR + 1]; /* rank r holds [first[r], first[r + 1]); the last grows */
static int R = 3;
static double max_diff;
static int64_t same_sel = 1;

#define CHECK(call)                                                                      \
    do {                                                                                 \
        resa_status s_ = (call);                                                         \
        if (s_ != RESA_OK) {                                                             \
            fprintf(stderr, "%s: %s\n", #call, resa_status_name(s_));                    \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

static void fill(float *x, int n) { while (n--) x[n] = (float)(rand() % 2001 - 1000) / 1000.0f; }

static resa_ctx *make(void)
{
    resa_ctx *c;
    CHECK(resa_ctx_create(RESA_BACKEND_CPU, NULL, &c));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, LAYERS));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, HQ));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, HKV));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, D));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_BLOCK_SIZE, B));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 4096));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 1));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_RECTIFY_INTERVAL, 16));
    CHECK(resa_ctx_set_param(c, RESA_PARAM_RECORD_SELECTION, 1));
    return c;
}

/*
 * One step of the sequence: `mode` (APPEND, DECODE or RECTIFY of n tokens) on
 * the single context and on the owner `o`; the other ranks answer the same
 * queries (QUERY_SPARSE for a decode, else QUERY_DENSE).
 */
static void step(int o, int32_t mode, int32_t n, int64_t G)
{
    static float q[PROMPT * HQ * D], k[PROMPT * HKV * D], v[PROMPT * HKV * D];
    static float out1[PROMPT * HQ * D], out[MAXR][PROMPT * HQ * D], lse[MAXR][PROMPT * HQ];
    static float merged[PROMPT * HQ * D];
    static float sc[MAXR][HKV * CAP], all_sc[MAXR * HKV * CAP], thr_s[HKV];
    static int32_t bl[MAXR][HKV * CAP], all_bl[MAXR * HKV * CAP], cnt[MAXR][HKV],
        all_cnt[MAXR * HKV], thr_b[HKV];
    const int sparse = mode == RESA_MODE_DECODE;
    int32_t mq = sparse ? RESA_MODE_QUERY_SPARSE : RESA_MODE_QUERY_DENSE;
    for (int r = 0; r < R; r++) /* the owner holds the tail; the others sit before G */
        CHECK(resa_seq_set_span(rank[r], rank_seq[r], first[r], r < o ? G : -1));
    CHECK(resa_ctx_step_begin(one, 1, &one_seq, &mode, &n, 0));
    for (int r = 0; r < R; r++)
        CHECK(resa_ctx_step_begin(rank[r], 1, &rank_seq[r], r == o ? &mode : &mq, &n, 0));
    for (int32_t l = 0; l < LAYERS; l++) {
        fill(q, n * HQ * D), fill(k, n * HKV * D), fill(v, n * HKV * D); /* the model */
        CHECK(resa_ctx_step_attend(one, l, q, k, v, out1, 0));
        if (sparse) { /* phase 1, the all-gather of the lists, the thresholds */
            for (int r = 0; r < R; r++) {
                CHECK(resa_ctx_step_block_scores(rank[r], l, q, CAP, sc[r], bl[r], cnt[r], 0));
                memcpy(all_sc + r * HKV * CAP, sc[r], sizeof sc[r]);   /* ncclAllGather */
                memcpy(all_bl + r * HKV * CAP, bl[r], sizeof bl[r]);
                memcpy(all_cnt + r * HKV, cnt[r], sizeof cnt[r]);
            }
            CHECK(resa_ctx_step_thresholds(rank[0], R, CAP, all_sc, all_bl, all_cnt, thr_s,
                                           thr_b, 0)); /* every rank gets the same */
        }
        for (int r = 0; r < R; r++) /* only the owner stores K/V */
            CHECK(resa_ctx_step_attend_ex(rank[r], l, q, r == o ? k : NULL, r == o ? v : NULL,
                                          out[r], lse[r], sparse ? thr_s : NULL,
                                          sparse ? thr_b : NULL, 0));
        /* out and lse of every rank, one after another: what ncclAllGather leaves */
        static float parts[MAXR * PROMPT * HQ * D], plse[MAXR * PROMPT * HQ];
        for (int r = 0; r < R; r++) {
            memcpy(parts + (size_t)r * n * HQ * D, out[r], sizeof(float) * n * HQ * D);
            memcpy(plse + (size_t)r * n * HQ, lse[r], sizeof(float) * n * HQ);
        }
        CHECK(resa_ctx_merge_states(rank[0], R, (int64_t)n * HQ, parts, plse, merged, NULL, 0));
        for (int64_t i = 0; i < (int64_t)n * HQ * D; i++)
            max_diff = fmax(max_diff, fabs((double)merged[i] - out1[i]));
    }
    CHECK(resa_ctx_step_end(one, 0));
    for (int r = 0; r < R; r++)
        CHECK(resa_ctx_step_end(rank[r], 0));
    for (int32_t l = 0; sparse && l < LAYERS; l++) /* the same blocks, in global indices */
        for (int32_t h = 0; h < HKV; h++) {
            int32_t a[256], b[256];
            int64_t na = 0, nb = 0, c;
            CHECK(resa_seq_selected_blocks(one, one_seq, l, h, a, 256, &na));
            for (int r = 0; r < R; r++, nb += c)
                CHECK(resa_seq_selected_blocks(rank[r], rank_seq[r], l, h, b + nb, 256 - nb, &c));
            same_sel &= na == nb; /* each rank's list is ascending and the spans are ordered */
            for (int64_t i = 0; i < na && i < nb; i++)
                same_sel &= a[i] == b[i];
        }
}

int main(int argc, char **argv)
{
    if (argc > 1)
        R = atoi(argv[1]);
    if (R < 1 || R > MAXR) {
        fprintf(stderr, "usage: context_parallel [R in 1..%d]\n", MAXR);
        return 2;
    }
    one = make();
    CHECK(resa_seq_create(one, &one_seq));
    /* the prompt's whole blocks shared out evenly; the last rank also gets the rest */
    for (int r = 0; r <= R; r++)
        first[r] = (int64_t)(PROMPT / B) * r / R * B;
    first[R] = PROMPT;
    for (int r = 0; r < R; r++) {
        rank[r] = make();
        CHECK(resa_seq_create(rank[r], &rank_seq[r]));
        CHECK(resa_seq_set_span(rank[r], rank_seq[r], first[r], -1));
    }
    int64_t G = 0;
    for (int r = 0; r < R; r++) /* prefill: rank r stores its span, the others answer */
        while (G < first[r + 1]) {
            int32_t n = (int32_t)(first[r + 1] - G < 256 ? first[r + 1] - G : 256);
            step(r, RESA_MODE_APPEND, n, G);
            G += n;
        }
    int rectified = 0;
    for (int t = 0; t < TOKENS; t++) {
        int32_t due;
        int64_t pending;
        CHECK(resa_seq_rectify_due(rank[R - 1], rank_seq[R - 1], &due)); /* the owner knows */
        CHECK(resa_seq_pending(rank[R - 1], rank_seq[R - 1], &pending));
        if (due) {
            step(R - 1, RESA_MODE_RECTIFY, (int32_t)pending, G);
            rectified++;
        } else {
            step(R - 1, RESA_MODE_DECODE, 1, G++);
        }
    }
    printf("%d ranks, %lld tokens (spans", R, (long long)G);
    for (int r = 0; r < R; r++)
        printf(" [%lld, %lld)", (long long)first[r], (long long)(r == R - 1 ? G : first[r + 1]));
    printf("), %d rectifications\n", rectified);
    printf("max |merged - one context| = %.3g; selected blocks %s\n", max_diff,
           same_sel ? "identical" : "DIFFER");
    resa_ctx_destroy(one);
    for (int r = 0; r < R; r++)
        resa_ctx_destroy(rank[r]);
    return same_sel && max_diff < 1e-4 ? 0 : 1;
}
