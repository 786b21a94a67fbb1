// SPDX-License-Identifier: MIT
/*
 * resa-e2e: end-to-end decoding of a Qwen2.5-7B-shaped model (random bf16
 * weights) with libresa's CUDA backend as the attention, in three modes:
 *   dense   RESA_MODE_DECODE with SELECT_FRACTION 1 (exact attention)
 *   sparse  RESA_MODE_DECODE with r = 0.1, never rectified
 *   resa    r = 0.1, rectified every 32 tokens (RESA_MODE_RECTIFY)
 * Everything else (embedding, RMSNorm, RoPE, projections through cuBLAS,
 * SwiGLU MLP, LM head, greedy argmax) is the host's, in this directory.
 * Each decode step (all layers, embedding to argmax) is one CUDA graph,
 * captured at the first decode step of each mode and replayed after it.
 */
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "engine.h"
#include "kernels_check.h"

namespace {

void usage()
{
    std::fprintf(stderr,
                 "usage: resa-e2e [--contexts 16384,65536,131072,262144] [--batch 1,8,max]\n"
                 "                [--steps N] [--warmup N] [--modes dense,sparse,resa]\n"
                 "                [--summary kv|fp8] [--csv]\n");
    std::exit(2);
}

std::vector<std::string> split(const char *s)
{
    std::vector<std::string> out;
    std::string cur;
    for (const char *p = s;; p++) {
        if (*p == ',' || !*p) {
            if (!cur.empty())
                out.push_back(cur);
            cur.clear();
            if (!*p)
                break;
        } else {
            cur += *p;
        }
    }
    return out;
}

long parse_long(const std::string &s, long lo, long hi)
{
    char *end = nullptr;
    long v = std::strtol(s.c_str(), &end, 10);
    if (s.empty() || *end || v < lo || v > hi) {
        std::fprintf(stderr, "resa-e2e: bad number '%s' (expected %ld .. %ld)\n", s.c_str(), lo,
                     hi);
        std::exit(2);
    }
    return v;
}

Options parse(int argc, char **argv)
{
    Options o;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!std::strcmp(a, "--csv")) {
            o.csv = true;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!std::strcmp(a, "--contexts")) {
            o.contexts.clear();
            for (auto &s : split(v))
                o.contexts.push_back(parse_long(s, 2L * o.prompt, 1L << 30));
        } else if (!std::strcmp(a, "--batch")) {
            o.batches.clear();
            for (auto &s : split(v)) // "max": the largest batch that fits (0 here)
                o.batches.push_back(s == "max" ? 0 : (int)parse_long(s, 1, 4096));
        } else if (!std::strcmp(a, "--summary")) {
            if (std::strcmp(v, "kv") && std::strcmp(v, "fp8"))
                usage();
            o.fp8_summaries = !std::strcmp(v, "fp8");
        } else if (!std::strcmp(a, "--steps")) {
            o.steps = (int)parse_long(v, 1, 1 << 20);
        } else if (!std::strcmp(a, "--warmup")) {
            o.warmup = (int)parse_long(v, 1, 1 << 20);
        } else if (!std::strcmp(a, "--modes")) {
            o.modes = split(v);
            for (auto &m : o.modes)
                if (m != "dense" && m != "sparse" && m != "resa") {
                    std::fprintf(stderr, "resa-e2e: unknown mode '%s'\n", m.c_str());
                    std::exit(2);
                }
        } else {
            usage();
        }
    }
    if (o.contexts.empty() || o.batches.empty() || o.modes.empty())
        usage();
    // ReSA's per-token time needs at least one measured rectification.
    if (std::find(o.modes.begin(), o.modes.end(), "resa") != o.modes.end() &&
        o.steps < o.interval) {
        std::fprintf(stderr, "resa-e2e: --steps %d is below the rectification interval %d\n",
                     o.steps, o.interval);
        std::exit(2);
    }
    return o;
}

double gib(size_t b) { return (double)b / (1024.0 * 1024.0 * 1024.0); }

// Leading tokens (of the first `k`) equal to dense's, summed over the batch.
int agreeing(const ModeResult &dense, const ModeResult &r, int batch, int per_seq, int k,
             int *compared)
{
    int n = 0;
    *compared = 0;
    for (int b = 0; b < batch; b++) {
        for (int j = 0; j < k && j < per_seq; j++) {
            size_t i = (size_t)b * per_seq + j;
            if (dense.tokens[i] != r.tokens[i])
                break;
            n++;
        }
        *compared += std::min(k, per_seq);
    }
    return n;
}

