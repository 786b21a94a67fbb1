// SPDX-License-Identifier: MIT
// resa-e2e: the host engine (libresa context, context fill, prefill, decode
// loop with CUDA graph capture and replay, rectification, timing).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>

#include <cuda_profiler_api.h>

#include "engine.h"

namespace {

constexpr int kBlock = 16; // libresa's default block size, used here

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Tokens one sequence can hold: context, every generated token, a margin.
int64_t seq_capacity(long ctx, const Options &o)
{
    return round_up(ctx + o.warmup + o.steps + 64, kBlock);
}

int step_capacity(int batch, const Options &o)
{
    return std::max({o.chunk, o.prompt, batch * o.interval, batch});
}

int act_rows(int batch, const Options &o) { return std::max({o.prompt, batch * o.interval, batch}); }

uint64_t host_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// RESA_E2E_PROFILE_STEP=k: the k-th measured decode step (graph replay, no
// rectification) runs between cudaProfilerStart and cudaProfilerStop, so
// that `ncu --profile-from-start off` times the kernels of one whole step.
int profile_step()
{
    const char *v = std::getenv("RESA_E2E_PROFILE_STEP");
    return v && *v ? std::atoi(v) : -1;
}

double wall_s()
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

float elapsed_ms(cudaEvent_t a, cudaEvent_t b)
{
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    return ms;
}

// Everything one (context, batch) point owns on one GPU.
struct Point {
    const Model &m;
    Gemms &g;
    cudaStream_t s;
    const Options &o;
    long ctx_len;
    int batch;
    const std::vector<ModeSpec> &specs; // the modes to run, all of one KV dtype
    bool kv_fp8;
    bool lead;                          // rank 0 (or no TP): progress messages, profiling
    int64_t seq_cap = 0;
    resa_ctx *ctx = nullptr;
    Acts a;
    int *d_tok = nullptr, *d_pos = nullptr;    // decode inputs, fixed for the graph
    int *d_scratch = nullptr;                  // sampled tokens of the no-attention variant
    int *d_hist = nullptr;                     // [batch][seq_cap] token fed at each position
    int *d_rect = nullptr;                     // [2][batch] rectification entries: batch index, start
    int *h_rect = nullptr;                     // pinned staging for d_rect
    cudaEvent_t rect_copied = nullptr;         // h_rect may be rewritten once this completed
    bf16 *fill_k = nullptr, *fill_v = nullptr; // one chunk of random K/V
    std::vector<int32_t> seqs;

    Point(Rank &r, const Options &o_, long c, int n, const std::vector<ModeSpec> &ms)
        : m(r.m), g(*r.gemms), s(r.s), o(o_), ctx_len(c), batch(n), specs(ms),
          kv_fp8(!ms.empty() && ms[0].kv_fp8), lead(r.m.rank == 0)
    {
    }

    void setup();
    void teardown();
    ModeResult run_mode(const ModeSpec &spec);
    void fill_and_prefill(ModeResult &r);
    void rectify(const std::vector<int> &due, cudaEvent_t e0, cudaEvent_t e1);
    Pass decode_pass(bool attention) const;
};

void Point::setup()
{
    const ModelDims &D = m.dims;
    seq_cap = seq_capacity(ctx_len, o);
    CR(ctx, resa_ctx_create(RESA_BACKEND_CUDA, nullptr, &ctx));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_NUM_LAYERS, D.layers));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_NUM_Q_HEADS, D.hq));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_NUM_KV_HEADS, D.hkv));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_HEAD_DIM, D.d));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_KV_DTYPE,
                               kv_fp8 ? RESA_DTYPE_FP8_E4M3 : RESA_DTYPE_BF16));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_IO_DTYPE, RESA_DTYPE_BF16));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_SUMMARY_FORMAT,
                               o.fp8_summaries ? RESA_SUMMARY_FP8_E4M3 : RESA_SUMMARY_KV_DTYPE));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_MAX_SEQUENCES, batch));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_MAX_TOKENS, seq_cap * batch));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_MAX_SEQ_TOKENS, seq_cap));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_MAX_STEP_TOKENS, step_capacity(batch, o)));
    CR(ctx, resa_ctx_set_stream(ctx, (void *)s));
    // the method (sink, width, n_min, ...); r and f are set per mode
    CR(ctx, resa_ctx_set_preset(ctx, o.preset));

    acts_alloc(a, D, act_rows(batch, o), batch);
    // the timed passes: decode (batch rows, logits) and rectification
    // (interval rows per sequence, no logits); the prefill keeps the default
    model_tune_gemms(m, a, g, batch, 1, true);
    for (const ModeSpec &ms : specs)
        if (ms.mode == "resa") {
            model_tune_gemms(m, a, g, batch * o.interval, o.interval, false);
            break;
        }
    CK(cudaMalloc(&d_tok, batch * sizeof(int)));
    CK(cudaMalloc(&d_pos, batch * sizeof(int)));
    CK(cudaMalloc(&d_scratch, batch * sizeof(int)));
    CK(cudaMalloc(&d_rect, 2 * batch * sizeof(int)));
    CK(cudaHostAlloc(&h_rect, 2 * batch * sizeof(int), cudaHostAllocDefault));
    CK(cudaEventCreateWithFlags(&rect_copied, cudaEventDisableTiming));
    CK(cudaMalloc(&d_hist, (size_t)batch * seq_cap * sizeof(int)));
    CK(cudaMemsetAsync(d_hist, 0, (size_t)batch * seq_cap * sizeof(int), s));
    size_t kv_chunk = (size_t)o.chunk * D.hkv * D.d;
    CK(cudaMalloc(&fill_k, kv_chunk * sizeof(bf16)));
    CK(cudaMalloc(&fill_v, kv_chunk * sizeof(bf16)));
    seqs.assign(batch, -1);
}

