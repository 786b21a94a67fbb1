/* SPDX-License-Identifier: MIT */
/*
 * The interface between the CUDA backend's glue (cuda/backend_cuda.cu) and
 * its kernels, one operation per file, each the twin of a CPU file:
 *   cuda/kv_write.cu          <-> lib/cpu/kv_write.c
 *   cuda/select_blocks.cu     <-> lib/cpu/attention_sparse.c (choose_blocks)
 *   cuda/attention_sparse.cu  <-> lib/cpu/attention_sparse.c (attention)
 *   cuda/attention_dense.cu   <-> lib/cpu/attention_dense.c
 *
 * Rules for every launch function here:
 *  - enqueue on a->stream only; no allocation, no host synchronization;
 *  - read the step from device memory (a->entries, a->page_tables, ...): the
 *    launch configuration may depend on the layout (resa_cuda_dims), on the
 *    step's entry count and on its modes, never on sequence lengths, so that a
 *    captured CUDA graph replays correctly for later steps of the same shape;
 *  - return cudaGetLastError() after the launch.
 */
#ifndef RESA_CUDA_KERNELS_H
#define RESA_CUDA_KERNELS_H

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

/* Fixed at lock time. */
typedef struct resa_cuda_dims {
    int32_t n_layers, hq, hkv, group, d, b, log2_b;
    int32_t n_pages, max_seqs, max_seq_blocks, sel_words;
    int32_t kv_dtype;            /* resa_dtype: the IO dtype, or RESA_DTYPE_FP8_E4M3 */
    int32_t io_dtype;            /* resa_dtype: RESA_DTYPE_F16 or RESA_DTYPE_BF16; the type T of
                                    q, k, v, out, of the values the cache reads back as and
                                    of the summaries (without sum_fp8) */
    int32_t kv_fp8;              /* the fp8 cache (lib/kv_fp8.h): K/V are e4m3 bytes with one
                                    fp32 scale per token and head, read back as
                                    T(e4m3 * scale) */
    int32_t sum_fp8;             /* summaries in fp8 e4m3 + kexp (lib/summary_fp8.h), else io_dtype */
    int64_t max_step_tokens;
    int32_t num_sms;
} resa_cuda_dims;

/* One entry of the step, as the kernels see it (uploaded by step_prepare). */
typedef struct resa_dev_entry {
    int32_t slot;     /* sequence slot: row of page_tables */
    int32_t mode;     /* resa_mode */
    int32_t n;        /* rows */
    int32_t n_blocks; /* DECODE: M */
    int32_t n_select; /* DECODE: budget n (forced blocks included, <= M) */
    int32_t pad;
    int64_t row;      /* first row in q, k, v, out */
    int64_t start;    /* position of the first row */
    int64_t end;      /* start + n */
    int64_t valid;    /* positions holding keys after the writes: max(end, old length) */
} resa_dev_entry;

/* Everything one layer of a step needs.  Pool pointers are already offset to
 * this layer: k/v [n_pages][hkv][b][d] (kv dtype: T, or e4m3 bytes with
 * kv_fp8), kscale/vscale [n_pages][hkv][b] (kv_fp8 only, else NULL),
 * kmin/kmax [n_pages][hkv][d] (T, or bytes with sum_fp8), kexp [n_pages][hkv]
 * (sum_fp8 only, else NULL). */
