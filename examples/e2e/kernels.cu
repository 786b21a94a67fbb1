// SPDX-License-Identifier: MIT
// resa-e2e: the model's small kernels.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "kernels.h"

namespace {

__host__ __device__ inline uint64_t mix64(uint64_t x)
{
    // splitmix64 finalizer
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// uniform in [-1, 1)
__device__ inline float unit(uint64_t seed, uint64_t i)
{
    return (float)(mix64(seed ^ mix64(i)) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

inline unsigned grid_for(size_t n, unsigned threads)
{
    size_t g = (n + threads - 1) / threads;
    return (unsigned)(g > 65535u * 16u ? 65535u * 16u : g);
}

__global__ void init_uniform_k(bf16 *w, size_t n, uint64_t seed, float center, float amp)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        w[i] = __float2bfloat16(center + amp * unit(seed, i));
}

__global__ void init_slice_k(bf16 *w, size_t rows, size_t cols, size_t full_cols, size_t row0,
                             size_t col0, uint64_t seed, float center, float amp)
{
    const size_t n = rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t full = (row0 + i / cols) * full_cols + col0 + i % cols;
        w[i] = __float2bfloat16(center + amp * unit(seed, full));
    }
}

__global__ void fill_kv_k(bf16 *k, bf16 *v, int rows, int width, uint64_t seed, int64_t first_pos)
{
    const float amp = 1.7320508f; // uniform with unit variance
    size_t n = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t g = (uint64_t)(first_pos + (int64_t)(i / width)) * (uint64_t)width + i % width;
        k[i] = __float2bfloat16(amp * unit(seed, 2 * g));
        v[i] = __float2bfloat16(amp * unit(seed, 2 * g + 1));
    }
}

__global__ void prompt_rows_k(int *tok, int *pos, int seq_base, int n_seqs, int n_per_seq,
                              int64_t first_pos, int vocab, uint64_t seed)
{
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n_seqs * n_per_seq)
        return;
    int b = seq_base + r / n_per_seq, j = r % n_per_seq;
    tok[r] = (int)(mix64(seed ^ mix64(((uint64_t)b << 32) | (uint64_t)j)) % (uint64_t)vocab);
    pos[r] = (int)(first_pos + j);
}

__global__ void rect_rows_k(int *tok, int *pos, const int *hist, int64_t stride, const int *bidx,
                            const int *start, int n_entries, int n)
{
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n_entries * n)
        return;
    int e = r / n, p = start[e] + r % n;
    tok[r] = hist[(int64_t)bidx[e] * stride + p];
    pos[r] = p;
}

__global__ void embed_k(const bf16 *emb, const int *tok, const int *pos, int hidden, float *x,
                        int *hist, int64_t stride, int seq_base, int rows_per_seq)
{
    int r = blockIdx.x, t = tok[r];
    const bf16 *e = emb + (size_t)t * hidden;
    float *o = x + (size_t)r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = __bfloat162float(e[i]);
    if (hist && threadIdx.x == 0)
        hist[(int64_t)(seq_base + r / rows_per_seq) * stride + pos[r]] = t;
}

__device__ float block_sum(float v, float *sh)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x / 32, l = threadIdx.x % 32, nw = blockDim.x / 32;
    if (l == 0)
        sh[w] = v;
    __syncthreads();
    v = l < nw ? sh[l] : 0.0f;
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One CTA per row; each thread keeps its (at most kNormPerThread) elements
// in registers between the sum and the scaling, and every load of a thread
// is issued before the first store.  (Loops that stored x between loads of
// possibly aliased delta and gamma paid one memory latency per element:
// ~7 us a row at hidden 3584, 0.41 ms a token, docs/performance.md e2e v7.)
constexpr int kNormPerThread = 8;
__global__ void add_rmsnorm_k(float *__restrict__ x, const bf16 *__restrict__ delta,
                              const bf16 *__restrict__ gamma, bf16 *__restrict__ xn, int hidden,
                              float eps)
{
    __shared__ float sh[32];
    const size_t row = (size_t)blockIdx.x * hidden;
    float v[kNormPerThread], g[kNormPerThread];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kNormPerThread; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        v[k] = 0.0f;
        g[k] = 0.0f;
        if (i < hidden) {
            v[k] = x[row + i] + (delta ? __bfloat162float(delta[row + i]) : 0.0f);
            g[k] = __bfloat162float(gamma[i]);
        }
        ss += v[k] * v[k];
    }
    const float inv = rsqrtf(block_sum(ss, sh) / (float)hidden + eps);
