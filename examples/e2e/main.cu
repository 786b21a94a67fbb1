// SPDX-License-Identifier: MIT
/*
 * resa-e2e: end-to-end decoding of a Qwen2.5-7B-shaped model (random bf16
 * weights) with libresa's CUDA backend as the attention, in three modes:
 *   dense   RESA_MODE_DECODE with SELECT_FRACTION 1 (exact attention)
 *   sparse  RESA_MODE_DECODE with r (default 0.1), never rectified
 *   resa    r, rectified every f tokens (default 32; RESA_MODE_RECTIFY)
 * each from a bf16 or an fp8 e4m3 KV cache (--kv-dtype, or a mode's ":fp8").
 * Everything else (embedding, RMSNorm, RoPE, projections through cuBLAS,
 * SwiGLU MLP, LM head, greedy argmax) is the host's, in this directory.
 * Each decode step (all layers, embedding to argmax) is one CUDA graph,
 * captured at the first decode step of each mode and replayed after it.
 * --tp N splits the heads and the MLP over N GPUs (tensor parallelism over
 * NCCL, model.h); --check-tp compares a TP run's tokens and logits with a
 * run without TP.
 */
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "engine.h"
#include "kernels_check.h"
#include "tp.h"

namespace {

void usage()
{
    std::fprintf(stderr,
        "usage: resa-e2e [--contexts 16384,65536,131072,262144] [--batch 1,8,max]\n"
        "                [--steps N] [--warmup N] [--modes dense,sparse,resa] [--kv-dtype bf16]\n"
        "                [--params paper|defaults] [--fraction R] [--interval F]\n"
        "                [--summary kv|fp8] [--tp N] [--check-tp] [--csv]\n"
        "  --modes      dense, sparse, resa, each optionally MODE:bf16 or MODE:fp8 (its KV\n"
        "               cache); modes without a suffix run once per --kv-dtype entry;\n"
        "               without --modes, --kv-dtype fp8 adds dense:bf16 as the baseline\n"
        "  --kv-dtype   bf16, fp8 or bf16,fp8 (default bf16): libresa's KV cache, bf16 or fp8\n"
        "               e4m3 with per-token per-head scales (RESA_PARAM_KV_DTYPE); each dtype\n"
        "               is its own point, \"max\" its own largest batch.  The issue's comparison:\n"
        "               --modes dense:bf16,resa:fp8 --batch max\n"
        "  --params     paper (default: RESA_PRESET_PAPER, r 0.1, f 32, sink 0, width 1, as every\n"
        "               published resa-e2e number) or defaults (the library's: r 0.15, f 128,\n"
        "               sink 1, width 0.5; add --summary fp8 for its summaries)\n"
        "  --fraction   r, after the preset; --interval: f, after the preset\n"
        "  --summary    block summaries exact (kv, default) or fp8 e4m3\n"
        "  --steps      measured steps (default 64, at least f); --warmup (default 36, above f)\n"
        "  --tp N       tensor parallel over GPUs 0..N-1 through NCCL (N divides 28 and 4);\n"
        "               --tp 1 runs the NCCL path on one GPU\n"
        "  --check-tp   decode without TP and with --tp N (default 1), compare tokens and\n"
        "               logits (default --contexts 8192 --batch 2); exit 1 on a mismatch\n"
        "  --csv        CSV rows on stdout\n");
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

double parse_double(const std::string &s, double lo, double hi)
{
    char *end = nullptr;
    double v = std::strtod(s.c_str(), &end);
    if (s.empty() || *end || !(v >= lo && v <= hi)) {
        std::fprintf(stderr, "resa-e2e: bad number '%s' (expected %g .. %g)\n", s.c_str(), lo,
                     hi);
        std::exit(2);
    }
    return v;
}

bool parse_kv(const std::string &s)
{
    if (s != "bf16" && s != "fp8") {
        std::fprintf(stderr, "resa-e2e: unknown KV dtype '%s' (bf16 or fp8)\n", s.c_str());
        std::exit(2);
    }
    return s == "fp8";
}

Options parse(int argc, char **argv)
{
    Options o;
    std::vector<std::string> modes{"dense", "sparse", "resa"}, kvs{"bf16"};
    bool steps_set = false, warmup_set = false, contexts_set = false, batches_set = false;
    bool fraction_set = false, interval_set = false, modes_set = false;
    double fraction = 0;
    int interval = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!std::strcmp(a, "--csv")) {
            o.csv = true;
            continue;
        }
        if (!std::strcmp(a, "--check-tp")) {
            o.check_tp = true;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!std::strcmp(a, "--contexts")) {
            o.contexts.clear();
            contexts_set = true;
            for (auto &s : split(v))
                o.contexts.push_back(parse_long(s, 2L * o.prompt, 1L << 30));
        } else if (!std::strcmp(a, "--batch")) {
            o.batches.clear();
            batches_set = true;
            for (auto &s : split(v)) // "max": the largest batch that fits (0 here)
                o.batches.push_back(s == "max" ? 0 : (int)parse_long(s, 1, 4096));
        } else if (!std::strcmp(a, "--summary")) {
            if (std::strcmp(v, "kv") && std::strcmp(v, "fp8"))
                usage();
            o.fp8_summaries = !std::strcmp(v, "fp8");
        } else if (!std::strcmp(a, "--kv-dtype")) {
            kvs = split(v);
        } else if (!std::strcmp(a, "--params")) {
            if (!std::strcmp(v, "paper"))
                o.preset = RESA_PRESET_PAPER;
            else if (!std::strcmp(v, "defaults"))
                o.preset = RESA_PRESET_DEFAULT;
            else
                usage();
        } else if (!std::strcmp(a, "--fraction")) {
            fraction = parse_double(v, 1e-6, 1.0);
            fraction_set = true;
        } else if (!std::strcmp(a, "--interval")) {
            interval = (int)parse_long(v, 1, 1 << 20);
            interval_set = true;
        } else if (!std::strcmp(a, "--steps")) {
            o.steps = (int)parse_long(v, 1, 1 << 20);
            steps_set = true;
        } else if (!std::strcmp(a, "--warmup")) {
            o.warmup = (int)parse_long(v, 1, 1 << 20);
            warmup_set = true;
        } else if (!std::strcmp(a, "--modes")) {
            modes = split(v);
            modes_set = true;
        } else if (!std::strcmp(a, "--tp")) {
            o.tp = (int)parse_long(v, 1, 64);
        } else {
            usage();
        }
    }
    // r and f: the preset's unless given
    if (o.preset == RESA_PRESET_DEFAULT) {
        o.fraction = 0.15;
        o.interval = 128;
    }
    if (fraction_set)
        o.fraction = fraction;
    if (interval_set)
        o.interval = interval;
    if (kvs.empty())
        usage();
    // --kv-dtype fp8 alone: the default modes from fp8, plus the dense bf16 baseline
    if (!modes_set && std::find(kvs.begin(), kvs.end(), "bf16") == kvs.end())
        modes.insert(modes.begin(), "dense:bf16");
    // bf16 points first, so that every fp8 row can be set against dense bf16
    for (bool fp8 : {false, true})
        for (const std::string &m : modes) {
            const size_t colon = m.find(':');
            const std::string name = m.substr(0, colon);
            if (name != "dense" && name != "sparse" && name != "resa") {
                std::fprintf(stderr, "resa-e2e: unknown mode '%s'\n", m.c_str());
                std::exit(2);
            }
            bool want = false;
            if (colon != std::string::npos)
                want = parse_kv(m.substr(colon + 1)) == fp8;
            else
                for (const std::string &k : kvs)
                    want = want || parse_kv(k) == fp8;
            bool dup = false;
            for (const ModeSpec &x : o.modes)
                dup = dup || (x.mode == name && x.kv_fp8 == fp8);
            if (want && !dup)
                o.modes.push_back({name, fp8});
        }
    if (o.check_tp) {
        if (!o.tp)
            o.tp = 1;
        if (!contexts_set)
            o.contexts = {8192};
        if (!batches_set)
            o.batches = {2};
        for (int b : o.batches)
            if (!b) {
                std::fprintf(stderr, "resa-e2e: --check-tp takes numeric batches, not max\n");
                std::exit(2);
            }
        o.record_logits = true;
    }
    if (o.contexts.empty() || o.batches.empty() || o.modes.empty())
        usage();
    // A longer f needs longer runs: at least one measured rectification, and
    // one in the warm-up (defaults only; explicit values are checked below).
    if (!warmup_set)
        o.warmup = std::max(o.warmup, o.interval + 4);
    if (!steps_set)
        o.steps = std::max(o.steps, o.interval);
    // ReSA's per-token time needs at least one measured rectification.
    bool any_resa = false;
    for (const ModeSpec &m : o.modes)
        any_resa = any_resa || m.mode == "resa";
    if (any_resa && o.steps < o.interval) {
        std::fprintf(stderr, "resa-e2e: --steps %d is below the rectification interval %d\n",
                     o.steps, o.interval);
        std::exit(2);
    }
    return o;
}

