// SPDX-License-Identifier: MIT
// resa-e2e: the engine's matrix products, Y[M][N] = X[M][K] W[N][K]^T (bf16
// in, fp32 accumulate, bf16 or fp32 out), through cuBLAS.
//
// Why not one cublasGemmEx call: with 1 to 8 rows every product is a pass
// over its weights, and cuBLAS's default choice for such skinny shapes reads
// them at ~3 TB/s on an H200 (15.2 GB of weights: 4.7 ms a token, a third of
// a ReSA token at 256K).  cuBLASLt offers several algorithms per shape;
// Gemms::tune times them, and cublasGemmEx's default, on the model's own
// weights and keeps the fastest whose output matches the default's.  The
// heuristic offers ~8 candidates, few of them split K, and at N = 3584-4608
// unsplit output tiles cannot fill 132 SMs, so tune adds split-K variants of
// them (gemm.cu says how the search is bounded).  Timing replays each pass as
// a CUDA graph, as the engine runs it.  Tuning runs outside graph capture,
// once per shape; a shape never tuned runs cublasGemmEx as before.
#pragma once

#include <cublasLt.h>

#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

struct GemmShape {
    int M, N, K;
    int64_t ldx;           // row stride of X, elements
    cudaDataType_t ytype;  // CUDA_R_16BF or CUDA_R_32F
    bool operator<(const GemmShape &o) const
    {
        return std::tie(M, N, K, ldx, ytype) < std::tie(o.M, o.N, o.K, o.ldx, o.ytype);
    }
};

// One tuned shape, as reported.
struct GemmTuning {
    std::string name;      // which weights ("qkv", "o", "gate_up", "down", "lm_head")
    GemmShape shape;
    int candidates = 0;    // cuBLASLt configurations timed (besides the default)
    int valid = 0;         // configurations cublasLtMatmulAlgoCheck accepted
    int rejected = 0;      // fast ones whose output differed from the default's
    bool lt = false;       // false: cublasGemmEx's default kept
    int splits = 1;        // K splits of the kept configuration
    double default_us = 0; // cublasGemmEx default, per matrix
    double best_us = 0;    // the chosen one, per matrix
    double bytes = 0;      // weight bytes of one matrix
    double tune_ms = 0;    // wall time of tune() for this shape
};

class Gemms {
  public:
    Gemms(cublasHandle_t blas, cudaStream_t s, size_t workspace_bytes);
    ~Gemms();
    Gemms(const Gemms &) = delete;
    Gemms &operator=(const Gemms &) = delete;

    // Chooses the algorithm of `sh`: times cublasGemmEx's default and the
    // cuBLASLt configurations over all matrices of `ws` in turn (a model's
    // layers: more bytes than L2 holds, as in a forward pass) and keeps the
    // fastest whose output on ws[0] matches the default's.  x and y: scratch
    // for M rows (x is filled with random values here).  No-op when `sh` is
    // tuned already.  Synchronizes: not during stream capture.
    void tune(const char *name, const GemmShape &sh, const std::vector<const bf16 *> &ws,
              bf16 *x, void *y);

    // Y = X W^T with the tuned algorithm of this shape (cublasGemmEx when none).
    void run(const bf16 *w, const bf16 *x, int64_t ldx, void *y, cudaDataType_t ytype, int M,
             int N, int K) const;

    const std::vector<GemmTuning> &tunings() const { return tunings_; }

  private:
    struct Plan {
        cublasLtMatmulDesc_t desc = nullptr;
        cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
        cublasLtMatmulAlgo_t algo{};
        bool lt = false; // false: cublasGemmEx's default was fastest
    };
    void run_default(const bf16 *w, const bf16 *x, int64_t ldx, void *y, cudaDataType_t ytype,
                     int M, int N, int K) const;
    void run_plan(const Plan &p, const bf16 *w, const bf16 *x, void *y) const;
    cublasStatus_t try_plan(const Plan &p, const bf16 *w, const bf16 *x, void *y) const;
    bool agrees_with_default(const Plan &p, const GemmShape &sh, const bf16 *w, const bf16 *x,
                             void *y) const;

    cublasHandle_t blas_;
    cublasLtHandle_t lt_ = nullptr;
    cudaStream_t stream_;
    void *ws_ = nullptr;
    size_t ws_bytes_;
    std::map<GemmShape, Plan> plans_;
    std::vector<GemmTuning> tunings_;
};