#pragma unroll
    for (int k = 0; k < kNormPerThread; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < hidden) {
            if (delta)
                x[row + i] = v[k];
            xn[row + i] = __float2bfloat16(v[k] * inv * g[k]);
        }
    }
}

// One thread per (row, head, rotated pair j < d / 2).  The angle is
// pos * inv_freq[j] in double (positions up to 2^18 times frequencies near 1
// need ~40 bits), reduced to [-pi, pi] in double, then rotated in float:
// one multiply, one rint and two fma in double instead of a double pow and
// sincos per element (which made this kernel latency-bound at 8 rows).
__global__ void bias_rope_k(const bf16 *qkv, const bf16 *bias, const int *pos,
                            const double *inv_freq, bf16 *q, bf16 *k, bf16 *v, int hq, int hkv,
                            int d)
{
    const int r = blockIdx.x, h = blockIdx.y, j = threadIdx.x, half = d / 2;
    if (j >= half)
        return;
    const bf16 *in = qkv + ((size_t)r * (hq + 2 * hkv) + h) * d;
    const int c1 = h * d + j, c2 = c1 + half;
    const float x1 = __bfloat162float(in[j]) + __bfloat162float(bias[c1]);
    const float x2 = __bfloat162float(in[j + half]) + __bfloat162float(bias[c2]);
    if (h >= hq + hkv) { // V: no rotation
        bf16 *o = v + ((size_t)r * hkv + (h - hq - hkv)) * d;
        o[j] = __float2bfloat16(x1);
        o[j + half] = __float2bfloat16(x2);
        return;
    }
    const double two_pi_hi = 6.283185307179586, two_pi_lo = 2.4492935982947064e-16;
    const double ang = (double)pos[r] * inv_freq[j];
    const double n = rint(ang * (1.0 / two_pi_hi));
    const double red = fma(-n, two_pi_lo, fma(-n, two_pi_hi, ang)); // |red| <= ~pi
    float s, c;
    sincosf((float)red, &s, &c);
    bf16 *o = h < hq ? q + ((size_t)r * hq + h) * d : k + ((size_t)r * hkv + (h - hq)) * d;
    o[j] = __float2bfloat16(x1 * c - x2 * s);
    o[j + half] = __float2bfloat16(x2 * c + x1 * s);
}

__global__ void swiglu_k(const bf16 *gu, bf16 *act, int rows, int inter)
{
    size_t n = (size_t)rows * inter;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / inter, j = i % inter;
        float g = __bfloat162float(gu[r * 2 * inter + j]);
        float u = __bfloat162float(gu[r * 2 * inter + inter + j]);
        act[i] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
    }
}

// One CTA per row.  A thread scans its 16-byte groups of 4 logits (4 groups
// in flight) when rows are 16-byte aligned, single logits otherwise; within a
// thread indices only grow, so `>` keeps the lowest index of its maximum.
// (Single 4-byte loads left the 8 rows of a batch-8 step latency-bound on 8
// SMs: 57 us for 152064 logits a row.)
__global__ void argmax_k(const float *logits, int vocab, int *tok_out, int *pos, int pos_add)
{
    __shared__ float sv[1024];
    __shared__ int si[1024];
    const float *row = logits + (size_t)blockIdx.x * vocab;
    float best = -FLT_MAX;
    int bi = 0x7fffffff;
    auto take = [&](float v, int i) {
        if (v > best) { // NaN never wins
            best = v;
            bi = i;
        }
    };
    if (vocab % 4 == 0) {
        const float4 *row4 = reinterpret_cast<const float4 *>(row);
        const int n4 = vocab / 4;
#pragma unroll 4
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            const float4 q = row4[i];
            take(q.x, 4 * i);
            take(q.y, 4 * i + 1);
            take(q.z, 4 * i + 2);
            take(q.w, 4 * i + 3);
        }
    } else {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            take(row[i], i);
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) {
            float v = sv[threadIdx.x + o];
            int j = si[threadIdx.x + o];
            if (v > sv[threadIdx.x] || (v == sv[threadIdx.x] && j < si[threadIdx.x])) {
                sv[threadIdx.x] = v;
                si[threadIdx.x] = j;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        tok_out[blockIdx.x] = si[0] == 0x7fffffff ? 0 : si[0];
        if (pos)
            pos[blockIdx.x] += pos_add;
    }
}

} // namespace