void report(const Options &o, long ctx, int batch, const std::vector<ModeResult> &rs)
{
    const ModeResult *dense = nullptr;
    for (const auto &r : rs)
        if (r.mode == "dense")
            dense = &r;
    const double dense_ms = dense ? dense->total_ms / o.steps : 0;
    const int per_seq = o.warmup + o.steps;
    if (!o.csv)
        std::printf("\ncontext %ld, batch %d: cache filled with random K/V to %ld, %d prompt "
                    "tokens prefilled through the model (fill %.2f s, prefill %.2f s)\n"
                    "%-7s %10s %11s %8s %8s %8s %7s %10s %9s %s\n",
                    ctx, batch, ctx - o.prompt, o.prompt, rs.empty() ? 0.0 : rs[0].fill_s,
                    rs.empty() ? 0.0 : rs[0].prefill_s, "mode", "ms/token", "tokens/s",
                    "attn%", "rect%", "rest%", "rects", "rect_ms", "vs_dense", "agree");
    for (const auto &r : rs) {
        // Steady state: the decode steps' own time per token plus exactly one
        // rectification per `interval` tokens, whatever number of them fell
        // inside the measured window (48 steps hold one or two of them).
        const double rect_each = r.n_rect ? r.rect_ms / r.n_rect : 0.0;
        const double rect_tok = r.mode == "resa" ? rect_each / o.interval : 0.0;
        const double ms = (r.total_ms - r.rect_ms) / o.steps + rect_tok;
        const double tps = batch * 1e3 / ms;
        const double attn = std::max(0.0, ms - rect_tok - r.rest_ms);
        const double speed = dense && dense_ms > 0 ? dense_ms / ms : 0;
        int compared = 0, agree = dense ? agreeing(*dense, r, batch, per_seq, o.agree, &compared) : 0;
        if (o.csv)
            std::printf("%ld,%d,%s,%.4f,%.2f,%.2f,%.2f,%.2f,%d,%.4f,%.3f,%d,%d\n", ctx, batch,
                        r.mode.c_str(), ms, tps, 100 * attn / ms, 100 * rect_tok / ms,
                        100 * r.rest_ms / ms, r.n_rect, rect_each, speed, agree, compared);
        else
            std::printf("%-7s %10.3f %11.1f %8.1f %8.1f %8.1f %7d %10.3f %8.2fx %d/%d\n",
                        r.mode.c_str(), ms, tps, 100 * attn / ms, 100 * rect_tok / ms,
                        100 * r.rest_ms / ms, r.n_rect, rect_each, speed, agree, compared);
    }
    std::fflush(stdout);
}

// The matrix products tuned for the last point (tunings from `first` on):
// per matrix, cublasGemmEx's default against the configuration kept, how
// many cuBLASLt configurations were timed (of how many valid ones), which
// kind was kept, and what the search cost.
void report_gemms(const Options &o, const Gemms &g, size_t first, int layers)
{
    const std::vector<GemmTuning> &t = g.tunings();
    if (first >= t.size())
        return;
    FILE *f = o.csv ? stderr : stdout;
    double def = 0, best = 0, tune_ms = 0;
    for (size_t i = first; i < t.size(); i++) {
        const GemmTuning &r = t[i];
        const int n = r.name == "lm_head" ? 1 : layers;
        def += n * r.default_us;
        best += n * r.best_us;
        tune_ms += r.tune_ms;
        char kept[48];
        if (!r.lt)
            std::snprintf(kept, sizeof kept, "(default kept)");
        else if (r.splits > 1)
            std::snprintf(kept, sizeof kept, "(split-K %d)", r.splits);
        else
            std::snprintf(kept, sizeof kept, "(no split)");
        std::fprintf(f, "# gemm %-8s %4d x %6d x %5d: default %8.1f us (%4.0f GB/s), best of %3d "
                        "cuBLASLt %-14s %8.1f us (%4.0f GB/s); %d valid, %d failed the check, "
                        "%.0f ms\n",
                     r.name.c_str(), r.shape.M, r.shape.N, r.shape.K, r.default_us,
                     r.bytes / r.default_us * 1e-3, r.candidates, kept, r.best_us,
                     r.bytes / r.best_us * 1e-3, r.valid, r.rejected, r.tune_ms);
    }
    std::fprintf(f, "# gemm tuning of these shapes: %.2f s\n", tune_ms * 1e-3);
    std::fprintf(f, "# gemm total of these shapes per forward pass: default %.3f ms, kept %.3f ms\n",
                 def * 1e-3, best * 1e-3);
}

} // namespace

