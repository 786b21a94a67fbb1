/* SPDX-License-Identifier: MIT */
/*
 * The CUDA backend against the float64 reference (through the same harness
 * as the CPU tests: every output, selection, length and pending count of
 * every step), and against the CPU backend for a CUDA-graph-captured decode
 * step.  Each also with an fp8 cache (KV_DTYPE FP8_E4M3, the IO dtype f16 or
 * bf16: the reference attends its own dequantized values, ref.c; the graph
 * test compares with the CPU backend's fp8 cache).
 * Skips (exit 77) where there is no GPU or no CUDA module.
 * RESA_TEST_QUICK=1 runs a smaller set (for compute-sanitizer); RESA_TEST_SHARD=k/n
 * one n-th of the tests (n processes at once on a machine with many cores).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_shim.h"
#include "harness.h"

static void cuda_params(ref_params *p, int32_t hq, int32_t hkv, int32_t d, resa_dtype dt,
                        int32_t layers)
{
    ref_params_default(p);
    p->n_layers = layers;
    p->hq = hq;
    p->hkv = hkv;
    p->d = d;
    p->kv_dtype = dt;
    p->io_dtype = dt;
}

static void cuda_init(th *t, const char *name, const ref_params *p, int64_t max_tokens)
{
    th_opts o;
    th_opts_default(&o);
    o.backend = RESA_BACKEND_CUDA;
    o.max_tokens = max_tokens;
    th_init(t, name, p, &o);
}

/* Prefill by APPEND_KV in chunks, then a checked dense APPEND of the tail. */
static void prefill(th *t, th_seq *s, int64_t len)
{
    int64_t dense = len < 40 ? len : 40;
    if (len - dense > 0)
        th_prefill(t, s, len - dense, 4096, 1);
    if (dense > 0)
        th_one(t, s, RESA_MODE_APPEND, (int32_t)dense);
}

typedef struct gcase {
    int32_t g, d;
    resa_dtype dt;
    int64_t len;
} gcase;

/* Every group size 1..16 that matters, every head dim, both dtypes, lengths
 * that are not multiples of the block size. */
static const gcase gcases[] = {
    {1, 64, RESA_DTYPE_BF16, 1},     {2, 128, RESA_DTYPE_F16, 15},
    {4, 256, RESA_DTYPE_BF16, 17},   {7, 128, RESA_DTYPE_BF16, 255},
    {8, 64, RESA_DTYPE_F16, 257},    {16, 128, RESA_DTYPE_BF16, 1000},
    {4, 128, RESA_DTYPE_F16, 5000},  {7, 256, RESA_DTYPE_F16, 3001},
    {16, 64, RESA_DTYPE_F16, 2049},  {1, 256, RESA_DTYPE_BF16, 4097},
    {2, 64, RESA_DTYPE_BF16, 70001}, {8, 128, RESA_DTYPE_BF16, 20011},
};
#define N_GCASES ((int)(sizeof gcases / sizeof gcases[0]))

