// SPDX-License-Identifier: MIT
// resa-e2e: a Qwen2.5-7B-shaped decoder with random bf16 weights.  The host
// side of the model: weights, activations and one forward pass over a batch
// of rows; attention is delegated to libresa (resa_ctx_step_attend).
//
// Tensor parallelism (--tp N, tp.h): rank t holds query heads [t hq/N,
// (t+1) hq/N) and KV heads [t hkv/N, (t+1) hkv/N) (q, k and v rows of the
// fused projection and its bias: column-parallel), MLP columns [t inter/N,
// (t+1) inter/N) of gate and of up (column-parallel), and the matching input
// columns of o_proj and down (row-parallel), whose partial outputs are summed
// over the ranks by an all-reduce (bf16) before the residual add.  Embedding,
// norms and LM head are replicated; every rank samples the same tokens.
#pragma once

#include "gemm.h"
#include "kernels.h"

struct Layer {
    bf16 *ln1, *ln2;   // [hidden]
    bf16 *w_qkv;       // [(hq + 2 hkv) d][hidden], rows q | k | v
    bf16 *b_qkv;       // [(hq + 2 hkv) d]
    bf16 *w_o;         // [hidden][hq d]
    bf16 *w_gu;        // [2 inter][hidden], rows gate | up
    bf16 *w_down;      // [hidden][inter]
};

struct Model {
    ModelDims dims;          // this rank's shard (full.shard(tp)); the whole model at tp 1
    ModelDims full;          // the whole model
    int tp = 1, rank = 0;
    void *comm = nullptr;    // NCCL communicator of the tp ranks (tp.h); NULL: no all-reduce
    bf16 *arena = nullptr;
    size_t arena_elems = 0;
    Layer layers[64];
    bf16 *emb = nullptr, *lm_head = nullptr, *final_norm = nullptr;
    double *rope_inv_freq = nullptr; // [d / 2], on the device
};

// Parameter count of a model or shard of these dims (elements).
size_t model_param_elems(const ModelDims &m);
// Allocates and fills rank `rank`'s shard of the weights of `full` split over
// `tp` ranks on the current device (hash kernel, kSeed): each element is a
// function of its tensor and its index in the whole tensor only, so a shard
// holds exactly the corresponding slice of the tp = 1 weights.  m.comm is
// left NULL.
void model_init(Model &m, const ModelDims &full, int tp, int rank, cudaStream_t s);
void model_free(Model &m);

// Activations for up to `tmax` rows, logits for up to `max_out` rows.
struct Acts {
    int tmax = 0, max_out = 0;
    float *x = nullptr;                              // residual stream, fp32
    bf16 *xn = nullptr, *qkv = nullptr, *q = nullptr, *k = nullptr, *v = nullptr;
    bf16 *attn = nullptr, *tmp = nullptr, *gu = nullptr, *act = nullptr;
    float *logits = nullptr;
    int *rows_tok = nullptr, *rows_pos = nullptr;    // rows of prefill / rectification
};
size_t acts_bytes(const ModelDims &m, int tmax, int max_out);
void acts_alloc(Acts &a, const ModelDims &m, int tmax, int max_out);
void acts_free(Acts &a);

// One forward pass over `rows` rows = n_seqs consecutive groups of
// rows_per_seq rows (one group per batch entry of the libresa step).
struct Pass {
    int rows = 0, rows_per_seq = 1;
    const int *tok = nullptr, *pos = nullptr; // device [rows]
    int *hist = nullptr;                      // token history to record into (or NULL)
    int64_t hist_stride = 0;
    int seq_base = 0;                         // batch index of the first group
    resa_ctx *ctx = nullptr;                  // NULL: attention calls left out
    bool logits = true;                       // final norm, LM head, argmax of each group's last row
    int *tok_out = nullptr;                   // [rows / rows_per_seq] sampled tokens
    int *pos_adv = nullptr;                   // positions advanced by pos_add after sampling
    int pos_add = 0;
};
void model_forward(const Model &m, const Acts &a, const Gemms &g, cudaStream_t s, const Pass &p);
// Tunes the matrix products of a forward pass over `rows` rows in groups of
// rows_per_seq (with the LM head when `logits`); before capturing that pass.
void model_tune_gemms(const Model &m, const Acts &a, Gemms &g, int rows, int rows_per_seq,
                      bool logits);