void Point::teardown()
{
    CR(ctx, resa_ctx_synchronize(ctx));
    resa_ctx_destroy(ctx);
    ctx = nullptr;
    acts_free(a);
    void *ptrs[] = {d_tok, d_pos, d_scratch, d_rect, d_hist, fill_k, fill_v};
    for (void *p : ptrs)
        CK(cudaFree(p));
    CK(cudaFreeHost(h_rect));
    CK(cudaEventDestroy(rect_copied));
}

// Random K/V up to ctx - prompt (RESA_MODE_APPEND_KV, one chunk per step),
// then the last `prompt` tokens through the model (RESA_MODE_APPEND, one
// sequence per step) whose last logits give each sequence's first token.
void Point::fill_and_prefill(ModeResult &r)
{
    const ModelDims &D = m.dims;
    const int64_t fill_len = ctx_len - o.prompt;
    // The first decode feeds position ctx.  Uploaded before the prefill's
    // all-reduces (under TP): a copy from pageable memory may wait for the
    // stream while holding a driver lock that another rank's thread needs
    // before it can issue its side of those all-reduces.
    std::vector<int> pos(batch, (int)ctx_len);
    CK(cudaMemcpyAsync(d_pos, pos.data(), batch * sizeof(int), cudaMemcpyHostToDevice, s));
    double t0 = wall_s();
    for (int b = 0; b < batch; b++)
        for (int64_t start = 0; start < fill_len; start += o.chunk) {
            int32_t n = (int32_t)std::min<int64_t>(o.chunk, fill_len - start);
            int32_t mode = RESA_MODE_APPEND_KV;
            CR(ctx, resa_ctx_step_begin(ctx, 1, &seqs[b], &mode, &n, 0));
            for (int l = 0; l < D.layers; l++) {
                uint64_t seed = host_mix(kSeed ^ host_mix(((uint64_t)b << 16) | (uint64_t)l));
                launch_fill_kv(fill_k, fill_v, n, D.hkv * D.d, seed, start, s);
                CR(ctx, resa_ctx_step_attend(ctx, l, nullptr, fill_k, fill_v, nullptr, 0));
            }
            CR(ctx, resa_ctx_step_end(ctx, 0));
        }
    CR(ctx, resa_ctx_synchronize(ctx));
    double t1 = wall_s();
    for (int b = 0; b < batch; b++) {
        int32_t mode = RESA_MODE_APPEND, n = o.prompt;
        CR(ctx, resa_ctx_step_begin(ctx, 1, &seqs[b], &mode, &n, 0));
        launch_prompt_rows(a.rows_tok, a.rows_pos, b, 1, o.prompt, fill_len, D.vocab, kSeed + 7,
                           s);
        Pass p;
        p.rows = o.prompt;
        p.rows_per_seq = o.prompt;
        p.tok = a.rows_tok;
        p.pos = a.rows_pos;
        p.hist = d_hist;
        p.hist_stride = seq_cap;
        p.seq_base = b;
        p.ctx = ctx;
        p.tok_out = d_tok + b;
        model_forward(m, a, g, s, p);
        CR(ctx, resa_ctx_step_end(ctx, 0));
    }
    CR(ctx, resa_ctx_synchronize(ctx));
    r.fill_s = t1 - t0;
    r.prefill_s = wall_s() - t1;
}

