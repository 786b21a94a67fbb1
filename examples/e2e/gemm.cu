// SPDX-License-Identifier: MIT
// resa-e2e: matrix products through cuBLAS / cuBLASLt, the algorithm of each
// shape chosen by timing (gemm.h says why).
//
// The search of one shape: a pool of configurations, each accepted by
// cublasLtMatmulAlgoCheck within the fixed workspace and distinct from the
// others: the heuristic's candidates as offered (tier 0), then each of them
// split K ways (kSplits) where it supports split-K (tier 1, ordered by how
// close the wave count is to one).  Each is screened by one pass over the
// matrices (a CUDA graph replay: PassTimer says why) until kBudgetMs of wall
// time is spent on the shape; the kFinalists fastest are timed like the
// default (the median of kPasses passes), and the fastest of those that beats
// the default and whose output matches the default's is kept.  (Every tile
// of cuBLASLt's other algorithms, cublasLtMatmulAlgoGetIds, was tried too on
// an H200 and never reached the finalists, so it is not searched.)
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <set>

#include "gemm.h"

#define CL(call) CB(call) // cublasLt returns cublasStatus_t too

namespace {

constexpr int kCandidates = 32;       // cuBLASLt heuristic results asked for
constexpr int kPasses = 5;            // timed passes over all matrices (median kept)
constexpr int kSplits[] = {2, 3, 4, 6, 8, 12, 16}; // split-K counts tried
constexpr int kMinKPerSplit = 256;    // shorter splits: mostly reduction overhead
constexpr double kBudgetMs = 250;     // per shape: pool building and screening stop here
constexpr int kFinalists = 4;         // screened configurations timed in full ...
constexpr double kFinalSlack = 1.15;  // ... when within this factor of the fastest screened
constexpr double kTol = 2e-2;         // output check: relative, or of the largest magnitude
constexpr uint64_t kInputSeed = 0x9E3779B97F4A7C15ull;

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0)
{
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Algorithm configuration and capability attributes are typed (int32_t,
// uint32_t): T must be the documented type, or the call fails (T{} then).
// `get`: cublasLtMatmulAlgoConfigGetAttribute or ...CapGetAttribute, which
// share their signature.
template <class T, class Attr>
T algo_attr(cublasStatus_t (*get)(const cublasLtMatmulAlgo_t *, Attr, void *, size_t, size_t *),
            const cublasLtMatmulAlgo_t &a, Attr attr)
{
    T v{};
    size_t written = 0;
    return get(&a, attr, &v, sizeof v, &written) == CUBLAS_STATUS_SUCCESS ? v : T{};
}
template <class T>
T config_of(const cublasLtMatmulAlgo_t &a, cublasLtMatmulAlgoConfigAttributes_t attr)
{
    return algo_attr<T>(cublasLtMatmulAlgoConfigGetAttribute, a, attr);
}
template <class T>
T cap_of(const cublasLtMatmulAlgo_t &a, cublasLtMatmulAlgoCapAttributes_t attr)
{
    return algo_attr<T>(cublasLtMatmulAlgoCapGetAttribute, a, attr);
}

template <class T>
bool set_config(cublasLtMatmulAlgo_t &a, cublasLtMatmulAlgoConfigAttributes_t attr, T v)
{
    return cublasLtMatmulAlgoConfigSetAttribute(&a, attr, &v, sizeof v) == CUBLAS_STATUS_SUCCESS;
}

// RESA_E2E_GEMM_LOG: the finalists and the output checks on stderr.
bool gemm_log()
{
    return std::getenv("RESA_E2E_GEMM_LOG") != nullptr;
}

int splits_of(const cublasLtMatmulAlgo_t &a)
{
    return std::max(1, (int)config_of<int32_t>(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM));
}

// Reduction schemes for split-K partial sums that keep them in fp32, so that
// a split product differs from an unsplit one by summation order only:
// INPLACE and OUTPUT_TYPE accumulate in the output type, fp32 for lm_head
// (where OUTPUT_TYPE is COMPUTE_TYPE again) but bf16 for the others, a
// rounding to 8 bits of mantissa per split.
uint32_t fp32_schemes(cudaDataType_t ytype)
{
    return CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
           (ytype == CUDA_R_32F ? (uint32_t)CUBLASLT_REDUCTION_SCHEME_INPLACE : 0u);
}

struct Config {
    cublasLtMatmulAlgo_t algo;
    int tier;    // 0 heuristic, 1 its split-K variants
    float waves; // from cublasLtMatmulAlgoCheck
};

// The configurations of one shape: distinct, accepted by
// cublasLtMatmulAlgoCheck, within the workspace.
class Pool {
  public:
    Pool(cublasLtHandle_t lt, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
         cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, size_t ws_bytes)
        : lt_(lt), desc_(desc), a_(a), b_(b), c_(c), ws_bytes_(ws_bytes)
    {
    }

    // Adds `algo` once, when the check accepts it within the workspace.
    void add(const cublasLtMatmulAlgo_t &algo, int tier)
    {
        Key k;
        std::memcpy(k.data(), algo.data, sizeof algo.data);
        if (!seen_.insert(k).second)
            return; // failures are remembered too: each is checked once
        cublasLtMatmulHeuristicResult_t r{};
        if (cublasLtMatmulAlgoCheck(lt_, desc_, a_, b_, c_, c_, &algo, &r) ==
                CUBLAS_STATUS_SUCCESS &&
            r.workspaceSize <= ws_bytes_)
            configs.push_back({algo, tier, r.wavesCount});
    }

    std::vector<Config> configs;

  private:
    using Key = std::array<uint64_t, sizeof(cublasLtMatmulAlgo_t) / sizeof(uint64_t)>;
    cublasLtHandle_t lt_;
    cublasLtMatmulDesc_t desc_;
    cublasLtMatrixLayout_t a_, b_, c_;
    size_t ws_bytes_;
    std::set<Key> seen_;
};

// Adds `a` split s ways, for each s of kSplits that leaves every split at
// least kMinKPerSplit of K, with each fp32 reduction scheme `a` offers.
void add_splits(Pool &pool, const GemmShape &sh, const cublasLtMatmulAlgo_t &a)
{
    if (cap_of<int32_t>(a, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT) == 0)
        return;
    const uint32_t schemes =
        cap_of<uint32_t>(a, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK) & fp32_schemes(sh.ytype);
    for (int s : kSplits) {
        if (sh.K / s < kMinKPerSplit)
            break;
        for (uint32_t scheme = 1; scheme < CUBLASLT_REDUCTION_SCHEME_MASK; scheme <<= 1) {
            cublasLtMatmulAlgo_t v = a;
            if ((schemes & scheme) && set_config<int32_t>(v, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, s) &&
                set_config<uint32_t>(v, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, scheme))
                pool.add(v, 1);
        }
    }
}

// Screening order: the heuristic's own first, in its order; then the split
// variants by |log2(waves)| (one full wave: every SM busy, no tail).
void order(std::vector<Config> &cs)
{
    auto key = [](const Config &c) {
        return c.waves > 0 ? std::fabs(std::log2(c.waves)) : 1e9f;
    };
    std::stable_sort(cs.begin(), cs.end(), [&](const Config &x, const Config &y) {
        if (x.tier != y.tier)
            return x.tier < y.tier;
        return x.tier > 0 && key(x) < key(y);
    });
}

// Times passes of one product over all of a shape's matrices, each pass
// captured as a CUDA graph and replayed between CUDA events, as the engine
// runs it: launched one by one from the host, a pass of 13 us products can
// be bound by cublasLtMatmul's host side (several us a call, two kernels for
// split-K) and would rank configurations by that.  Capturing also proves a
// configuration capturable, as the engine's graphs need.  `one(w)` launches
// the product on matrix w; false: it failed.
class PassTimer {
  public:
    PassTimer(cudaStream_t s, const std::vector<const bf16 *> &ws) : s_(s), ws_(ws)
    {
        CK(cudaEventCreate(&e0_));
        CK(cudaEventCreate(&e1_));
    }
    ~PassTimer()
    {
        cudaEventDestroy(e0_);
        cudaEventDestroy(e1_);
    }
    PassTimer(const PassTimer &) = delete;
    PassTimer &operator=(const PassTimer &) = delete;

    // Screening: one pass, us per matrix; negative when it failed.
    template <class F> double screen_us(F one) { return timed_us(one, 1); }

    // The median of kPasses passes after an untimed one.
    template <class F> double median_us(F one) { return timed_us(one, kPasses); }

  private:
    // One eager call first (a kernel's first launch may load its module or
    // set attributes, which capture forbids), then the pass captured in the
    // engine's capture mode, instantiated and uploaded outside the timing.
    template <class F> cudaGraphExec_t capture(F one)
    {
        if (!one(ws_[0]))
            return nullptr;
        CK(cudaStreamSynchronize(s_));
        bool ok = true;
        cudaGraph_t g = nullptr;
        CK(cudaStreamBeginCapture(s_, kCaptureMode));
        for (const bf16 *w : ws_)
            if (!(ok = one(w)))
                break;
        ok = cudaStreamEndCapture(s_, &g) == cudaSuccess && ok;
        cudaGraphExec_t x = nullptr;
        ok = ok && cudaGraphInstantiate(&x, g, 0) == cudaSuccess &&
             cudaGraphUpload(x, s_) == cudaSuccess;
        if (g)
            cudaGraphDestroy(g);
        if (!ok && x)
            cudaGraphExecDestroy(x);
        return ok ? x : nullptr;
    }

    double replay_us(cudaGraphExec_t x)
    {
        CK(cudaEventRecord(e0_, s_));
        CK(cudaGraphLaunch(x, s_));
        CK(cudaEventRecord(e1_, s_));
        CK(cudaEventSynchronize(e1_));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, e0_, e1_));
        return 1e3 * ms / (double)ws_.size();
    }

    // The median of n replays (after an untimed one when n > 1).
    template <class F> double timed_us(F one, int n)
    {
        cudaGraphExec_t x = capture(one);
        if (!x) {
            CK(cudaStreamSynchronize(s_));
            (void)cudaGetLastError(); // a refused launch: not the next launcher's error
            return -1.0;
        }
        if (n > 1)
            replay_us(x);
        std::vector<double> t(n);
        for (double &us : t)
            us = replay_us(x);
        CK(cudaGraphExecDestroy(x));
        std::nth_element(t.begin(), t.begin() + n / 2, t.end());
        return t[n / 2];
    }

    cudaStream_t s_;
    const std::vector<const bf16 *> &ws_;
    cudaEvent_t e0_ = nullptr, e1_ = nullptr;
};