int main(int argc, char **argv)
{
    const Options o = parse(argc, argv);
    if (!resa_backend_available(RESA_BACKEND_CUDA)) {
        std::fprintf(stderr, "resa-e2e: libresa's CUDA backend is not available (no GPU, or "
                             "libresa-cuda.so not found: set RESA_CUDA_MODULE)\n");
        return 1;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    CK(cudaSetDevice(0));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cublasHandle_t blas;
    CB(cublasCreate(&blas));
    CB(cublasSetStream(blas, s));
    // A fixed workspace: no allocation inside the captured graphs.
    const size_t blas_ws_bytes = 64ull << 20;
    void *blas_ws = nullptr;
    CK(cudaMalloc(&blas_ws, blas_ws_bytes));
    CB(cublasSetWorkspace(blas, blas_ws, blas_ws_bytes));
    Gemms *gemms = new Gemms(blas, s, 64ull << 20);

    size_t free_b = 0, total_b = 0;
    CK(cudaMemGetInfo(&free_b, &total_b));
    Model m;
    const size_t weights = model_param_elems(m.dims) * sizeof(bf16);
    const int per_seq_kv = m.dims.layers * 2 * m.dims.hkv * m.dims.d * 2;
    if (!o.csv) {
        std::printf("# resa-e2e: libresa %s, %s, %.1f GiB free of %.1f GiB\n",
                    resa_version_string(), prop.name, gib(free_b), gib(total_b));
        std::printf("# model: Qwen2.5-7B shape (28 layers, hidden 3584, 28/4 heads, d 128, MLP "
                    "18944, vocab 152064), random bf16 weights (%.2f GB), greedy decoding\n",
                    weights * 1e-9);
        std::printf("# modes: dense = DECODE with r = 1; sparse = r %.2g, never rectified; "
                    "resa = r %.2g, rectified every %d tokens; block summaries %s\n",
                    o.fraction, o.fraction, o.interval,
                    o.fp8_summaries ? "fp8 e4m3 (RESA_SUMMARY_FP8_E4M3)" : "bf16 (exact)");
        std::printf("# context: random K/V through RESA_MODE_APPEND_KV (chunks of %d) up to "
                    "context - %d, then %d prompt tokens prefilled through the model "
                    "(a full 256K prefill would cost too much GPU time)\n",
                    o.chunk, o.prompt, o.prompt);
        std::printf("# timing: CUDA events over %d decode steps after %d warm-up steps; each "
                    "step is one CUDA graph replay (all layers); rectification steps run "
                    "eagerly, are timed apart and counted as one per interval: ms/token = "
                    "decode time per step + rect_ms / interval\n",
                    o.steps, o.warmup);
        std::printf("# split: rest = the same graph captured without the step_attend calls, "
                    "replayed alone; rect = events around each rectification step; attn = "
                    "total - rect - rest (libresa's kernels plus its host-side step_begin/end "
                    "when not hidden)\n");
        std::printf("# agree = leading greedy tokens equal to dense's (first %d per sequence; "
                    "random weights make this a weak check)\n",
                    o.agree);
        std::printf("# memory per point: weights %.2f GB + KV %d bytes/token/sequence (+1/16 "
                    "summaries) + workspaces\n",
                    weights * 1e-9, per_seq_kv);
    }
    const size_t overhead = 256ull << 20; // CUDA graphs and cuBLAS internals beyond the workspace
    auto fits = [&](long ctx, int batch) {
        return weights + point_bytes(m.dims, ctx, batch, o) + overhead <= free_b;
    };
    auto largest = [&](long ctx) {
        int best = 0;
        while (best < 4096 && fits(ctx, best + 1))
            best++;
        return best;
    };
    for (long ctx : o.contexts)
        if (!o.csv)
            std::printf("# context %ld: largest batch that fits: %d\n", ctx, largest(ctx));
    if (o.csv)
        std::printf("context,batch,mode,ms_per_token,tokens_per_s,attn_pct,rect_pct,rest_pct,"
                    "rect_steps,rect_ms_each,speedup_vs_dense,agree,compared\n");
    std::fflush(stdout);

    model_init(m, s);
    check_small_kernels(m.dims, s);
    for (long ctx : o.contexts)
        for (int want : o.batches) {
            const int batch = want ? want : largest(ctx);
            if (want == 0 && !o.csv)
                std::printf("\n(batch %d: the largest that fits at context %ld)", batch, ctx);
            size_t need = weights + point_bytes(m.dims, ctx, batch, o) + overhead;
            if (batch < 1 || !fits(ctx, batch)) {
                std::fprintf(o.csv ? stderr : stdout,
                             "%sskipped: context %ld batch %d needs %.1f GiB, %.1f GiB free\n",
                             o.csv ? "resa-e2e: " : "\n", ctx, batch, gib(need), gib(free_b));
                continue;
            }
            const size_t tuned = gemms->tunings().size();
            const std::vector<ModeResult> rs = run_point(m, *gemms, s, o, ctx, batch);
            report_gemms(o, *gemms, tuned, m.dims.layers);
            report(o, ctx, batch, rs);
        }
    model_free(m);
    delete gemms;
    CB(cublasDestroy(blas));
    CK(cudaFree(blas_ws));
    CK(cudaStreamDestroy(s));
    return 0;
}