double gib(size_t b) { return (double)b / (1024.0 * 1024.0 * 1024.0); }

// Per-token time in steady state: the decode steps' own time per token plus
// exactly one rectification per `interval` tokens, whatever number of them
// fell inside the measured window (64 steps hold one or two of them).
struct Timing {
    double ms, rect_tok, rect_each;
};
Timing timing(const Options &o, const ModeResult &r)
{
    Timing t;
    t.rect_each = r.n_rect ? r.rect_ms / r.n_rect : 0.0;
    t.rect_tok = r.spec.mode == "resa" ? t.rect_each / o.interval : 0.0;
    t.ms = (r.total_ms - r.rect_ms) / o.steps + t.rect_tok;
    return t;
}

// Leading tokens (of the first `k`) equal to the reference's, summed over the
// sequences both ran (a sequence's context and prompt depend on its index
// only, whatever the batch).
int agreeing(const ModeResult &ref, int ref_batch, const ModeResult &r, int batch, int per_seq,
             int k, int *compared)
{
    int n = 0;
    *compared = 0;
    for (int b = 0; b < std::min(batch, ref_batch); b++) {
        for (int j = 0; j < k && j < per_seq; j++) {
            size_t i = (size_t)b * per_seq + j;
            if (ref.tokens[i] != r.tokens[i])
                break;
            n++;
        }
        *compared += std::min(k, per_seq);
    }
    return n;
}