// One configuration, for RESA_E2E_GEMM_LOG: algorithm id, tile, stages,
// splits and reduction scheme, its tier and wave count.
void log_config(const char *name, const GemmShape &sh, const Config &c, double screen_us,
                double us)
{
    const cublasLtMatmulAlgo_t &a = c.algo;
    std::fprintf(stderr,
                 "resa-e2e: gemm %s %d x %d x %d: algo %d tile %u stages %u split-K %d scheme %u "
                 "tier %d waves %.2f: screened %.1f us, timed %.1f us\n",
                 name, sh.M, sh.N, sh.K, config_of<int32_t>(a, CUBLASLT_ALGO_CONFIG_ID),
                 config_of<uint32_t>(a, CUBLASLT_ALGO_CONFIG_TILE_ID),
                 config_of<uint32_t>(a, CUBLASLT_ALGO_CONFIG_STAGES_ID), splits_of(a),
                 config_of<uint32_t>(a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME), c.tier, c.waves,
                 screen_us, us);
}

// Y (column-major N x M, ldc N) to floats on the host.
std::vector<float> to_host(const void *y, cudaDataType_t ytype, size_t n, cudaStream_t s)
{
    std::vector<float> out(n);
    if (ytype == CUDA_R_32F) {
        CK(cudaMemcpyAsync(out.data(), y, n * sizeof(float), cudaMemcpyDeviceToHost, s));
        CK(cudaStreamSynchronize(s));
        return out;
    }
    std::vector<uint16_t> raw(n);
    CK(cudaMemcpyAsync(raw.data(), y, n * sizeof(uint16_t), cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    for (size_t i = 0; i < n; i++) {
        const uint32_t bits = (uint32_t)raw[i] << 16; // bf16: the top half of a float
        std::memcpy(&out[i], &bits, sizeof bits);
    }
    return out;
}

} // namespace

Gemms::Gemms(cublasHandle_t blas, cudaStream_t s, size_t workspace_bytes)
    : blas_(blas), stream_(s), ws_bytes_(workspace_bytes)
{
    CL(cublasLtCreate(&lt_));
    CK(cudaMalloc(&ws_, ws_bytes_)); // fixed: nothing allocates inside a captured graph
}

Gemms::~Gemms()
{
    for (auto &kv : plans_) {
        Plan &p = kv.second;
        cublasLtMatrixLayoutDestroy(p.a);
        cublasLtMatrixLayoutDestroy(p.b);
        cublasLtMatrixLayoutDestroy(p.c);
        cublasLtMatmulDescDestroy(p.desc);
    }
    cudaFree(ws_);
    cublasLtDestroy(lt_);
}

void Gemms::run_default(const bf16 *w, const bf16 *x, int64_t ldx, void *y,
                        cudaDataType_t ytype, int M, int N, int K) const
{
    // Column-major view: Y^T[N][M] = (W^T)^T[N][K] X^T[K][M].
    const float one = 1.0f, zero = 0.0f;
    CB(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, CUDA_R_16BF, K, x,
                    CUDA_R_16BF, (int)ldx, &zero, y, ytype, N, CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT));
}