// One decode row per sequence: embedding of d_tok at d_pos ... argmax into
// d_tok, d_pos + 1.  Without attention: no libresa call, no state changes.
Pass Point::decode_pass(bool attention) const
{
    Pass p;
    p.rows = batch;
    p.rows_per_seq = 1;
    p.tok = d_tok;
    p.pos = d_pos;
    p.hist = attention ? d_hist : nullptr;
    p.hist_stride = seq_cap;
    p.ctx = attention ? ctx : nullptr;
    p.tok_out = attention ? d_tok : d_scratch;
    p.pos_adv = attention ? d_pos : nullptr;
    p.pos_add = 1;
    return p;
}

// An eager RECTIFY step for the sequences `due` (batch indices): the model
// re-runs over their oldest pending tokens at their positions; no logits.
void Point::rectify(const std::vector<int> &due, cudaEvent_t e0, cudaEvent_t e1)
{
    const int E = (int)due.size();
    int64_t n = a.tmax / E;
    std::vector<int32_t> ids(E), modes(E, RESA_MODE_RECTIFY), counts(E);
    std::vector<int64_t> len(E), pend(E);
    for (int e = 0; e < E; e++) {
        ids[e] = seqs[due[e]];
        CR(ctx, resa_seq_length(ctx, ids[e], &len[e]));
        CR(ctx, resa_seq_pending(ctx, ids[e], &pend[e]));
        n = std::min(n, pend[e]);
    }
    CK(cudaEventSynchronize(rect_copied)); // the last rectification's copy (long done)
    for (int e = 0; e < E; e++) {
        counts[e] = (int32_t)n;
        h_rect[e] = due[e];
        h_rect[E + e] = (int)(len[e] - pend[e]); // the oldest pending position
    }
    if (e0)
        CK(cudaEventRecord(e0, s));
    CK(cudaMemcpyAsync(d_rect, h_rect, 2 * E * sizeof(int), cudaMemcpyHostToDevice, s));
    CK(cudaEventRecord(rect_copied, s));
    CR(ctx, resa_ctx_step_begin(ctx, E, ids.data(), modes.data(), counts.data(), 0));
    launch_rect_rows(a.rows_tok, a.rows_pos, d_hist, seq_cap, d_rect, d_rect + E, E, (int)n, s);
    Pass p;
    p.rows = E * (int)n;
    p.rows_per_seq = (int)n;
    p.tok = a.rows_tok;
    p.pos = a.rows_pos;
    p.ctx = ctx;
    p.logits = false;
    model_forward(m, a, g, s, p);
    CR(ctx, resa_ctx_step_end(ctx, 0));
    if (e1)
        CK(cudaEventRecord(e1, s));
}