// Dense with a bf16 cache at one (context, batch spec): the baseline of the
// throughput column, at its own batch (its largest for "max").
struct Baseline {
    const ModeResult *r = nullptr;
    int batch = 0;
    double tps = 0;
};

void report(const Options &o, long ctx, int batch, const std::vector<ModeResult> &rs,
            const Baseline &base)
{
    const ModeResult *dense = nullptr;
    for (const auto &r : rs)
        if (r.spec.mode == "dense")
            dense = &r;
    const double dense_ms = dense ? dense->total_ms / o.steps : 0;
    const int per_seq = o.warmup + o.steps;
    const int gpus = std::max(1, o.tp);
    if (!o.csv)
        std::printf("\ncontext %ld, batch %d, KV cache %s%s: cache filled with random K/V to %ld, "
                    "%d prompt tokens prefilled through the model (fill %.2f s, prefill %.2f s)\n"
                    "%-7s %4s %10s %11s %9s %7s %7s %7s %6s %9s %8s %8s %s\n",
                    ctx, batch, rs.empty() ? "?" : rs[0].spec.kv_name(),
                    o.tp ? (" (TP " + std::to_string(o.tp) + ")").c_str() : "", ctx - o.prompt,
                    o.prompt, rs.empty() ? 0.0 : rs[0].fill_s, rs.empty() ? 0.0 : rs[0].prefill_s,
                    "mode", "kv", "ms/token", "tokens/s", "tok/s/GPU", "attn%", "rect%", "rest%",
                    "rects", "rect_ms", "vs_dense", "tput/d16", "agree");
    for (const auto &r : rs) {
        const Timing t = timing(o, r);
        const double tps = batch * 1e3 / t.ms;
        const double attn = std::max(0.0, t.ms - t.rect_tok - r.rest_ms);
        const double speed = dense && dense_ms > 0 ? dense_ms / t.ms : 0;
        const double tput = base.tps > 0 ? tps / base.tps : 0;
        // agreement with dense of the same point, else with the bf16 baseline
        int compared = 0, agree = 0;
        if (dense)
            agree = agreeing(*dense, batch, r, batch, per_seq, o.agree, &compared);
        else if (base.r)
            agree = agreeing(*base.r, base.batch, r, batch, per_seq, o.agree, &compared);
        if (o.csv)
            std::printf("%ld,%d,%s,%s,%d,%.4f,%.2f,%.2f,%.2f,%.2f,%.2f,%d,%.4f,%.3f,%.3f,%d,%d\n",
                        ctx, batch, r.spec.mode.c_str(), r.spec.kv_name(), o.tp, t.ms, tps,
                        tps / gpus, 100 * attn / t.ms, 100 * t.rect_tok / t.ms,
                        100 * r.rest_ms / t.ms, r.n_rect, t.rect_each, speed, tput, agree,
                        compared);
        else {
            char vs[16] = "       -", tp[16] = "       -"; // no dense here / no dense bf16
            if (speed > 0)
                std::snprintf(vs, sizeof vs, "%7.2fx", speed);
            if (tput > 0)
                std::snprintf(tp, sizeof tp, "%7.2fx", tput);
            std::printf("%-7s %4s %10.3f %11.1f %9.1f %7.1f %7.1f %7.1f %6d %9.3f %8s %8s %d/%d\n",
                        r.spec.mode.c_str(), r.spec.kv_name(), t.ms, tps, tps / gpus,
                        100 * attn / t.ms, 100 * t.rect_tok / t.ms, 100 * r.rest_ms / t.ms,
                        r.n_rect, t.rect_each, vs, tp, agree, compared);
        }
    }
    std::fflush(stdout);
}

