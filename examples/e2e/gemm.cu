// SPDX-License-Identifier: MIT
// resa-e2e: matrix products through cuBLAS / cuBLASLt, the algorithm of each
// shape chosen by timing (gemm.h says why).
#include <algorithm>

#include "gemm.h"

#define CL(call) CB(call) // cublasLt returns cublasStatus_t too

namespace {

constexpr int kCandidates = 32; // cuBLASLt heuristic results asked for
constexpr int kPasses = 5;      // timed passes over all matrices (median kept)

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

void Gemms::run_plan(const Plan &p, const bf16 *w, const bf16 *x, void *y) const
{
    const float one = 1.0f, zero = 0.0f;
    CL(cublasLtMatmul(lt_, p.desc, &one, w, p.a, x, p.b, &zero, y, p.c, y, p.c, &p.algo, ws_,
                      ws_bytes_, stream_));
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

void Gemms::tune(const char *name, const GemmShape &sh, const std::vector<const bf16 *> &ws,
                 const bf16 *x, void *y)
{
    if (plans_.count(sh) || ws.empty())
        return;
    Plan p;
    CL(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CL(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CL(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    // The same column-major view as run_default.
    CL(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, sh.K, sh.N, sh.K));
    CL(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, sh.K, sh.M, sh.ldx));
    CL(cublasLtMatrixLayoutCreate(&p.c, sh.ytype, sh.N, sh.M, sh.N));
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

    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    // Median over kPasses of one pass over every matrix, per matrix, in us;
    // one untimed pass first.  `one` runs the candidate on one matrix.
    auto time_us = [&](auto one) {
        for (const bf16 *w : ws)
            one(w);
        std::vector<float> t(kPasses);
        for (float &ms : t) {
            CK(cudaEventRecord(e0, stream_));
            for (const bf16 *w : ws)
                one(w);
            CK(cudaEventRecord(e1, stream_));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&ms, e0, e1));
        }
        std::nth_element(t.begin(), t.begin() + kPasses / 2, t.end());
        return 1e3 * t[kPasses / 2] / (double)ws.size();
    };
    GemmTuning r;
    r.name = name;
    r.shape = sh;
    r.bytes = 2.0 * sh.N * sh.K;
    r.default_us = time_us(
        [&](const bf16 *w) { run_default(w, x, sh.ldx, y, sh.ytype, sh.M, sh.N, sh.K); });
    r.best_us = r.default_us;
    for (int i = 0; i < n_cand; i++) {
        if (cand[i].state != CUBLAS_STATUS_SUCCESS || cand[i].workspaceSize > ws_bytes_)
            continue;
        Plan trial = p;
        trial.algo = cand[i].algo;
        r.candidates++;
        const double us = time_us([&](const bf16 *w) { run_plan(trial, w, x, y); });
        if (us < r.best_us) {
            r.best_us = us;
            p.algo = cand[i].algo;
            p.lt = true;
        }
    }
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    plans_[sh] = p;
    tunings_.push_back(r);
}