ModeResult Point::run_mode(const ModeSpec &spec)
{
    ModeResult r;
    r.spec = spec;
    const bool dense = spec.mode == "dense", resa = spec.mode == "resa";
    CR(ctx, resa_ctx_set_param_f64(ctx, RESA_PARAM_SELECT_FRACTION, dense ? 1.0 : o.fraction));
    CR(ctx, resa_ctx_set_param(ctx, RESA_PARAM_RECTIFY_INTERVAL, resa ? o.interval : 0));
    for (int b = 0; b < batch; b++)
        CR(ctx, resa_seq_create(ctx, &seqs[b]));
    fill_and_prefill(r);

    std::vector<int32_t> modes(batch, RESA_MODE_DECODE), ones(batch, 1);
    cudaGraph_t graph = nullptr, graph_na = nullptr;
    cudaGraphExec_t exec = nullptr, exec_na = nullptr;
    cudaEvent_t start, stop;
    CK(cudaEventCreate(&start));
    CK(cudaEventCreate(&stop));
    std::vector<cudaEvent_t> rect_ev; // pairs, measured rectification steps
    std::vector<int> due;
    const int total = o.warmup + o.steps;
    const int want_profile = lead ? profile_step() : -1; // -1: none (read once, not every step)
    const int profiled_step = want_profile < 0 ? -1 : o.warmup + want_profile;
    const size_t logit_row = (size_t)batch * m.dims.vocab; // one step's logits (record_logits)
    if (o.record_logits && lead)
        r.logits.assign(logit_row * total, 0.0f);
    for (int step = 0; step < total; step++) {
        const bool measured = step >= o.warmup;
        if (step == o.warmup)
            CK(cudaEventRecord(start, s));
        if (!due.empty()) {
            cudaEvent_t e0 = nullptr, e1 = nullptr;
            if (measured) {
                CK(cudaEventCreate(&e0));
                CK(cudaEventCreate(&e1));
                rect_ev.push_back(e0);
                rect_ev.push_back(e1);
            }
            rectify(due, e0, e1);
        }
        if (step == 0) {
            // begin outside the capture; every layer's step_attend inside one graph
            CR(ctx, resa_ctx_step_begin(ctx, batch, seqs.data(), modes.data(), ones.data(), 0));
            CK(cudaStreamBeginCapture(s, kCaptureMode));
            model_forward(m, a, g, s, decode_pass(true));
            CK(cudaStreamEndCapture(s, &graph));
            CK(cudaGraphInstantiate(&exec, graph, 0));
            CK(cudaGraphLaunch(exec, s));
            CR(ctx, resa_ctx_step_end(ctx, 0));
            // the same step without the attention calls, for the time split
            CK(cudaStreamBeginCapture(s, kCaptureMode));
            model_forward(m, a, g, s, decode_pass(false));
            CK(cudaStreamEndCapture(s, &graph_na));
            CK(cudaGraphInstantiate(&exec_na, graph_na, 0));
        } else {
            const bool profiled = step == profiled_step;
            CR(ctx, resa_ctx_step_begin(ctx, batch, seqs.data(), modes.data(), ones.data(),
                                        RESA_STEP_REPLAY));
            if (profiled)
                CK(cudaProfilerStart());
            CK(cudaGraphLaunch(exec, s));
            if (profiled)
                CK(cudaProfilerStop());
            CR(ctx, resa_ctx_step_end(ctx, 0));
        }
        if (o.record_logits && lead) { // --check-tp only: never in a timed run
            // the stream first (its all-reduces need the other ranks), then
            // the copy to pageable memory (as in fill_and_prefill)
            CK(cudaStreamSynchronize(s));
            CK(cudaMemcpy(r.logits.data() + logit_row * step, a.logits, logit_row * sizeof(float),
                          cudaMemcpyDeviceToHost));
        }
        due.clear();
        for (int b = 0; b < batch; b++) {
            int32_t d = 0;
            CR(ctx, resa_seq_rectify_due(ctx, seqs[b], &d));
            if (d)
                due.push_back(b);
        }
    }
    CK(cudaEventRecord(stop, s));
    CR(ctx, resa_ctx_synchronize(ctx));
    r.total_ms = elapsed_ms(start, stop);
    for (size_t i = 0; i < rect_ev.size(); i += 2) {
        r.rect_ms += elapsed_ms(rect_ev[i], rect_ev[i + 1]);
        r.n_rect++;
    }

    // The rest of the step: the no-attention graph, replayed alone.
    const int reps = 8;
    for (int i = 0; i < 2; i++)
        CK(cudaGraphLaunch(exec_na, s));
    CK(cudaEventRecord(start, s));
    for (int i = 0; i < reps; i++)
        CK(cudaGraphLaunch(exec_na, s));
    CK(cudaEventRecord(stop, s));
    CK(cudaStreamSynchronize(s));
    r.rest_ms = elapsed_ms(start, stop) / reps;

    // The greedy tokens fed at positions ctx .. ctx + total - 1.
    r.tokens.assign((size_t)batch * total, 0);
    for (int b = 0; b < batch; b++)
        CK(cudaMemcpy(r.tokens.data() + (size_t)b * total, d_hist + (size_t)b * seq_cap + ctx_len,
                      total * sizeof(int), cudaMemcpyDeviceToHost));

    for (cudaEvent_t e : rect_ev)
        CK(cudaEventDestroy(e));
    CK(cudaEventDestroy(start));
    CK(cudaEventDestroy(stop));
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphExecDestroy(exec_na));
    CK(cudaGraphDestroy(graph));
    CK(cudaGraphDestroy(graph_na));
    for (int b = 0; b < batch; b++)
        CR(ctx, resa_seq_release(ctx, seqs[b]));
    return r;
}

} // namespace