// The matrix products tuned for the last point (tunings from `first` on):
// per matrix, cublasGemmEx's default against the configuration kept, how
// many cuBLASLt configurations were timed (of how many valid ones), which
// kind was kept, and what the search cost.  Under TP: rank 0's.
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

// The method parameters a context ends up with (preset, then r and f), read
// back from a CPU context: what the header prints is what libresa uses.
void print_method(const Options &o)
{
    resa_ctx *c = nullptr;
    CR(c, resa_ctx_create(RESA_BACKEND_CPU, nullptr, &c));
    CR(c, resa_ctx_set_preset(c, o.preset));
    CR(c, resa_ctx_set_param_f64(c, RESA_PARAM_SELECT_FRACTION, o.fraction));
    CR(c, resa_ctx_set_param(c, RESA_PARAM_RECTIFY_INTERVAL, o.interval));
    int64_t n_min = 0, local = 0, sink = 0, group = 0;
    double width = 0;
    CR(c, resa_ctx_get_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, &n_min));
    CR(c, resa_ctx_get_param(c, RESA_PARAM_LOCAL_BLOCKS, &local));
    CR(c, resa_ctx_get_param(c, RESA_PARAM_SINK_BLOCKS, &sink));
    CR(c, resa_ctx_get_param(c, RESA_PARAM_GROUP_SCORE, &group));
    CR(c, resa_ctx_get_param_f64(c, RESA_PARAM_SCORE_WIDTH, &width));
    resa_ctx_destroy(c);
    std::printf("# method: --params %s (%s), r %.3g, f %d: n_min %lld, local %lld, sink %lld, "
                "score width %.3g, group score %s; block summaries %s\n",
                o.preset == RESA_PRESET_PAPER ? "paper" : "defaults",
                o.preset == RESA_PRESET_PAPER ? "RESA_PRESET_PAPER" : "RESA_PRESET_DEFAULT",
                o.fraction, o.interval, (long long)n_min, (long long)local, (long long)sink, width,
                group == RESA_GROUP_SCORE_POOLED ? "pooled" : "head share",
                o.fp8_summaries ? "fp8 e4m3 (RESA_SUMMARY_FP8_E4M3)" : "exact (RESA_SUMMARY_KV_DTYPE)");
}

// The modes of one KV dtype, in --modes order.
std::vector<std::vector<ModeSpec>> groups_of(const Options &o)
{
    std::vector<std::vector<ModeSpec>> g;
    for (bool fp8 : {false, true}) {
        std::vector<ModeSpec> one;
        for (const ModeSpec &m : o.modes)
            if (m.kv_fp8 == fp8)
                one.push_back(m);
        if (!one.empty())
            g.push_back(one);
    }
    return g;
}

