// SPDX-License-Identifier: MIT
// resa-e2e: shared definitions.  Every CUDA, cuBLAS and libresa status is
// checked through these macros; a failure prints where and why, then exits.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <resa.h>

#define CK(call)                                                                       \
    do {                                                                               \
        cudaError_t e_ = (call);                                                       \
        if (e_ != cudaSuccess) {                                                       \
            std::fprintf(stderr, "resa-e2e: %s:%d: %s failed: %s (%s)\n", __FILE__,    \
                         __LINE__, #call, cudaGetErrorName(e_), cudaGetErrorString(e_)); \
            std::exit(1);                                                              \
        }                                                                              \
    } while (0)

#define CB(call)                                                                      \
    do {                                                                              \
        cublasStatus_t s_ = (call);                                                   \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                            \
            std::fprintf(stderr, "resa-e2e: %s:%d: %s failed: %s (%s)\n", __FILE__,   \
                         __LINE__, #call, cublasGetStatusName(s_),                    \
                         cublasGetStatusString(s_));                                  \
            std::exit(1);                                                             \
        }                                                                             \
    } while (0)

// libresa: the context's last error names the bad argument or the CUDA failure.
#define CR(ctx, call)                                                                  \
    do {                                                                               \
        resa_status r_ = (call);                                                       \
        if (r_ != RESA_OK) {                                                           \
            std::fprintf(stderr, "resa-e2e: %s:%d: %s failed: %s: %s\n", __FILE__,     \
                         __LINE__, #call, resa_status_name(r_), resa_ctx_last_error(ctx)); \
            std::exit(1);                                                              \
        }                                                                              \
    } while (0)

// Qwen2.5-7B shape.
struct ModelDims {
    int layers = 28;
    int hidden = 3584;
    int hq = 28;
    int hkv = 4;
    int d = 128;
    int inter = 18944;
    int vocab = 152064;
    float eps = 1e-6f;
    double rope_theta = 1e6;
    int qkv() const { return (hq + 2 * hkv) * d; }  // fused q|k|v projection rows
    // One rank's share under tensor parallelism over `tp` GPUs: hq / tp query
    // and hkv / tp KV heads, inter / tp MLP columns (the caller checks that tp
    // divides all three); hidden and vocab stay whole.
    ModelDims shard(int tp) const
    {
        ModelDims s = *this;
        s.hq /= tp;
        s.hkv /= tp;
        s.inter /= tp;
        return s;
    }
};

// Every stream capture (decode steps, GEMM timing): thread-local, so that the
// rank threads of --tp capture at the same time (NCCL's multi-thread mode).
constexpr cudaStreamCaptureMode kCaptureMode = cudaStreamCaptureModeThreadLocal;

constexpr uint64_t kSeed = 0x5EEDC0FFEE123457ull;