typedef struct resa_cuda_layer_args {
    resa_cuda_dims dims;
    int32_t layer;
    void *k, *v, *kmin, *kmax;
    float *kscale, *vscale;
    int8_t *kexp;
    uint32_t *selection;         /* [hkv][sel_words] bitmaps of slot 0 of this layer,
                                    stride per slot n_layers*hkv*sel_words; NULL = off */
    const int32_t *page_tables;  /* [max_seqs][max_seq_blocks] */
    const resa_dev_entry *entries;
    int32_t n_entries;
    const int32_t *decode_ids;   /* [n_decode] indices of DECODE entries */
    int32_t n_decode;
    const int32_t *dense_ids;    /* [n_dense] indices of APPEND and RECTIFY entries */
    int32_t n_dense;
    const int32_t *touched;      /* [n_touched] (entry, block) pairs whose summaries the
                                    step's writes change, 2 int32 each */
    int32_t n_touched;
    int64_t n_rows;              /* rows of q, k, v, out */
    float scale;
    float score_width;           /* w of the block score; 1 = the paper's bound */
    int32_t group_score;         /* resa_group_score: 0 pooled query, 1 per-head shares */
    int32_t local_blocks, sink_blocks;
    const void *q, *k_in, *v_in; /* IO dtype, layouts of resa.h */
    void *out;
    float *lse;                  /* [n_rows][hq] log-sum-exps of the rows (DECODE rows
                                    only, resa_ctx_step_attend_ex), or NULL */
    void *ws_select;             /* resa_cuda_select_workspace() bytes */
    void *ws_sparse;             /* resa_cuda_sparse_workspace() bytes */
    void *ws_dense;              /* resa_cuda_dense_workspace() bytes */
    cudaStream_t stream;
} resa_cuda_layer_args;

/* Workspace each operation needs, from the dims alone. */
size_t resa_cuda_select_workspace(const resa_cuda_dims *dims);
size_t resa_cuda_sparse_workspace(const resa_cuda_dims *dims);
size_t resa_cuda_dense_workspace(const resa_cuda_dims *dims);

/* select_blocks.cu: once, after ws_select is allocated (resa_cuda_select_workspace
 * bytes) and before any launch that uses it: zeroes the part of the select
 * workspace that must be zero between launches (the top-n arrival counters;
 * the launches leave it zero again).  Enqueues on stream and waits for it. */
cudaError_t resa_cuda_select_init(const resa_cuda_dims *dims, void *ws_select,
                                  cudaStream_t stream);

/* kv_write.cu: stores the K/V rows of every entry and recomputes the
 * summaries of the blocks they touch (over valid positions < end). */
cudaError_t resa_cuda_kv_write(const resa_cuda_layer_args *a);
/* kv_write.cu: summaries of the blocks of one page table (device) holding
 * positions [lo, hi), over valid positions < valid, every layer (pool base
 * pointers, not offset to a layer; kscale NULL unless kv_fp8).  For step
 * cancellation. */
cudaError_t resa_cuda_refresh_summaries(const resa_cuda_dims *dims, void *k,
                                        const float *kscale, void *kmin,
                                        void *kmax, int8_t *kexp, const int32_t *d_pages,
                                        int64_t lo, int64_t hi, int64_t valid,
                                        cudaStream_t stream);
/* select_blocks.cu: for every DECODE entry and KV head: pooled query, block
 * scores, budget with forced blocks, top-n; writes the chosen block indices
 * (ascending) to the workspace and, when a->selection, the bitmap. */
cudaError_t resa_cuda_select_blocks(const resa_cuda_layer_args *a);
/* attention_sparse.cu: split-KV attention of every DECODE entry over the
 * blocks chosen by resa_cuda_select_blocks (same a->ws_select), all g query
 * heads of a group sharing each K/V load, then the log-sum-exp combine. */
cudaError_t resa_cuda_attention_sparse(const resa_cuda_layer_args *a);
/* attention_dense.cu: dense causal attention of every APPEND and RECTIFY
 * entry (row at position p sees [0, p]) on tensor cores. */
cudaError_t resa_cuda_attention_dense(const resa_cuda_layer_args *a);

/* merge_states.cu: resa_ctx_merge_states on device memory (lib/merge.c's
 * formula); dtype a resa_dtype, d <= 256. */
cudaError_t resa_cuda_merge_states(int32_t dtype, int32_t n_parts, int64_t n_rows, int32_t d,
                                   const void *parts_out, const float *parts_lse, void *out,
                                   float *lse, cudaStream_t stream);

/* Where select_blocks leaves its result for attention_sparse:
 * list of (decode index i, head h) at ws_select + sel_list_offset, length n_select. */
static inline int32_t *resa_cuda_sel_list(const resa_cuda_dims *dims, void *ws_select,
                                          int32_t decode_index, int32_t head)
{
    return (int32_t *)ws_select +
           ((size_t)decode_index * dims->hkv + head) * (size_t)dims->max_seq_blocks;
}

#endif