size_t point_bytes(const ModelDims &m, long ctx, int batch, const Options &o, bool kv_fp8)
{
    const size_t cap = (size_t)seq_capacity(ctx, o), tokens = cap * batch, blocks = cap / kBlock;
    // K and V: bf16, or fp8 bytes and one fp32 scale per token and head
    const size_t kv_bf16 = 2 * (size_t)m.layers * tokens * m.hkv * m.d * sizeof(bf16);
    const size_t kv = kv_fp8 ? 2 * (size_t)m.layers * tokens * m.hkv * (m.d + sizeof(float))
                             : kv_bf16;
    // min and max of K per block: bf16 when exact (the IO dtype for an fp8
    // cache), counted so for fp8 summaries too (a bound, as before)
    const size_t summaries = kv_bf16 / kBlock;
    const size_t tables = (size_t)batch * blocks * 4 * 4; // page tables, step metadata
    const size_t select = 2 * (size_t)batch * m.hkv * blocks * 4 * 2; // selection lists (bound)
    const size_t other = 256ull << 20;                 // attention partials, staging
    const size_t host_side = acts_bytes(m, act_rows(batch, o), batch) +
                             (size_t)batch * cap * sizeof(int) +
                             2 * (size_t)o.chunk * m.hkv * m.d * sizeof(bf16);
    const size_t margin = 512ull << 20;                // graphs, cuBLAS, fragmentation
    return kv + summaries + tables + select + other + host_side + margin;
}

void rank_open(Rank &r, int device)
{
    r.device = device;
    CK(cudaSetDevice(device));
    CK(cudaStreamCreateWithFlags(&r.s, cudaStreamNonBlocking));
    CB(cublasCreate(&r.blas));
    CB(cublasSetStream(r.blas, r.s));
    // A fixed workspace: no allocation inside the captured graphs.
    const size_t blas_ws_bytes = 64ull << 20;
    CK(cudaMalloc(&r.blas_ws, blas_ws_bytes));
    CB(cublasSetWorkspace(r.blas, r.blas_ws, blas_ws_bytes));
    r.gemms = new Gemms(r.blas, r.s, 64ull << 20);
}

void rank_close(Rank &r)
{
    CK(cudaSetDevice(r.device));
    if (r.m.arena)
        model_free(r.m);
    delete r.gemms;
    r.gemms = nullptr;
    CB(cublasDestroy(r.blas));
    CK(cudaFree(r.blas_ws));
    CK(cudaStreamDestroy(r.s));
}

std::vector<ModeResult> run_point(Rank &r, const Options &o, long ctx, int batch,
                                  const std::vector<ModeSpec> &modes)
{
    Point p(r, o, ctx, batch, modes);
    p.setup();
    std::vector<ModeResult> out;
    for (const ModeSpec &ms : modes) {
        if (!o.csv && p.lead)
            std::fprintf(stderr, "resa-e2e: context %ld batch %d: %s (kv %s)%s\n", ctx, batch,
                         ms.mode.c_str(), ms.kv_name(), r.m.comm ? " (TP)" : "");
        out.push_back(p.run_mode(ms));
    }
    p.teardown();
    return out;
}

std::vector<ModeResult> run_point_tp(std::vector<Rank> &ranks, const Options &o, long ctx,
                                     int batch, const std::vector<ModeSpec> &modes)
{
    const size_t n = ranks.size();
    std::vector<std::vector<ModeResult>> res(n);
    std::vector<std::thread> threads;
    for (size_t i = 0; i < n; i++)
        threads.emplace_back([&, i] {
            CK(cudaSetDevice(ranks[i].device)); // current device is per thread
            res[i] = run_point(ranks[i], o, ctx, batch, modes);
        });
    for (std::thread &t : threads)
        t.join();
    for (size_t i = 1; i < n; i++)
        for (size_t k = 0; k < modes.size(); k++)
            if (res[i][k].tokens != res[0][k].tokens || res[i][k].n_rect != res[0][k].n_rect) {
                std::fprintf(stderr,
                             "resa-e2e: TP rank %zu diverged from rank 0 in mode %s (kv %s): "
                             "tokens %s, rectifications %d vs %d\n",
                             i, modes[k].mode.c_str(), modes[k].kv_name(),
                             res[i][k].tokens == res[0][k].tokens ? "equal" : "differ",
                             res[i][k].n_rect, res[0][k].n_rect);
                std::exit(1);
            }
    return res[0];
}