/* _i >= N_GCASES: the same case with an fp8 cache. */
START_TEST(test_cuda_decode)
{
    const gcase *c = &gcases[_i % N_GCASES];
    if (th_quick() && c->len > 5000)
        return;
    char name[64];
    snprintf(name, sizeof name, "cuda_decode_%d", _i);
    ref_params p;
    cuda_params(&p, 2 * c->g, 2, c->d, c->dt, 2);
    if (_i >= N_GCASES)
        p.kv_dtype = RESA_DTYPE_FP8_E4M3;
    p.summary_fp8 = _i % 2; /* fp8 summaries on every other case */
    th t;
    cuda_init(&t, name, &p, c->len + 4096);
    th_seq s;
    th_seq_create(&t, &s);
    prefill(&t, &s, c->len);
    for (int i = 0; i < 3; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1); /* defaults: r 0.1, n_min 16 */
    t.p.fraction = 1.0; /* dense decode through the same path */
    th_push_method(&t);
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    t.p.fraction = 0.1; /* sparse at every length, with sinks */
    t.p.min_blocks = 2;
    t.p.sink_blocks = 1;
    t.p.local_blocks = 2;
    th_push_method(&t);
    for (int i = 0; i < 3; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    t.p.score_width = 0.5; /* between the box centre and the paper's bound */
    th_push_method(&t);
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    t.p.score_width = 0.0; /* the box centre */
    th_push_method(&t);
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    t.p.group_score = RESA_GROUP_SCORE_HEAD_SHARE; /* per-head shares, both widths */
    for (int i = 0; i < 2; i++) {
        t.p.score_width = i == 0 ? 0.5 : 1.0;
        th_push_method(&t);
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    }
    t.p.group_score = RESA_GROUP_SCORE_POOLED;
    t.p.score_width = 0.5;
    th_push_method(&t);
    /* pending tokens now: rectify them (dense, overwriting) */
    if (ref_seq_pending(s.r) > 0)
        th_one(&t, &s, RESA_MODE_RECTIFY, 0);
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* Ragged continuous batching: prompts, decodes, rectifications and K/V-only
 * appends of sequences of different lengths in the same steps; a fork. */
START_TEST(test_cuda_mixed_batch)
{
    ref_params p;
    cuda_params(&p, 8, 2, 128, _i % 2 ? RESA_DTYPE_F16 : RESA_DTYPE_BF16, 3);
    p.summary_fp8 = _i % 2; /* f16 with fp8 summaries: their refresh on fork and rectify */
    if (_i >= 2) /* an fp8 cache: scales through fork, copy-on-write and rectify */
        p.kv_dtype = RESA_DTYPE_FP8_E4M3;
    p.min_blocks = 2;
    p.interval = 5;
    th t;
    static const char *const names[] = {"cuda_mixed_bf16", "cuda_mixed_f16", "cuda_mixed_fp8_bf16",
                                        "cuda_mixed_fp8_f16"};
    cuda_init(&t, names[_i], &p, 65536);
    th_seq s[5];
    for (int i = 0; i < 5; i++)
        th_seq_create(&t, &s[i]);
    th_prefill(&t, &s[0], 777, 300, 0);
    th_prefill(&t, &s[1], 1500, 1000, 1);
    th_prefill(&t, &s[2], 33, 33, 0);
    int rounds = th_quick() ? 8 : 24;
    for (int r = 0; r < rounds; r++) {
        th_entry e[5];
        int n = 0;
        for (int i = 0; i < 5; i++) {
            int64_t pend = ref_seq_pending(s[i].r);
            int64_t f = t.p.interval;
            if (pend >= f)
                e[n++] = (th_entry){&s[i], RESA_MODE_RECTIFY, 0};
            else if (i == 3 && r % 4 == 0)
                e[n++] = (th_entry){&s[i], RESA_MODE_APPEND, 1 + (int32_t)ref_rng_range(&t.rng, 0, 70)};
            else if (i == 4 && r % 3 == 1)
                e[n++] = (th_entry){&s[i], RESA_MODE_APPEND_KV, 1 + (int32_t)ref_rng_range(&t.rng, 0, 40)};
            else if (s[i].r->len > 0)
                e[n++] = (th_entry){&s[i], RESA_MODE_DECODE, 1};
        }
        if (n > 0)
            th_step(&t, n, e);
        if (r == rounds / 2) { /* fork the longest; both go on */
            th_seq_release(&t, &s[2]);
            th_seq_fork(&t, &s[1], &s[2]);
        }
    }
    for (int i = 0; i < 5; i++) {
        th_check_state(&t, &s[i]);
        th_seq_release(&t, &s[i]);
    }
    th_fini(&t);
}
END_TEST

/* The fp8 cache's dense attention at d 128 and 256 (on Hopper the wgmma
 * kernel, whose producer converts raw e4m3 tiles into the MMA operands,
 * cuda/attention_dense_sm90.cu): prompt chunks of 1000 tokens by APPEND
 * (29 query tiles a KV head at g 4, each over up to 23 key tiles of 128 at
 * d 128 or 46 of 64 at d 256, the causal diagonal inside, the last key tile
 * partial: copied with zero fill, the others by TMA; 2 key splits on a
 * 132-SM GPU), then 45 sparse decodes and a RECTIFY of them all (2 query
 * tiles a KV head over ~2950 keys: 5 splits of several key tiles).
 * RESA_TEST_QUICK: 1300 tokens in chunks of 650.  _i: d 128 / 256 x IO
 * bf16 / f16. */
START_TEST(test_cuda_fp8_dense)
{
    const int32_t d = _i < 2 ? 128 : 256;
    char name[64];
    snprintf(name, sizeof name, "cuda_fp8_dense_%d", _i);
    ref_params p;
    cuda_params(&p, 8, 2, d, _i % 2 ? RESA_DTYPE_F16 : RESA_DTYPE_BF16, 2);
    p.kv_dtype = RESA_DTYPE_FP8_E4M3;
    p.interval = 0; /* rectify when this test says so */
    th t;
    cuda_init(&t, name, &p, 4096);
    th_seq s;
    th_seq_create(&t, &s);
    if (th_quick())
        th_prefill(&t, &s, 1300, 650, 0);
    else
        th_prefill(&t, &s, 2900, 1000, 0);
    for (int i = 0; i < 45; i++)
        th_one(&t, &s, RESA_MODE_DECODE, 1);
    TCHECK(ref_seq_pending(s.r) >= 40, "sparse decodes left %lld pending",
           (long long)ref_seq_pending(s.r));
    th_one(&t, &s, RESA_MODE_RECTIFY, 0);
    th_one(&t, &s, RESA_MODE_DECODE, 1);
    ref_seq_free(s.r);
    th_fini(&t);
}
END_TEST

/* Capacity errors change nothing on the GPU either. */
START_TEST(test_cuda_capacity)
{
    ref_params p;
    cuda_params(&p, 4, 1, 64, RESA_DTYPE_BF16, 1);
    th t;
    cuda_init(&t, "cuda_capacity", &p, 256);
    th_seq a, b;
    th_seq_create(&t, &a);
    th_seq_create(&t, &b);
    th_prefill(&t, &a, 200, 64, 0);
    th_prefill(&t, &b, 40, 40, 0);
    int32_t ids[1] = {b.id}, modes[1] = {RESA_MODE_APPEND}, n[1] = {100};
    resa_status st = resa_ctx_step_begin(t.ctx, 1, ids, modes, n, 0);
    TCHECK(st == RESA_ERR_CAPACITY, "expected RESA_ERR_CAPACITY, got %s", resa_status_name(st));
    th_check_state(&t, &a);
    th_check_state(&t, &b);
    th_one(&t, &a, RESA_MODE_DECODE, 1); /* still correct after the refusal */
    th_one(&t, &b, RESA_MODE_DECODE, 1);
    ref_seq_free(a.r);
    ref_seq_free(b.r);
    th_fini(&t);
}
END_TEST

/* ---- CUDA graph: a whole decode step (all layers) captured and replayed ---- */

static uint16_t to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
static float from_bf16(uint16_t h)
{
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

/* _i = 1: both contexts with an fp8 cache (the same bytes and scales). */
START_TEST(test_cuda_graph_replay)
{
    enum { L = 4, HQ = 16, HKV = 4, D = 128, B = 3, LEN = 3000 };
    cuda_shim cu;
    TCHECK(cuda_shim_load(&cu) == 0, "libcudart");
    resa_ctx *gpu = NULL, *cpu = NULL;
    ck_assert_int_eq(resa_ctx_create(RESA_BACKEND_CUDA, NULL, &gpu), RESA_OK);
    ck_assert_int_eq(resa_ctx_create(RESA_BACKEND_CPU, NULL, &cpu), RESA_OK);
    void *stream = NULL;
    ck_assert_int_eq(cu.StreamCreate(&stream), 0);
    TOK(gpu, resa_ctx_set_stream(gpu, stream));
    resa_ctx *both[2] = {gpu, cpu};
    for (int c = 0; c < 2; c++) {
        resa_ctx *x = both[c];
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_NUM_LAYERS, L));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_NUM_Q_HEADS, HQ));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_NUM_KV_HEADS, HKV));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_HEAD_DIM, D));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_KV_DTYPE,
                                  _i ? RESA_DTYPE_FP8_E4M3 : RESA_DTYPE_BF16));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_IO_DTYPE, RESA_DTYPE_BF16));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_MAX_TOKENS, B * (LEN + 64)));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_MAX_SEQUENCES, B));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_RECORD_SELECTION, 1));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_SELECT_MIN_BLOCKS, 4));
    }
    int32_t sg[B], sc[B];
    ref_rng rng = {th_test_seed(_i ? "cuda_graph_fp8" : "cuda_graph")};
    size_t kv_elems = (size_t)LEN * HKV * D;
    uint16_t *hk = malloc(kv_elems * 2), *hv = malloc(kv_elems * 2);
    void *dk, *dv;
    cu.Malloc(&dk, kv_elems * 2);
    cu.Malloc(&dv, kv_elems * 2);
    for (int i = 0; i < B; i++) {
        TOK(gpu, resa_seq_create(gpu, &sg[i]));
        TOK(cpu, resa_seq_create(cpu, &sc[i]));
        int32_t n = LEN - 100 * i, mode = RESA_MODE_APPEND_KV; /* ragged lengths */
        for (int l = 0; l < L; l++) {
            for (size_t j = 0; j < (size_t)n * HKV * D; j++) {
                hk[j] = to_bf16((float)ref_rng_normal(&rng));
                hv[j] = to_bf16((float)ref_rng_normal(&rng));
            }
            if (l == 0) {
                TOK(gpu, resa_ctx_step_begin(gpu, 1, &sg[i], &mode, &n, 0));
                TOK(cpu, resa_ctx_step_begin(cpu, 1, &sc[i], &mode, &n, 0));
            }
            cu.Memcpy(dk, hk, (size_t)n * HKV * D * 2, 1);
            cu.Memcpy(dv, hv, (size_t)n * HKV * D * 2, 1);
            TOK(gpu, resa_ctx_step_attend(gpu, l, NULL, dk, dv, NULL, 0));
            TOK(cpu, resa_ctx_step_attend(cpu, l, NULL, hk, hv, NULL, 0));
            TOK(gpu, resa_ctx_synchronize(gpu)); /* hk/hv are refilled next layer */
        }
        TOK(gpu, resa_ctx_step_end(gpu, 0));
        TOK(cpu, resa_ctx_step_end(cpu, 0));
    }
    /* fixed device buffers for the decode step, as a graph-capturing host has */
    size_t q_elems = (size_t)B * HQ * D, k_elems = (size_t)B * HKV * D;
    void *dq[L], *dkk[L], *dvv[L], *dout[L];
    uint16_t *hq = malloc(q_elems * 2 * L), *hkk = malloc(k_elems * 2 * L),
             *hvv = malloc(k_elems * 2 * L), *hout = malloc(q_elems * 2 * L),
             *cout = malloc(q_elems * 2 * L);
    for (int l = 0; l < L; l++) {
        cu.Malloc(&dq[l], q_elems * 2);
        cu.Malloc(&dkk[l], k_elems * 2);
        cu.Malloc(&dvv[l], k_elems * 2);
        cu.Malloc(&dout[l], q_elems * 2);
    }
    int32_t modes[B] = {RESA_MODE_DECODE, RESA_MODE_DECODE, RESA_MODE_DECODE};
    int32_t ones[B] = {1, 1, 1};
    void *graph = NULL, *exec = NULL;
    int64_t compared = 0, heads = 0;
    for (int step = 0; step < 4; step++) {
        /* new inputs in the same device buffers, as a graph-replaying host does */
        for (size_t j = 0; j < q_elems * L; j++)
            hq[j] = to_bf16((float)ref_rng_normal(&rng));
        for (size_t j = 0; j < k_elems * L; j++) {
            hkk[j] = to_bf16((float)ref_rng_normal(&rng));
            hvv[j] = to_bf16((float)ref_rng_normal(&rng));
        }
        for (int l = 0; l < L; l++) {
            cu.Memcpy(dq[l], hq + q_elems * l, q_elems * 2, 1);
            cu.Memcpy(dkk[l], hkk + k_elems * l, k_elems * 2, 1);
            cu.Memcpy(dvv[l], hvv + k_elems * l, k_elems * 2, 1);
            cu.Memset(dout[l], 0xff, q_elems * 2);
        }
        if (step == 0) { /* capture every layer of the first step in one graph */
            TFAIL(gpu, RESA_ERR_INVALID_ARGUMENT, "flags",
                  resa_ctx_step_begin(gpu, B, sg, modes, ones, RESA_STEP_REPLAY));
            TOK(gpu, resa_ctx_step_begin(gpu, B, sg, modes, ones, 0));
            ck_assert_int_eq(cu.StreamBeginCapture(stream, 0), 0);
            for (int l = 0; l < L; l++)
                TOK(gpu, resa_ctx_step_attend(gpu, l, dq[l], dkk[l], dvv[l], dout[l], 0));
            ck_assert_int_eq(cu.StreamEndCapture(stream, &graph), 0);
            ck_assert_int_eq(cu.GraphInstantiate(&exec, graph, 0), 0);
        } else { /* later steps: same shape, longer sequences, replayed */
            TOK(gpu, resa_ctx_step_begin(gpu, B, sg, modes, ones, RESA_STEP_REPLAY));
            TFAIL(gpu, RESA_ERR_BAD_STATE, "RESA_STEP_REPLAY",
                  resa_ctx_step_attend(gpu, 0, dq[0], dkk[0], dvv[0], dout[0], 0));
        }
        ck_assert_int_eq(cu.GraphLaunch(exec, stream), 0);
        TOK(gpu, resa_ctx_step_end(gpu, 0));
        TOK(gpu, resa_ctx_synchronize(gpu));
        for (int l = 0; l < L; l++)
            cu.Memcpy(hout + q_elems * l, dout[l], q_elems * 2, 2);

        /* the CPU backend, same inputs: the oracle */
        TOK(cpu, resa_ctx_step_begin(cpu, B, sc, modes, ones, 0));
        for (int l = 0; l < L; l++)
            TOK(cpu, resa_ctx_step_attend(cpu, l, hq + q_elems * l, hkk + k_elems * l,
                                          hvv + k_elems * l, cout + q_elems * l, 0));
        TOK(cpu, resa_ctx_step_end(cpu, 0));

        /* compare the heads whose block selection agrees (fp32 near-ties may
         * legitimately differ); nearly all must */
        for (int i = 0; i < B; i++)
            for (int l = 0; l < L; l++)
                for (int h = 0; h < HKV; h++) {
                    int32_t bg[512], bc[512];
                    int64_t ng = 0, nc = 0;
                    TOK(gpu, resa_seq_selected_blocks(gpu, sg[i], l, h, bg, 512, &ng));
                    TOK(cpu, resa_seq_selected_blocks(cpu, sc[i], l, h, bc, 512, &nc));
                    heads++;
                    TCHECK(ng > 0 && ng < (LEN + 16) / 16, "step %d: %lld blocks selected",
                           step, (long long)ng);
                    if (ng != nc || memcmp(bg, bc, sizeof(int32_t) * (size_t)ng) != 0)
                        continue;
                    compared++;
                    double num = 0, den = 0;
                    for (int j = 0; j < HQ / HKV; j++)
                        for (int e = 0; e < D; e++) {
                            size_t at = q_elems * l + ((size_t)i * HQ + h * (HQ / HKV) + j) * D + e;
                            double g = from_bf16(hout[at]), c = from_bf16(cout[at]);
                            TCHECK(g == g, "step %d: NaN (unwritten?) output at seq %d layer %d",
                                   step, i, l);
                            num += (g - c) * (g - c);
                            den += c * c;
                        }
                    TCHECK(num <= 1e-4 * den, "step %d seq %d layer %d head %d: relative error "
                           "%.3g between the replayed graph and the CPU backend", step, i, l, h,
                           den > 0 ? sqrt(num / den) : 0.0);
                }
    }
    TCHECK(compared >= heads * 9 / 10, "only %lld of %lld heads chose the same blocks",
           (long long)compared, (long long)heads);
    for (int l = 0; l < L; l++) {
        cu.Free(dq[l]);
        cu.Free(dkk[l]);
        cu.Free(dvv[l]);
        cu.Free(dout[l]);
    }
    cu.Free(dk);
    cu.Free(dv);
    free(hk);
    free(hv);
    free(hq);
    free(hkk);
    free(hvv);
    free(hout);
    free(cout);
    cu.GraphExecDestroy(exec);
    cu.GraphDestroy(graph);
    resa_ctx_destroy(gpu);
    resa_ctx_destroy(cpu);
    cu.StreamDestroy(stream);
}
END_TEST

