// SPDX-License-Identifier: MIT
// resa-e2e: the model's small kernels (everything that is not a matrix
// product or attention).  Each launcher enqueues on `s` and checks the launch.
#pragma once

#include <cuda_bf16.h>

#include "common.h"

typedef __nv_bfloat16 bf16;

// w[i] = center + amp * u(seed, i), u uniform in [-1, 1): deterministic weights.
void launch_init_uniform(bf16 *w, size_t n, uint64_t seed, float center, float amp,
                         cudaStream_t s);

// Rows row0 .. row0 + rows and columns col0 .. col0 + cols of the tensor
// [.][full_cols] that launch_init_uniform(seed, center, amp) fills, as a
// [rows][cols] matrix: w[i][j] = center + amp * u(seed, (row0 + i) full_cols
// + col0 + j).  A tensor-parallel shard is a slice of the same weights.
void launch_init_slice(bf16 *w, size_t rows, size_t cols, size_t full_cols, size_t row0,
                       size_t col0, uint64_t seed, float center, float amp, cudaStream_t s);

// Random K and V rows for the context fill: [rows][width] each, values of
// unit variance, a function of (seed, first_pos + row, column) only.
void launch_fill_kv(bf16 *k, bf16 *v, int rows, int width, uint64_t seed, int64_t first_pos,
                    cudaStream_t s);

// Prompt rows of `n_seqs` sequences starting at batch index seq_base:
// n_per_seq random token ids each, at positions first_pos .. first_pos + n_per_seq.
void launch_prompt_rows(int *rows_tok, int *rows_pos, int seq_base, int n_seqs, int n_per_seq,
                        int64_t first_pos, int vocab, uint64_t seed, cudaStream_t s);

// Rectification rows: entry e re-feeds hist[bidx[e]][start[e] + j], j < n, at
// position start[e] + j.
void launch_rect_rows(int *rows_tok, int *rows_pos, const int *hist, int64_t hist_stride,
                      const int *bidx, const int *start, int n_entries, int n, cudaStream_t s);

// x[r] = emb[tok[r]] (fp32 residual stream).  hist != NULL: also records the
// fed token, hist[seq_base + r / rows_per_seq][pos[r]] = tok[r].
void launch_embed(const bf16 *emb, const int *tok, const int *pos, int rows, int hidden, float *x,
                  int *hist, int64_t hist_stride, int seq_base, int rows_per_seq, cudaStream_t s);

// x += delta (delta may be NULL); xn = rmsnorm(x) * gamma, in bf16.
void launch_add_rmsnorm(float *x, const bf16 *delta, const bf16 *gamma, bf16 *xn, int rows,
                        int hidden, float eps, cudaStream_t s);

// RoPE's inverse frequencies theta^(-2 j / d), j < d / 2, on the host (the
// model copies them to the device once).
void rope_inv_freq(double *out, int d, double theta);

// qkv [rows][(hq + 2 hkv) d] + bias -> q [rows][hq][d], k, v [rows][hkv][d];
// RoPE (rotate-half) on q and k at pos[r], inv_freq [d / 2] on the device.
void launch_bias_rope(const bf16 *qkv, const bf16 *bias, const int *pos, const double *inv_freq,
                      bf16 *q, bf16 *k, bf16 *v, int rows, int hq, int hkv, int d, cudaStream_t s);

// gu [rows][2 inter] (gate | up) -> act [rows][inter] = silu(gate) * up.
void launch_swiglu(const bf16 *gu, bf16 *act, int rows, int inter, cudaStream_t s);

// Greedy sampling: tok_out[r] = argmax logits[r] (lowest index on ties);
// pos != NULL: pos[r] += pos_add.
void launch_argmax(const float *logits, int rows, int vocab, int *tok_out, int *pos, int pos_add,
                   cudaStream_t s);