cublasStatus_t Gemms::try_plan(const Plan &p, const bf16 *w, const bf16 *x, void *y) const
{
    const float one = 1.0f, zero = 0.0f;
    return cublasLtMatmul(lt_, p.desc, &one, w, p.a, x, p.b, &zero, y, p.c, y, p.c, &p.algo, ws_,
                          ws_bytes_, stream_);
}

void Gemms::run_plan(const Plan &p, const bf16 *w, const bf16 *x, void *y) const
{
    CL(try_plan(p, w, x, y));
}

void Gemms::run(const bf16 *w, const bf16 *x, int64_t ldx, void *y, cudaDataType_t ytype, int M,
                int N, int K) const
{
    auto it = plans_.find(GemmShape{M, N, K, ldx, ytype});
    if (it != plans_.end() && it->second.lt)
        run_plan(it->second, w, x, y);
    else
        run_default(w, x, ldx, y, ytype, M, N, K);
}

// Does `p` compute what cublasGemmEx's default does, up to summation order?
// Element-wise on one matrix: within kTol relative, or kTol of the largest
// magnitude of the default's output (cancellation leaves small elements with
// large relative differences).
bool Gemms::agrees_with_default(const Plan &p, const GemmShape &sh, const bf16 *w,
                                const bf16 *x, void *y) const
{
    const size_t n = (size_t)sh.N * sh.M;
    run_default(w, x, sh.ldx, y, sh.ytype, sh.M, sh.N, sh.K);
    const std::vector<float> ref = to_host(y, sh.ytype, n, stream_);
    if (try_plan(p, w, x, y) != CUBLAS_STATUS_SUCCESS) {
        (void)cudaGetLastError();
        return false;
    }
    const std::vector<float> got = to_host(y, sh.ytype, n, stream_);
    double max_ref = 0, max_diff = 0;
    for (float v : ref)
        max_ref = std::max(max_ref, (double)std::fabs(v));
    bool ok = true;
    for (size_t i = 0; i < n; i++) {
        const double d = std::fabs((double)got[i] - ref[i]); // NaN: fails below
        ok = ok && (d <= kTol * std::fabs(ref[i]) || d <= kTol * max_ref);
        max_diff = std::max(max_diff, d);
    }
    if (gemm_log())
        std::fprintf(stderr,
                     "resa-e2e: gemm %d x %d x %d: check %s: max |diff| %.3g, max |y| %.3g\n",
                     sh.M, sh.N, sh.K, ok ? "passed" : "FAILED", max_diff, max_ref);
    return ok;
}

