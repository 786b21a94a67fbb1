/* SPDX-License-Identifier: MIT */
/*
 * The interface between the CUDA backend's glue (cuda/backend_cuda.cu) and
 * its kernels, one operation per file, each the twin of a CPU file:
 *   cuda/kv_write.cu          <-> lib/cpu/kv_write.c
 *   cuda/select_blocks.cu     <-> lib/cpu/attention_sparse.c (choose_blocks) and
 *                                 lib/cpu/block_scores.c (phase 1 of the two-phase selection)
 *   cuda/select_cp.cu         <-> lib/cpu/block_scores.c (the thresholds)
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
    int32_t n_blocks; /* DECODE, QUERY_SPARSE: M, over every context of a split sequence */
    int32_t n_select; /* DECODE, QUERY_SPARSE: budget n (forced blocks included, <= M) */
    int32_t n_pick;   /* DECODE, QUERY_SPARSE: n minus the forced blocks (0 when n == M) */
    int32_t first_block;  /* global index of this context's block 0 (resa_seq_set_span) */
    int32_t local_blocks; /* DECODE, QUERY_SPARSE: blocks of this context the row may attend */
    int64_t row;      /* first row in q, k, v, out */
    int64_t start;    /* position of the first row (local: this context's positions) */
    int64_t end;      /* start + n; QUERY modes: the length (keys [0, end) are visible) */
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
    const int32_t *decode_ids;   /* [n_decode] indices of the sparse entries: DECODE and
                                    QUERY_SPARSE (the selection and the split-KV kernels) */
    int32_t n_decode;
    const int32_t *dense_ids;    /* [n_dense] indices of APPEND, RECTIFY and QUERY_DENSE
                                    entries */
    int32_t n_dense;
    int32_t n_query_dense;       /* QUERY_DENSE entries among them (no causal mask: every
                                    row sees [0, end); the mma.sync kernel serves them) */
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
    float *lse;                  /* [n_rows][hq] natural log-sum-exps of the rows that
                                    attend (resa_ctx_step_attend_ex), or NULL */
    const float *thr_scores;     /* [n_entries][hkv] thresholds of the two-phase selection
                                    (resa_ctx_step_thresholds), or NULL: each sparse entry */
    const int32_t *thr_blocks;   /* then takes its candidates ranking at or above them */
    int32_t *sel_counts;         /* [max_seqs][hkv] blocks chosen per (sparse entry, head),
                                    written by select_blocks, read by attention_sparse
                                    (resa_cuda_select_counts of ws_select) */
    /* Phase 1 (resa_ctx_step_block_scores; resa_cuda_block_scores only): the best
     * candidates' (score, global block) of each sparse entry and head at
     * [(entry * hkv + head) * cp_capacity + j], their number in cp_counts. */
    float *cp_scores;
    int32_t *cp_blocks;
    int32_t *cp_counts;
    int64_t cp_capacity;
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
/* select_blocks.cu: for every DECODE and QUERY_SPARSE entry and KV head:
 * pooled query, block scores, budget with forced blocks, top-n (or, with
 * a->thr_scores, every candidate ranking at or above the threshold); writes
 * the chosen local block indices (ascending) to the workspace, their number
 * to a->sel_counts and, when a->selection, the bitmap. */
cudaError_t resa_cuda_select_blocks(const resa_cuda_layer_args *a);
/* select_blocks.cu: phase 1 of the two-phase selection: the same scores and
 * top-K of this context's candidates, into a->cp_scores / cp_blocks /
 * cp_counts (counts of the sparse entries only; the caller zeroes the
 * others).  A plain launch (its inputs may come straight from the host's
 * kernels). */
cudaError_t resa_cuda_block_scores(const resa_cuda_layer_args *a);
/* select_blocks.cu: where ws_select keeps the per-(sparse entry, head) counts. */
int32_t *resa_cuda_select_counts(const resa_cuda_dims *dims, void *ws_select);
/* select_cp.cu: resa_ctx_step_thresholds: per (entry, head) the K-th best of
 * the gathered (score, block) lists (lib/cpu/block_scores.c's rule), one
 * plain launch on stream. */
cudaError_t resa_cuda_thresholds(const resa_dev_entry *entries, int32_t n_entries, int32_t hkv,
                                 int32_t n_ranks, int64_t capacity, const float *scores,
                                 const int32_t *blocks, const int32_t *counts, float *thr_scores,
                                 int32_t *thr_blocks, cudaStream_t stream);
/* attention_sparse.cu: split-KV attention of every DECODE and QUERY_SPARSE
 * entry over the blocks chosen by resa_cuda_select_blocks (same a->ws_select,
 * a->sel_counts), all g query heads of a group sharing each K/V load, then
 * the log-sum-exp combine. */
cudaError_t resa_cuda_attention_sparse(const resa_cuda_layer_args *a);
/* attention_dense.cu: dense attention of every APPEND and RECTIFY entry
 * (causal: row at position p sees [0, p]) and QUERY_DENSE entry (every row
 * sees [0, end)) on tensor cores; with a->lse, the rows' log-sum-exps. */
cudaError_t resa_cuda_attention_dense(const resa_cuda_layer_args *a);

/* merge_states.cu: resa_ctx_merge_states on device memory (lib/merge.c's
 * formula); dtype a resa_dtype, d <= 256. */
cudaError_t resa_cuda_merge_states(int32_t dtype, int32_t n_parts, int64_t n_rows, int32_t d,
                                   const void *parts_out, const float *parts_lse, void *out,
                                   float *lse, cudaStream_t stream);

/* Where select_blocks leaves its result for attention_sparse:
 * list of (decode index i, head h) at ws_select + sel_list_offset, length
 * sel_counts[i * hkv + h]. */
static inline int32_t *resa_cuda_sel_list(const resa_cuda_dims *dims, void *ws_select,
                                          int32_t decode_index, int32_t head)
{
    return (int32_t *)ws_select +
           ((size_t)decode_index * dims->hkv + head) * (size_t)dims->max_seq_blocks;
}

#endif