/* An fp8 cache whose first token's V is 2^24 times the others' while its
 * score is 24 ln 2 below theirs (q.k0 made so), so that its P v stays
 * comparable to the rest: the sparse kernel's f16 factor P v_scale / c must
 * keep every key (attention_sparse.cu, attend_unit_f8; a running maximum for
 * c lost every later key here).  The CUDA decode (SELECT_FRACTION 1: every
 * block, through the sparse kernels) against the CPU backend's, which rounds
 * each value to bf16 and has no such range: within 1e-2 relative per head. */
START_TEST(test_cuda_fp8_v_outlier)
{
    enum { HQ = 8, HKV = 2, D = 128, LEN = 500, G = HQ / HKV };
    const int outlier = 24;
    cuda_shim cu;
    TCHECK(cuda_shim_load(&cu) == 0, "libcudart");
    resa_ctx *gpu = NULL, *cpu = NULL;
    ck_assert_int_eq(resa_ctx_create(RESA_BACKEND_CUDA, NULL, &gpu), RESA_OK);
    ck_assert_int_eq(resa_ctx_create(RESA_BACKEND_CPU, NULL, &cpu), RESA_OK);
    resa_ctx *both[2] = {gpu, cpu};
    for (int c = 0; c < 2; c++) {
        resa_ctx *x = both[c];
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_NUM_LAYERS, 1));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_NUM_Q_HEADS, HQ));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_NUM_KV_HEADS, HKV));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_HEAD_DIM, D));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_KV_DTYPE, RESA_DTYPE_FP8_E4M3));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_IO_DTYPE, RESA_DTYPE_BF16));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_MAX_TOKENS, 1024));
        TOK(x, resa_ctx_set_param(x, RESA_PARAM_MAX_SEQUENCES, 1));
        TOK(x, resa_ctx_set_param_f64(x, RESA_PARAM_SELECT_FRACTION, 1.0));
    }
    ref_rng rng = {th_test_seed("cuda_fp8_v_outlier")};
    /* one query direction per KV head, every query head of its group */
    float qd[HKV][D];
    for (int h = 0; h < HKV; h++)
        for (int e = 0; e < D; e++)
            qd[h][e] = from_bf16(to_bf16((float)ref_rng_normal(&rng)));
    size_t kv = (size_t)LEN * HKV * D;
    uint16_t *hk = malloc(kv * 2), *hv = malloc(kv * 2);
    for (size_t j = 0; j < kv; j++) {
        hk[j] = to_bf16((float)ref_rng_normal(&rng));
        hv[j] = to_bf16((float)ref_rng_normal(&rng));
    }
    for (int h = 0; h < HKV; h++) { /* token 0: score -24 ln 2 (scale 1/sqrt(D)), V x 2^24 */
        double qq = 0;
        for (int e = 0; e < D; e++)
            qq += (double)qd[h][e] * qd[h][e];
        double a = outlier * log(2.0) * sqrt((double)D) / qq;
        for (int e = 0; e < D; e++) {
            hk[(size_t)h * D + e] = to_bf16((float)(-a * qd[h][e]));
            hv[(size_t)h * D + e] = to_bf16(ldexpf(from_bf16(hv[(size_t)h * D + e]), outlier));
        }
    }
    uint16_t hq[HQ * D], hk1[HKV * D], hv1[HKV * D], hout[HQ * D], cout[HQ * D];
    for (int j = 0; j < HQ; j++)
        for (int e = 0; e < D; e++)
            hq[j * D + e] = to_bf16(qd[j / G][e]);
    for (int j = 0; j < HKV * D; j++) {
        hk1[j] = to_bf16((float)ref_rng_normal(&rng));
        hv1[j] = to_bf16((float)ref_rng_normal(&rng));
    }
    void *dk, *dv, *dq, *dk1, *dv1, *dout;
    ck_assert_int_eq(cu.Malloc(&dk, kv * 2) | cu.Malloc(&dv, kv * 2) | cu.Malloc(&dq, sizeof hq) |
                         cu.Malloc(&dk1, sizeof hk1) | cu.Malloc(&dv1, sizeof hv1) |
                         cu.Malloc(&dout, sizeof hout), 0);
    cu.Memcpy(dk, hk, kv * 2, 1);
    cu.Memcpy(dv, hv, kv * 2, 1);
    cu.Memcpy(dq, hq, sizeof hq, 1);
    cu.Memcpy(dk1, hk1, sizeof hk1, 1);
    cu.Memcpy(dv1, hv1, sizeof hv1, 1);
    cu.Memset(dout, 0xff, sizeof hout);
    int32_t sg, sc, n = LEN, one = 1, fill = RESA_MODE_APPEND_KV, dec = RESA_MODE_DECODE;
    TOK(gpu, resa_seq_create(gpu, &sg));
    TOK(cpu, resa_seq_create(cpu, &sc));
    TOK(gpu, resa_ctx_step_begin(gpu, 1, &sg, &fill, &n, 0));
    TOK(gpu, resa_ctx_step_attend(gpu, 0, NULL, dk, dv, NULL, 0));
    TOK(gpu, resa_ctx_step_end(gpu, 0));
    TOK(cpu, resa_ctx_step_begin(cpu, 1, &sc, &fill, &n, 0));
    TOK(cpu, resa_ctx_step_attend(cpu, 0, NULL, hk, hv, NULL, 0));
    TOK(cpu, resa_ctx_step_end(cpu, 0));
    TOK(gpu, resa_ctx_step_begin(gpu, 1, &sg, &dec, &one, 0));
    TOK(gpu, resa_ctx_step_attend(gpu, 0, dq, dk1, dv1, dout, 0));
    TOK(gpu, resa_ctx_step_end(gpu, 0));
    TOK(gpu, resa_ctx_synchronize(gpu));
    cu.Memcpy(hout, dout, sizeof hout, 2);
    TOK(cpu, resa_ctx_step_begin(cpu, 1, &sc, &dec, &one, 0));
    TOK(cpu, resa_ctx_step_attend(cpu, 0, hq, hk1, hv1, cout, 0));
    TOK(cpu, resa_ctx_step_end(cpu, 0));
    for (int j = 0; j < HQ; j++) {
        double num = 0, den = 0;
        for (int e = 0; e < D; e++) {
            double g = from_bf16(hout[j * D + e]), c = from_bf16(cout[j * D + e]);
            TCHECK(isfinite(g) && isfinite(c), "head %d: non-finite output", j);
            num += (g - c) * (g - c);
            den += c * c;
        }
        TCHECK(num <= 1e-4 * den, "query head %d: relative error %.3g against the CPU backend "
               "with a V outlier of 2^%d", j, den > 0 ? sqrt(num / den) : 0.0, outlier);
    }
    cu.Free(dk);
    cu.Free(dv);
    cu.Free(dq);
    cu.Free(dk1);
    cu.Free(dv1);
    cu.Free(dout);
    free(hk);
    free(hv);
    resa_ctx_destroy(gpu);
    resa_ctx_destroy(cpu);
}
END_TEST

int main(void)
{
    if (!th_cuda_usable()) {
        printf("check_cuda: no usable GPU or CUDA module here: skipped\n");
        return 77; /* meson: SKIP */
    }
    Suite *su = suite_create("cuda");
    TCase *tc = tcase_create("cuda");
    tcase_set_tags(tc, "gpu");
    tcase_set_timeout(tc, 600);
    /* RESA_TEST_SHARD=k/n: one n-th of the tests (th_add_loop) */
    th_add_loop(tc, test_cuda_decode, 0, 2 * N_GCASES);
    th_add_loop(tc, test_cuda_mixed_batch, 0, 4);
    th_add_loop(tc, test_cuda_fp8_dense, 0, 4);
    th_add_loop(tc, test_cuda_fp8_v_outlier, 0, 1);
    th_add_loop(tc, test_cuda_capacity, 0, 1);
    th_add_loop(tc, test_cuda_graph_replay, 0, 2);
    suite_add_tcase(su, tc);
    /* CUDA cannot be used in a child forked after the parent touched it
     * (th_cuda_usable did), so the GPU tests run in-process; meson's
     * timeout bounds them. */
    return th_run_suite(su, 0);
}