void Gemms::tune(const char *name, const GemmShape &sh, const std::vector<const bf16 *> &ws,
                 bf16 *x, void *y)
{
    if (plans_.count(sh) || ws.empty())
        return;
    const Clock::time_point t0 = Clock::now();
    Plan p;
    CL(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CL(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CL(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    // The same column-major view as run_default.
    CL(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, sh.K, sh.N, sh.K));
    CL(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, sh.K, sh.M, sh.ldx));
    CL(cublasLtMatrixLayoutCreate(&p.c, sh.ytype, sh.N, sh.M, sh.N));
    // Values in the input rows: the scratch holds whatever was there (the
    // output check needs numbers, and zeros would time a lighter load).
    launch_init_uniform(x, (size_t)(sh.M - 1) * sh.ldx + sh.K, kInputSeed, 0.0f, 1.0f, stream_);

    // tier 0: the heuristic's candidates
    cublasLtMatmulPreference_t pref;
    CL(cublasLtMatmulPreferenceCreate(&pref));
    CL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                            &ws_bytes_, sizeof ws_bytes_));
    std::vector<cublasLtMatmulHeuristicResult_t> cand(kCandidates);
    int n_cand = 0;
    if (cublasLtMatmulAlgoGetHeuristic(lt_, p.desc, p.a, p.b, p.c, p.c, pref, kCandidates,
                                       cand.data(), &n_cand) != CUBLAS_STATUS_SUCCESS)
        n_cand = 0; // none offered: the default stays
    CL(cublasLtMatmulPreferenceDestroy(pref));
    Pool pool(lt_, p.desc, p.a, p.b, p.c, ws_bytes_);
    for (int i = 0; i < n_cand; i++)
        if (cand[i].state == CUBLAS_STATUS_SUCCESS)
            pool.add(cand[i].algo, 0);
    // tier 1: their split-K variants (after all of tier 0, so that a split
    // configuration the heuristic offers itself stays in tier 0)
    for (int i = 0; i < n_cand; i++)
        if (cand[i].state == CUBLAS_STATUS_SUCCESS)
            add_splits(pool, sh, cand[i].algo);
    std::vector<Config> &cs = pool.configs;
    order(cs);

    GemmTuning r;
    r.name = name;
    r.shape = sh;
    r.bytes = 2.0 * sh.N * sh.K;
    r.valid = (int)cs.size();
    PassTimer timer(stream_, ws);
    r.default_us = timer.median_us([&](const bf16 *w) {
        run_default(w, x, sh.ldx, y, sh.ytype, sh.M, sh.N, sh.K);
        return true;
    });
    if (r.default_us < 0) { // the engine's graphs could not hold it either
        std::fprintf(stderr, "resa-e2e: gemm %s: cublasGemmEx cannot be captured\n", name);
        std::exit(1);
    }
    auto launcher = [&](const Plan &trial) {
        return [&](const bf16 *w) { return try_plan(trial, w, x, y) == CUBLAS_STATUS_SUCCESS; };
    };

    // screening: one pass each, until the budget is spent
    std::vector<std::pair<double, size_t>> screened; // (us, index in cs)
    for (size_t i = 0; i < cs.size() && ms_since(t0) < kBudgetMs; i++) {
        Plan trial = p;
        trial.algo = cs[i].algo;
        const double us = timer.screen_us(launcher(trial));
        if (us < 0)
            continue;
        r.candidates++;
        screened.push_back({us, i});
    }
    std::sort(screened.begin(), screened.end());

    // finalists: timed like the default, then the fastest that agrees wins
    const bool log = gemm_log();
    std::vector<std::pair<double, size_t>> finals;
    for (size_t k = 0; k < screened.size() && (int)k < kFinalists &&
                       screened[k].first <= kFinalSlack * screened[0].first;
         k++) {
        Plan trial = p;
        trial.algo = cs[screened[k].second].algo;
        const double us = timer.median_us(launcher(trial));
        if (us >= 0)
            finals.push_back({us, screened[k].second});
        if (log)
            log_config(name, sh, cs[screened[k].second], screened[k].first, us);
    }
    std::sort(finals.begin(), finals.end());
    r.best_us = r.default_us;
    for (const auto &f : finals) {
        if (f.first >= r.default_us)
            break;
        Plan trial = p;
        trial.algo = cs[f.second].algo;
        if (!agrees_with_default(trial, sh, ws[0], x, y)) {
            r.rejected++;
            std::fprintf(stderr,
                         "resa-e2e: gemm %s %d x %d x %d: a cuBLASLt configuration (split-K %d, "
                         "%.1f us) differs from cublasGemmEx's output: not kept\n",
                         name, sh.M, sh.N, sh.K, splits_of(trial.algo), f.first);
            continue;
        }
        p.algo = trial.algo;
        p.lt = true;
        r.lt = true;
        r.splits = splits_of(p.algo);
        r.best_us = f.first;
        break;
    }
    r.tune_ms = ms_since(t0);
    plans_[sh] = p;
    tunings_.push_back(r);
}