// --check-tp: each point decoded on GPU 0 without TP (no NCCL call; at
// --tp 1 with rank 0's own weights, stream and tuned products, so that only
// the communicator differs), then with TP.  Greedy tokens must agree
// exactly at TP 1; logits are compared for each step and sequence whose fed
// tokens so far agree, within kTpTol of the largest |logit| (at TP > 1: bf16
// partial sums, another summation order, and libresa's split-KV decode
// choosing its split count from the number of heads).  At TP 1 they are
// expected bitwise equal (the one-rank all-reduce changes nothing); the line
// says whether they were (if not, and tokens agree, some kernel is not
// deterministic from run to run: the check still passes).  Returns the exit
// status.
constexpr double kTpTol = 5e-2; // a first bound; the first TP > 1 runs calibrate it
int check_tp(std::vector<Rank> &ranks, const ModelDims &full, const Options &o)
{
    const int tp = (int)ranks.size();
    CK(cudaSetDevice(ranks[0].device));
    Rank ref = ranks[0]; // shares rank 0's stream, handle and tuned products
    ref.m.comm = nullptr;
    if (tp > 1) // the whole model next to rank 0's shard
        model_init(ref.m, full, 1, 0, ref.s);
    const int per_seq = o.warmup + o.steps;
    const size_t vocab = (size_t)full.vocab;
    int failures = 0;
    std::printf("# check-tp: %d decode steps per sequence (%d warm-up + %d), method as above, "
                "without TP (GPU 0) and with --tp %d; logits compared while the fed tokens agree; "
                "tolerance %s\n",
                per_seq, o.warmup, o.steps, tp,
                tp == 1 ? "tokens identical, logits within 5e-2 of max |logit| (bitwise "
                          "expected)"
                        : "logits within 5e-2 of max |logit|");
    for (long ctx : o.contexts)
        for (int batch : o.batches)
            for (const std::vector<ModeSpec> &g : groups_of(o)) {
                CK(cudaSetDevice(ranks[0].device));
                const std::vector<ModeResult> a = run_point(ref, o, ctx, batch, g);
                const std::vector<ModeResult> b = run_point_tp(ranks, o, ctx, batch, g);
                for (size_t k = 0; k < g.size(); k++) {
                    const ModeResult &x = a[k], &y = b[k];
                    int equal = 0, min_lead = per_seq;
                    double max_diff = 0, max_ref = 0;
                    size_t rows = 0;
                    bool nan = false;
                    for (int s = 0; s < batch; s++) {
                        int lead = 0;
                        while (lead < per_seq && x.tokens[(size_t)s * per_seq + lead] ==
                                                     y.tokens[(size_t)s * per_seq + lead])
                            lead++;
                        equal += lead;
                        min_lead = std::min(min_lead, lead);
                        // logits of step j follow the tokens fed at steps 0 .. j
                        for (int j = 0; j < lead; j++) {
                            const size_t off = ((size_t)j * batch + s) * vocab;
                            for (size_t v = 0; v < vocab; v++) {
                                const double p = x.logits[off + v], q = y.logits[off + v];
                                nan = nan || std::isnan(p) || std::isnan(q);
                                max_ref = std::max(max_ref, std::fabs(p));
                                max_diff = std::max(max_diff, std::fabs(p - q));
                            }
                            rows++;
                        }
                    }
                    const double rel = max_ref > 0 ? max_diff / max_ref : 0;
                    const bool pass = !nan && rows > 0 && rel <= kTpTol &&
                                      (tp > 1 || equal == batch * per_seq);
                    failures += !pass;
                    std::printf("check-tp: context %ld batch %d %s (kv %s) tp %d: tokens %d/%d "
                                "equal (shortest agreeing prefix %d); logits of %zu step-rows: "
                                "max |diff| %.4g, max |logit| %.4g, relative %.3g%s: %s\n",
                                ctx, batch, g[k].mode.c_str(), g[k].kv_name(), tp, equal,
                                batch * per_seq, min_lead, rows, max_diff, max_ref, rel,
                                !rows ? ""
                                : max_diff == 0 ? " (bitwise identical)"
                                                : " (not bitwise identical)",
                                pass ? "PASS" : "FAIL");
                    std::fflush(stdout);
                }
            }
    if (tp > 1) {
        CK(cudaSetDevice(ranks[0].device));
        model_free(ref.m);
    }
    std::printf("check-tp: %s\n", failures ? "FAILED" : "passed");
    return failures ? 1 : 0;
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
    const ModelDims full;
    int n_dev = 0;
    CK(cudaGetDeviceCount(&n_dev));
    if (o.tp) {
        if (!tp_available()) {
            std::fprintf(stderr, "resa-e2e: --tp %d: this resa-e2e was built without NCCL "
                                 "(Meson found no nccl.h / libnccl; option nccl)\n", o.tp);
            return 2;
        }
        if (o.tp > n_dev) {
            std::fprintf(stderr, "resa-e2e: --tp %d: only %d CUDA device%s visible\n", o.tp,
                         n_dev, n_dev == 1 ? "" : "s");
            return 2;
        }
        if (full.hq % o.tp || full.hkv % o.tp || full.inter % o.tp) {
            std::fprintf(stderr, "resa-e2e: --tp %d does not divide the heads (%d query, %d KV) "
                                 "and the MLP width (%d): each rank holds whole GQA groups\n",
                         o.tp, full.hq, full.hkv, full.inter);
            return 2;
        }
    }
    const int nranks = std::max(1, o.tp);
    std::vector<Rank> ranks(nranks);
    for (int r = 0; r < nranks; r++)
        rank_open(ranks[r], r);
    std::vector<void *> comms; // before measuring free memory: NCCL's buffers are taken
    if (o.tp)
        comms = tp_init(o.tp);
    size_t free_b = SIZE_MAX, total_b = 0;
    for (int r = 0; r < nranks; r++) {
        size_t f = 0, t = 0;
        CK(cudaSetDevice(r));
        CK(cudaMemGetInfo(&f, &t));
        free_b = std::min(free_b, f);
        total_b = std::max(total_b, t);
    }
    CK(cudaSetDevice(0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));

    const ModelDims local = full.shard(nranks);
    const size_t weights = model_param_elems(local) * sizeof(bf16); // per GPU
    const size_t kv_bf16 = (size_t)full.layers * 2 * full.hkv * full.d * 2;
    const size_t kv_fp8 = (size_t)full.layers * 2 * full.hkv * (full.d + 4);
    if (!o.csv) {
        std::printf("# resa-e2e: libresa %s, %s%s, %.1f GiB free of %.1f GiB%s\n",
                    resa_version_string(), prop.name,
                    nranks > 1 ? (" x " + std::to_string(nranks)).c_str() : "", gib(free_b),
                    gib(total_b), nranks > 1 ? " (the least of the GPUs)" : "");
        std::printf("# model: Qwen2.5-7B shape (28 layers, hidden 3584, 28/4 heads, d 128, MLP "
                    "18944, vocab 152064), random bf16 weights (%.2f GB), greedy decoding\n",
                    model_param_elems(full) * sizeof(bf16) * 1e-9);
        std::printf("# modes: dense = DECODE with r = 1; sparse = r %.3g, never rectified; "
                    "resa = r %.3g, rectified every %d tokens\n",
                    o.fraction, o.fraction, o.interval);
        print_method(o);
        std::printf("# KV cache: bf16 (%zu bytes/token/sequence) or fp8 e4m3 with one fp32 "
                    "scale per token and head (%zu bytes; RESA_PARAM_KV_DTYPE = "
                    "RESA_DTYPE_FP8_E4M3, q/k/v/out stay bf16); runs:",
                    kv_bf16, kv_fp8);
        for (const ModeSpec &m : o.modes)
            std::printf(" %s:%s", m.mode.c_str(), m.kv_name());
        std::printf("; each KV dtype is its own point (\"max\": its own largest batch)\n");
        if (o.tp)
            std::printf("# tensor parallel: %d rank%s over GPUs 0..%d (%s, one host thread "
                        "each): a rank holds %d query and %d KV heads (its own libresa "
                        "context), 1/%d of the qkv and gate/up rows and of the o_proj and down "
                        "columns (%.2f GB of weights, embedding and LM head replicated); "
                        "all-reduce (sum, bf16) after o_proj and after down (inside rest); "
                        "times are rank 0's; tok/s/GPU = tokens/s / %d\n",
                        o.tp, o.tp == 1 ? "" : "s", o.tp - 1, tp_describe().c_str(), local.hq,
                        local.hkv, o.tp, weights * 1e-9, o.tp);
        else
            std::printf("# tensor parallel: off (one GPU, no NCCL call; %s)\n",
                        tp_describe().c_str());
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
        std::printf("# vs_dense = dense's ms/token at the same point / this one's; tput/d16 = "
                    "tokens/s / dense bf16's at the same --batch entry (for max: each at its "
                    "own largest batch)\n");
        std::printf("# agree = leading greedy tokens equal to dense's of the same point, else "
                    "to dense bf16's (first %d per sequence; random weights make this a weak "
                    "check)\n",
                    o.agree);
        std::printf("# memory per point and GPU: weights %.2f GB + KV %zu (bf16) or %zu (fp8) "
                    "bytes/token/sequence (+ summaries) + workspaces\n",
                    weights * 1e-9, kv_bf16 / nranks, kv_fp8 / nranks);
    }
    // CUDA graphs and cuBLAS internals beyond the workspace; under TP also
    // what NCCL takes for the collectives captured in the graphs
    const size_t overhead = (256ull << 20) + (o.tp ? 256ull << 20 : 0);
    auto fits = [&](long ctx, int batch, bool fp8) {
        return weights + point_bytes(local, ctx, batch, o, fp8) + overhead <= free_b;
    };
    auto largest = [&](long ctx, bool fp8) {
        int best = 0;
        while (best < 4096 && fits(ctx, best + 1, fp8))
            best++;
        return best;
    };
    const std::vector<std::vector<ModeSpec>> groups = groups_of(o);
    if (!o.csv && !o.check_tp)
        for (long ctx : o.contexts)
            for (const std::vector<ModeSpec> &g : groups)
                std::printf("# context %ld, KV %s: largest batch that fits: %d\n", ctx,
                            g[0].kv_name(), largest(ctx, g[0].kv_fp8));
    if (o.csv && !o.check_tp)
        std::printf("context,batch,mode,kv_dtype,tp,ms_per_token,tokens_per_s,"
                    "tokens_per_s_per_gpu,attn_pct,rect_pct,rest_pct,rect_steps,rect_ms_each,"
                    "speedup_vs_dense,tput_vs_dense_bf16,agree,compared\n");
    std::fflush(stdout);

    for (int r = 0; r < nranks; r++) {
        CK(cudaSetDevice(r));
        model_init(ranks[r].m, full, nranks, r, ranks[r].s);
        ranks[r].m.comm = o.tp ? comms[r] : nullptr;
    }
    CK(cudaSetDevice(0));
    check_small_kernels(full, ranks[0].s);
    int status = 0;
    if (o.check_tp) {
        status = check_tp(ranks, full, o);
    } else {
        for (long ctx : o.contexts)
            for (int want : o.batches) {
                Baseline base; // dense bf16 of this --batch entry, when it ran
                std::vector<ModeResult> base_rs;
                for (const std::vector<ModeSpec> &g : groups) {
                    const bool fp8 = g[0].kv_fp8;
                    const int batch = want ? want : largest(ctx, fp8);
                    if (want == 0 && !o.csv)
                        std::printf("\n(batch %d: the largest that fits at context %ld with a "
                                    "%s cache)",
                                    batch, ctx, g[0].kv_name());
                    size_t need = weights + point_bytes(local, ctx, batch, o, fp8) + overhead;
                    if (batch < 1 || !fits(ctx, batch, fp8)) {
                        std::fprintf(o.csv ? stderr : stdout,
                                     "%sskipped: context %ld batch %d (KV %s) needs %.1f GiB a "
                                     "GPU, %.1f GiB free\n",
                                     o.csv ? "resa-e2e: " : "\n", ctx, batch, g[0].kv_name(),
                                     gib(need), gib(free_b));
                        continue;
                    }
                    const size_t tuned = ranks[0].gemms->tunings().size();
                    CK(cudaSetDevice(0));
                    std::vector<ModeResult> rs = o.tp ? run_point_tp(ranks, o, ctx, batch, g)
                                                      : run_point(ranks[0], o, ctx, batch, g);
                    report_gemms(o, *ranks[0].gemms, tuned, full.layers);
                    if (!fp8)
                        for (size_t k = 0; k < rs.size(); k++)
                            if (rs[k].spec.mode == "dense") {
                                base_rs = {rs[k]};
                                base.r = &base_rs[0];
                                base.batch = batch;
                                base.tps = batch * 1e3 / timing(o, rs[k]).ms;
                            }
                    report(o, ctx, batch, rs, base);
                }
            }
    }
    if (o.tp)
        tp_destroy(comms);
    for (Rank &r : ranks)
        rank_close(r);
    return status;
}
