// SPDX-License-Identifier: MIT
// resa-e2e: the engine's matrix products, Y[M][N] = X[M][K] W[N][K]^T (bf16
// in, fp32 accumulate, bf16 or fp32 out), through cuBLAS.
//
// Why not one cublasGemmEx call: with 1 to 8 rows every product is a pass
// over its weights, and cuBLAS's default choice for such skinny shapes reads
// them at ~3 TB/s on an H200 (15.2 GB of weights: 4.7 ms a token, a third of
// a ReSA token at 256K).  cuBLASLt offers several algorithms per shape (split
// K, other tiles); Gemms::tune times them, and cublasGemmEx's default, on
// the model's own weights and keeps the fastest.  Tuning runs outside graph
// capture, once per shape; a shape never tuned runs cublasGemmEx as before.
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
    int candidates = 0;    // cuBLASLt algorithms timed (besides the default)
    double default_us = 0; // cublasGemmEx default, per matrix
    double best_us = 0;    // the chosen one, per matrix
    double bytes = 0;      // weight bytes of one matrix
};

class Gemms {
  public:
    Gemms(cublasHandle_t blas, cudaStream_t s, size_t workspace_bytes);
    ~Gemms();
    Gemms(const Gemms &) = delete;
    Gemms &operator=(const Gemms &) = delete;

    // Chooses the algorithm of `sh`: times cublasGemmEx's default and each
    // cuBLASLt candidate over all matrices of `ws` in turn (a model's
    // layers: more bytes than L2 holds, as in a forward pass), the median of
    // a few passes, and keeps the fastest.  x and y: scratch for M rows.
    // No-op when `sh` is tuned already.  Not during stream capture.
    void tune(const char *name, const GemmShape &sh, const std::vector<const bf16 *> &ws,
              const bf16 *x, void *y);

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

    cublasHandle_t blas_;
    cublasLtHandle_t lt_ = nullptr;
    cudaStream_t stream_;
    void *ws_ = nullptr;
    size_t ws_bytes_;
    std::map<GemmShape, Plan> plans_;
    std::vector<GemmTuning> tunings_;
};