void launch_init_uniform(bf16 *w, size_t n, uint64_t seed, float center, float amp, cudaStream_t s)
{
    init_uniform_k<<<grid_for(n, 256), 256, 0, s>>>(w, n, seed, center, amp);
    CK(cudaGetLastError());
}

void launch_init_slice(bf16 *w, size_t rows, size_t cols, size_t full_cols, size_t row0,
                       size_t col0, uint64_t seed, float center, float amp, cudaStream_t s)
{
    init_slice_k<<<grid_for(rows * cols, 256), 256, 0, s>>>(w, rows, cols, full_cols, row0, col0,
                                                            seed, center, amp);
    CK(cudaGetLastError());
}

void launch_fill_kv(bf16 *k, bf16 *v, int rows, int width, uint64_t seed, int64_t first_pos,
                    cudaStream_t s)
{
    fill_kv_k<<<grid_for((size_t)rows * width, 256), 256, 0, s>>>(k, v, rows, width, seed,
                                                                   first_pos);
    CK(cudaGetLastError());
}

void launch_prompt_rows(int *rows_tok, int *rows_pos, int seq_base, int n_seqs, int n_per_seq,
                        int64_t first_pos, int vocab, uint64_t seed, cudaStream_t s)
{
    int n = n_seqs * n_per_seq;
    prompt_rows_k<<<(n + 255) / 256, 256, 0, s>>>(rows_tok, rows_pos, seq_base, n_seqs, n_per_seq,
                                                  first_pos, vocab, seed);
    CK(cudaGetLastError());
}

void launch_rect_rows(int *rows_tok, int *rows_pos, const int *hist, int64_t hist_stride,
                      const int *bidx, const int *start, int n_entries, int n, cudaStream_t s)
{
    int rows = n_entries * n;
    rect_rows_k<<<(rows + 255) / 256, 256, 0, s>>>(rows_tok, rows_pos, hist, hist_stride, bidx,
                                                   start, n_entries, n);
    CK(cudaGetLastError());
}

void launch_embed(const bf16 *emb, const int *tok, const int *pos, int rows, int hidden, float *x,
                  int *hist, int64_t hist_stride, int seq_base, int rows_per_seq, cudaStream_t s)
{
    embed_k<<<rows, 256, 0, s>>>(emb, tok, pos, hidden, x, hist, hist_stride, seq_base,
                                 rows_per_seq);
    CK(cudaGetLastError());
}

void launch_add_rmsnorm(float *x, const bf16 *delta, const bf16 *gamma, bf16 *xn, int rows,
                        int hidden, float eps, cudaStream_t s)
{
    const int threads = std::max(128, (hidden + kNormPerThread - 1) / kNormPerThread + 31) & ~31;
    if (threads > 1024) {
        std::fprintf(stderr, "resa-e2e: hidden %d is above add_rmsnorm's %d\n", hidden,
                     1024 * kNormPerThread);
        std::exit(1);
    }
    add_rmsnorm_k<<<rows, threads, 0, s>>>(x, delta, gamma, xn, hidden, eps);
    CK(cudaGetLastError());
}

void rope_inv_freq(double *out, int d, double theta)
{
    for (int j = 0; j < d / 2; j++)
        out[j] = std::pow(theta, -2.0 * j / d);
}

void launch_bias_rope(const bf16 *qkv, const bf16 *bias, const int *pos, const double *inv_freq,
                      bf16 *q, bf16 *k, bf16 *v, int rows, int hq, int hkv, int d, cudaStream_t s)
{
    const dim3 grid((unsigned)rows, (unsigned)(hq + 2 * hkv));
    bias_rope_k<<<grid, (unsigned)((d / 2 + 31) & ~31), 0, s>>>(qkv, bias, pos, inv_freq, q, k, v,
                                                                hq, hkv, d);
    CK(cudaGetLastError());
}

void launch_swiglu(const bf16 *gu, bf16 *act, int rows, int inter, cudaStream_t s)
{
    swiglu_k<<<grid_for((size_t)rows * inter, 256), 256, 0, s>>>(gu, act, rows, inter);
    CK(cudaGetLastError());
}

void launch_argmax(const float *logits, int rows, int vocab, int *tok_out, int *pos, int pos_add,
                   cudaStream_t s)
{
    argmax_k<<<rows, 1024, 0, s>>>(logits, vocab, tok_out, pos, pos_add);
    CK(cudaGetLastError());
}
