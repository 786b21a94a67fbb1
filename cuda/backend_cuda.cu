// SPDX-License-Identifier: MIT
// The CUDA backend: device memory for the pool and workspaces, the upload of
// each step's metadata, and the per-layer launch sequence.  Built as its own
// shared module (libresa-cuda.so.<abi>) that libresa.so loads with dlopen,
// so it calls nothing of libresa.so: the ctx fields it needs are in
// lib/internal.h and it writes ctx->error itself.
//
// Asynchrony: step_attend only enqueues on the context's stream.  step_begin
// (step_prepare here) packs the step into a pinned buffer and enqueues one
// host-to-device copy; it waits on the host only when the pinned buffer it is
// about to reuse is still being copied from, i.e. when the GPU is more than
// two steps behind.  No allocation happens after the pool is created.
//
// Faults: every CUDA call is checked (TRY); a fault of enqueued kernels comes
// back from the next call that asks the runtime: step_end (cudaStreamQuery,
// no wait), synchronize, the next step_begin, a selection read.  A sticky
// error (sticky()) marks the context lost, and the core refuses every call
// but destroy and the queries from then on; destroy still frees what it can
// (the calls fail fast, none waits on a dead context).  docs/API.md, "After a
// device fault".
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <cuda_runtime.h>

#include "../lib/backend.h"
#include "common.cuh"
#include "kernels.h"

namespace {

struct cuda_state {
    int device, num_sms;
    cudaStream_t stream;
    resa_cuda_dims dims;
    void *k, *v, *kmin, *kmax;        // the pool, layer-major (lib/internal.h)
    float *kscale, *vscale;           // the fp8 cache's per-token scales, or NULL
    int8_t *kexp;                     // fp8 summaries' scale exponents, or NULL
    uint32_t *selection;              // RECORD_SELECTION bitmaps or NULL
    int32_t *page_tables;             // [max_seqs][max_seq_blocks]
    char *d_meta;                     // the step's metadata on the device
    char *h_meta[2];                  // pinned staging, used alternately
    cudaEvent_t meta_copied[2];
    int cur;
    size_t off_decode, off_dense, off_touched, off_deltas, meta_bytes;
    int32_t touched_cap, deltas_cap;
    void *ws_select, *ws_sparse, *ws_dense;
    resa_cuda_layer_args step;        // filled by step_prepare, per layer by step_attend
};

resa_status fail(resa_ctx *ctx, resa_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
    va_end(ap);
    return s;
}

// Maps a CUDA error to a status, naming the call that failed.
resa_status cuda_fail(resa_ctx *ctx, cudaError_t e, const char *what)
{
    resa_status s = RESA_ERR_BACKEND;
    if (e == cudaErrorMemoryAllocation) {
        s = RESA_ERR_DEVICE_OUT_OF_MEMORY;
        // Not sticky, and reported now: clear it, or the launch checks of the
        // next step (cudaGetLastError) would return it again.
        (void)cudaGetLastError();
    } else if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
        s = RESA_ERR_NO_DEVICE;
    return fail(ctx, s, "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

// The errors after which, as CUDA documents them, "the process is left in an
// inconsistent state and any further CUDA work will return the same error":
// a kernel's illegal or misaligned access, trap, assert or timeout (also one
// of work enqueued earlier, reported by a later call), an uncorrectable ECC or
// NVLink error, a terminated MPS client.  The CUDA context of the whole
// process is lost; only a new process can use the GPU again.
bool sticky(cudaError_t e)
{
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure:
    case cudaErrorTensorMemoryLeak:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContained:
    case cudaErrorMpsClientTerminated:
    case cudaErrorExternalDevice:
        return true;
    default:
        return false;
    }
}

// cuda_fail, and for a sticky error the context is marked lost (the core then
// refuses every call but destroy and the queries: lib/internal.h,
// resa_refuse_lost; docs/API.md, "After a device fault").
resa_status cuda_error(resa_ctx *ctx, cudaError_t e, const char *what)
{
    resa_status s = cuda_fail(ctx, e, what);
    if (sticky(e) && !ctx->device_lost) {
        ctx->device_lost = 1;
        snprintf(ctx->device_fault, sizeof ctx->device_fault, "%s: %s", what,
                 cudaGetErrorName(e));
        size_t n = strlen(ctx->error);
        snprintf(ctx->error + n, sizeof ctx->error - n,
                 "; a device fault (possibly of work enqueued earlier, such as a bad q, k, v "
                 "or out pointer): the CUDA context is lost, only resa_ctx_destroy and the "
                 "queries work now");
    }
    return s;
}

#define TRY(call, what)                                  \
    do {                                                 \
        cudaError_t e_ = (call);                         \
        if (e_ != cudaSuccess)                           \
            return cuda_error(ctx, e_, what);            \
    } while (0)

cuda_state *state(resa_ctx *ctx) { return (cuda_state *)ctx->impl; }

size_t kv_elems_per_layer(const resa_cuda_dims &D)
{
    return (size_t)D.n_pages * D.hkv * D.b * D.d;
}
// Bytes per K/V element: T's 2, or 1 for the fp8 cache.
size_t kv_elt(const resa_cuda_dims &D) { return D.kv_fp8 ? 1 : 2; }
// The fp8 cache's scales per layer: one float per (page, KV head, slot).
size_t scale_elems_per_layer(const resa_cuda_dims &D) { return (size_t)D.n_pages * D.hkv * D.b; }
size_t sum_elems_per_layer(const resa_cuda_dims &D)
{
    return (size_t)D.n_pages * D.hkv * D.d;
}
// Bytes per summary element: the KV dtype's 2, or 1 for fp8 summaries.
size_t sum_elt(const resa_cuda_dims &D) { return D.sum_fp8 ? 1 : 2; }
// fp8 summaries' scale exponents per layer: one byte per (page, KV head).
size_t exp_elems_per_layer(const resa_cuda_dims &D) { return (size_t)D.n_pages * D.hkv; }

__global__ void scatter_pages(int32_t *tables, const int32_t *pairs, int32_t n)
{
    int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        tables[pairs[2 * i]] = pairs[2 * i + 1];
}

int32_t cuda_available(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

resa_status cuda_ctx_init(resa_ctx *ctx)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
        return RESA_ERR_NO_DEVICE; // creation failures return only a status
    cuda_state *st = (cuda_state *)ctx->alloc.alloc(ctx->alloc.user, sizeof(cuda_state), 64);
    if (!st)
        return RESA_ERR_OUT_OF_MEMORY;
    memset(st, 0, sizeof *st);
    if (cudaGetDevice(&st->device) != cudaSuccess ||
        cudaDeviceGetAttribute(&st->num_sms, cudaDevAttrMultiProcessorCount, st->device) !=
            cudaSuccess) {
        ctx->alloc.free(ctx->alloc.user, st);
        return RESA_ERR_NO_DEVICE;
    }
    ctx->impl = st;
    return RESA_OK;
}

void cuda_ctx_fini(resa_ctx *ctx)
{
    ctx->alloc.free(ctx->alloc.user, ctx->impl);
    ctx->impl = NULL;
}

resa_status cuda_check_config(resa_ctx *ctx, const resa_layout *lo)
{
    if ((lo->io_dtype != RESA_DTYPE_F16 && lo->io_dtype != RESA_DTYPE_BF16) ||
        (lo->kv_dtype != lo->io_dtype && lo->kv_dtype != RESA_DTYPE_FP8_E4M3))
        return fail(ctx, RESA_ERR_NOT_SUPPORTED,
                    "lock: the CUDA backend needs RESA_PARAM_IO_DTYPE RESA_DTYPE_F16 or "
                    "RESA_DTYPE_BF16 and RESA_PARAM_KV_DTYPE equal to it or "
                    "RESA_DTYPE_FP8_E4M3");
    if (lo->d != 64 && lo->d != 128 && lo->d != 256)
        return fail(ctx, RESA_ERR_NOT_SUPPORTED,
                    "lock: the CUDA backend supports RESA_PARAM_HEAD_DIM 64, 128 and 256, not %d",
                    lo->d);
    if (lo->b < 8 || lo->b > 64)
        return fail(ctx, RESA_ERR_NOT_SUPPORTED,
                    "lock: the CUDA backend supports RESA_PARAM_BLOCK_SIZE 8 to 64, not %d", lo->b);
    if ((int64_t)lo->max_seq_blocks * lo->b >= ((int64_t)1 << 31))
        return fail(ctx, RESA_ERR_NOT_SUPPORTED,
                    "lock: the CUDA kernels index positions with 32 bits; "
                    "RESA_PARAM_MAX_SEQ_TOKENS must stay below 2^31");
    if (lo->group > 16)
        return fail(ctx, RESA_ERR_NOT_SUPPORTED,
                    "lock: the CUDA backend supports groups of up to 16 query heads per KV head, "
                    "not %d", lo->group);
    return RESA_OK;
}

void cuda_pool_destroy(resa_ctx *ctx)
{
    cuda_state *st = state(ctx);
    if (!st)
        return;
    cudaStreamSynchronize(st->stream); // nothing may still read what we free
    void *dev[] = {st->k, st->v, st->kmin, st->kmax, st->kexp, st->kscale, st->vscale,
                   st->selection, st->page_tables, st->d_meta, st->ws_select, st->ws_sparse,
                   st->ws_dense};
    for (void *p : dev)
        if (p)
            cudaFree(p);
    for (int i = 0; i < 2; i++) {
        if (st->h_meta[i])
            cudaFreeHost(st->h_meta[i]);
        if (st->meta_copied[i])
            cudaEventDestroy(st->meta_copied[i]);
    }
    cudaStream_t stream = st->stream;
    int device = st->device, sms = st->num_sms;
    memset(st, 0, sizeof *st);
    st->stream = stream;
    st->device = device;
    st->num_sms = sms;
}

size_t align_up(size_t x) { return (x + 255) & ~(size_t)255; }

resa_status cuda_pool_create(resa_ctx *ctx)
{
    cuda_state *st = state(ctx);
    const resa_layout *lo = &ctx->lo;
    resa_cuda_dims &D = st->dims;
    D.n_layers = lo->n_layers;
    D.hq = lo->hq;
    D.hkv = lo->hkv;
    D.group = lo->group;
    D.d = lo->d;
    D.b = lo->b;
    D.log2_b = lo->log2_b;
    D.n_pages = lo->n_pages;
    D.max_seqs = lo->max_seqs;
    D.max_seq_blocks = lo->max_seq_blocks;
    D.sel_words = lo->sel_words;
    D.kv_dtype = lo->kv_dtype;
    D.io_dtype = lo->io_dtype;
    D.kv_fp8 = lo->kv_fp8;
    D.sum_fp8 = lo->sum_fp8;
    D.max_step_tokens = lo->max_step_tokens;
    D.num_sms = st->num_sms;

    const size_t kv = kv_elems_per_layer(D) * D.n_layers * kv_elt(D);
    const size_t sum = sum_elems_per_layer(D) * D.n_layers * sum_elt(D);
    TRY(cudaMalloc(&st->k, kv), "lock: cudaMalloc(K pool)");
    TRY(cudaMalloc(&st->v, kv), "lock: cudaMalloc(V pool)");
    if (D.kv_fp8) {
        // zeroed: a never-written slot reads back as 0 * 0, never NaN (the
        // kernels mask such positions anyway)
        const size_t sb = scale_elems_per_layer(D) * D.n_layers * sizeof(float);
        TRY(cudaMalloc(&st->kscale, sb), "lock: cudaMalloc(K scales)");
        TRY(cudaMalloc(&st->vscale, sb), "lock: cudaMalloc(V scales)");
        TRY(cudaMemset(st->kscale, 0, sb), "lock: cudaMemset(K scales)");
        TRY(cudaMemset(st->vscale, 0, sb), "lock: cudaMemset(V scales)");
    }
    TRY(cudaMalloc(&st->kmin, sum), "lock: cudaMalloc(summaries)");
    TRY(cudaMalloc(&st->kmax, sum), "lock: cudaMalloc(summaries)");
    if (D.sum_fp8)
        TRY(cudaMalloc(&st->kexp, exp_elems_per_layer(D) * D.n_layers),
            "lock: cudaMalloc(summary scales)");
    if (ctx->cfg.record_selection) {
        size_t bytes = (size_t)D.max_seqs * D.n_layers * D.hkv * D.sel_words * sizeof(uint32_t);
        TRY(cudaMalloc(&st->selection, bytes), "lock: cudaMalloc(selection record)");
        TRY(cudaMemset(st->selection, 0, bytes), "lock: cudaMemset(selection record)");
    }
    TRY(cudaMalloc(&st->page_tables, sizeof(int32_t) * D.max_seqs * D.max_seq_blocks),
        "lock: cudaMalloc(page tables)");

    // metadata: entries | decode ids | dense ids | touched pairs | page-table deltas
    st->touched_cap = (int32_t)(D.max_step_tokens / D.b + 2 * D.max_seqs + 1);
    st->deltas_cap = D.max_seqs * D.max_seq_blocks;
    st->off_decode = align_up(sizeof(resa_dev_entry) * D.max_seqs);
    st->off_dense = st->off_decode + align_up(sizeof(int32_t) * D.max_seqs);
    st->off_touched = st->off_dense + align_up(sizeof(int32_t) * D.max_seqs);
    st->off_deltas = st->off_touched + align_up(sizeof(int32_t) * 2 * st->touched_cap);
    st->meta_bytes = st->off_deltas + sizeof(int32_t) * 2 * (size_t)st->deltas_cap;
    TRY(cudaMalloc(&st->d_meta, st->meta_bytes), "lock: cudaMalloc(step metadata)");
    for (int i = 0; i < 2; i++) {
        TRY(cudaHostAlloc(&st->h_meta[i], st->meta_bytes, cudaHostAllocDefault),
            "lock: cudaHostAlloc(step staging)");
        TRY(cudaEventCreateWithFlags(&st->meta_copied[i], cudaEventDisableTiming),
            "lock: cudaEventCreate");
    }
    size_t ws[3] = {resa_cuda_select_workspace(&D), resa_cuda_sparse_workspace(&D),
                    resa_cuda_dense_workspace(&D)};
    void **wp[3] = {&st->ws_select, &st->ws_sparse, &st->ws_dense};
    for (int i = 0; i < 3; i++)
        if (ws[i])
            TRY(cudaMalloc(wp[i], ws[i]), "lock: cudaMalloc(workspace)");
    // The pool starts zeroed: a page's unwritten slots are never attended, but
    // whole pages are copied (fork, copy-on-write) and padded tiles may be
    // loaded before masking; zeroing once makes every byte the kernels and
    // copies touch defined (compute-sanitizer's initcheck), at one memset per
    // buffer at lock (~the pool's bytes at memset bandwidth), never in a step.
    // resa_cuda_select_init below synchronizes the stream.
    TRY(cudaMemsetAsync(st->k, 0, kv, st->stream), "lock: cudaMemset(K pool)");
    TRY(cudaMemsetAsync(st->v, 0, kv, st->stream), "lock: cudaMemset(V pool)");
    TRY(cudaMemsetAsync(st->kmin, 0, sum, st->stream), "lock: cudaMemset(summaries)");
    TRY(cudaMemsetAsync(st->kmax, 0, sum, st->stream), "lock: cudaMemset(summaries)");
    if (st->kexp)
        TRY(cudaMemsetAsync(st->kexp, 0, exp_elems_per_layer(D) * D.n_layers, st->stream),
            "lock: cudaMemset(summary scales)");
    TRY(resa_cuda_select_init(&D, st->ws_select, st->stream), "lock: resa_cuda_select_init");
    return RESA_OK;
}

resa_status cuda_set_stream(resa_ctx *ctx, void *stream)
{
    state(ctx)->stream = (cudaStream_t)stream;
    return RESA_OK;
}

resa_status cuda_synchronize(resa_ctx *ctx)
{
    TRY(cudaStreamSynchronize(state(ctx)->stream), "synchronize: cudaStreamSynchronize");
    TRY(cudaGetLastError(), "synchronize: deferred device error");
    return RESA_OK;
}

// Clears the calling thread's last CUDA error when it is `e`, which this
// module just caused and handled, so that the launch checks
// (cudaGetLastError) of the next step do not see it.
void clear_last_error(cudaError_t e)
{
    if (cudaPeekAtLastError() == e)
        (void)cudaGetLastError();
}

// resa_ctx_step_end: a fault that enqueued work already hit comes back now,
// without waiting for the work still running (cudaStreamQuery).  Not while
// the stream is being captured (a query would end the capture; the
// captured work runs later, at the graph's launch), nor when the legacy
// stream cannot be asked because another stream is capturing.
resa_status cuda_check(resa_ctx *ctx)
{
    cuda_state *st = state(ctx);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaError_t e = cudaStreamIsCapturing(st->stream, &capture);
    if (e == cudaErrorStreamCaptureImplicit) {
        clear_last_error(e);
        return RESA_OK;
    }
    TRY(e, "step_end: cudaStreamIsCapturing");
    if (capture != cudaStreamCaptureStatusNone)
        return RESA_OK;
    e = cudaStreamQuery(st->stream);
    if (e == cudaErrorNotReady) { // work still running: not an error
        clear_last_error(e);
        return RESA_OK;
    }
    TRY(e, "step_end: cudaStreamQuery");
    return RESA_OK;
}

resa_status cuda_copy_pages(resa_ctx *ctx, int32_t n, const int32_t *dst, const int32_t *src)
{
    cuda_state *st = state(ctx);
    const resa_cuda_dims &D = st->dims;
    const size_t kv_page = (size_t)D.hkv * D.b * D.d * kv_elt(D);
    const size_t sum_page = (size_t)D.hkv * D.d * sum_elt(D), exp_page = (size_t)D.hkv;
    const size_t scale_page = (size_t)D.hkv * D.b * sizeof(float);
    // every per-page array: K, V, summaries, and where present the fp8
    // summaries' exponents and the fp8 cache's scales (they travel with
    // their page: copy-on-write and fork copies are plain page copies)
    char *bases[7] = {(char *)st->k, (char *)st->v, (char *)st->kmin, (char *)st->kmax,
                      (char *)st->kexp, (char *)st->kscale, (char *)st->vscale};
    const size_t page_bytes[7] = {kv_page, kv_page, sum_page, sum_page, exp_page, scale_page,
                                  scale_page};
    for (int32_t i = 0; i < n; i++)
        for (int32_t l = 0; l < D.n_layers; l++) {
            size_t to = ((size_t)l * D.n_pages + dst[i]), from = ((size_t)l * D.n_pages + src[i]);
            for (int a = 0; a < 7; a++) {
                if (!bases[a])
                    continue;
                const size_t bytes = page_bytes[a];
                TRY(cudaMemcpyAsync(bases[a] + to * bytes, bases[a] + from * bytes, bytes,
                                    cudaMemcpyDeviceToDevice, st->stream),
                    "copy_pages: cudaMemcpyAsync");
            }
        }
    return RESA_OK;
}

resa_status cuda_refresh_summaries(resa_ctx *ctx, const int32_t *pages, int64_t lo, int64_t hi,
                                   int64_t valid)
{
    cuda_state *st = state(ctx);
    // pages points into the host page tables; the device holds the same row
    const size_t slot = (size_t)(pages - ctx->page_tables) / ctx->lo.max_seq_blocks;
    TRY(resa_cuda_refresh_summaries(&st->dims, st->k, st->kscale, st->kmin, st->kmax, st->kexp,
                                    st->page_tables + slot * st->dims.max_seq_blocks, lo, hi,
                                    valid, st->stream),
        "resa_cuda_refresh_summaries");
    return RESA_OK;
}

resa_status cuda_clear_selection(resa_ctx *ctx, int32_t slot)
{
    cuda_state *st = state(ctx);
    if (!st->selection)
        return RESA_OK;
    const resa_cuda_dims &D = st->dims;
    size_t words = (size_t)D.n_layers * D.hkv * D.sel_words;
    TRY(cudaMemsetAsync(st->selection + (size_t)slot * words, 0, words * sizeof(uint32_t),
                        st->stream),
        "clear_selection: cudaMemsetAsync");
    return RESA_OK;
}

resa_status cuda_read_selection(resa_ctx *ctx, int32_t slot, int32_t layer, int32_t head,
                                uint32_t *bits)
{
    cuda_state *st = state(ctx);
    const resa_cuda_dims &D = st->dims;
    size_t at = (((size_t)slot * D.n_layers + layer) * D.hkv + head) * D.sel_words;
    TRY(cudaStreamSynchronize(st->stream), "seq_selected_blocks: cudaStreamSynchronize");
    TRY(cudaMemcpy(bits, st->selection + at, sizeof(uint32_t) * D.sel_words,
                   cudaMemcpyDeviceToHost),
        "seq_selected_blocks: cudaMemcpy");
    return RESA_OK;
}

resa_status cuda_step_prepare(resa_ctx *ctx, const resa_step *step)
{
    cuda_state *st = state(ctx);
    const resa_cuda_dims &D = st->dims;
    const int cur = st->cur ^ 1;
    // The buffer was last handed to a copy two steps ago; normally long done.
    TRY(cudaEventSynchronize(st->meta_copied[cur]), "step_begin: cudaEventSynchronize");
    char *h = st->h_meta[cur];
    resa_dev_entry *ent = (resa_dev_entry *)h;
    int32_t *decode = (int32_t *)(h + st->off_decode);
    int32_t *dense = (int32_t *)(h + st->off_dense);
    int32_t *touched = (int32_t *)(h + st->off_touched);
    int32_t *deltas = (int32_t *)(h + st->off_deltas);
    int32_t n_decode = 0, n_dense = 0, n_touched = 0, n_deltas = 0;
    int32_t n_query_dense = 0;
    for (int32_t i = 0; i < step->n_entries; i++) {
        const resa_step_entry *e = &step->entries[i];
        resa_dev_entry &d = ent[i];
        d.slot = e->slot;
        d.mode = e->mode;
        d.n = e->n;
        d.n_blocks = e->n_blocks;
        d.n_select = e->n_select;
        d.n_pick = e->n_pick;
        d.first_block = e->first_block;
        d.local_blocks = e->local_blocks;
        d.row = e->row;
        d.start = e->start;
        d.end = e->end;
        d.valid = e->valid;
        // sparse entries (DECODE, QUERY_SPARSE): selection and split-KV decode;
        // dense ones (APPEND, RECTIFY, QUERY_DENSE): the dense kernels
        if (resa_mode_sparse(e->mode))
            decode[n_decode++] = i;
        else if (resa_mode_dense(e->mode))
            dense[n_dense++] = i;
        n_query_dense += e->mode == RESA_MODE_QUERY_DENSE;
        // QUERY entries write no key, so no summary changes (their page
        // tables are still synced below: their kernels read them)
        for (int64_t blk = e->start >> D.log2_b;
             resa_mode_stores(e->mode) && blk <= (e->end - 1) >> D.log2_b; blk++) {
            touched[2 * n_touched] = i;
            touched[2 * n_touched + 1] = (int32_t)blk;
            n_touched++;
        }
        resa_seq *q = &ctx->seqs[e->slot];
        for (int32_t p = q->dev_synced; p < q->n_pages; p++) {
            deltas[2 * n_deltas] = e->slot * D.max_seq_blocks + p;
            deltas[2 * n_deltas + 1] = q->pages[p];
            n_deltas++;
        }
    }
    if (n_touched > st->touched_cap || n_deltas > st->deltas_cap)
        return fail(ctx, RESA_ERR_INTERNAL, "step_begin: CUDA step metadata overflow");
    size_t bytes = st->off_deltas + sizeof(int32_t) * 2 * (size_t)n_deltas;
    TRY(cudaMemcpyAsync(st->d_meta, h, bytes, cudaMemcpyHostToDevice, st->stream),
        "step_begin: cudaMemcpyAsync(metadata)");
    TRY(cudaEventRecord(st->meta_copied[cur], st->stream), "step_begin: cudaEventRecord");
    if (n_deltas > 0) {
        scatter_pages<<<(n_deltas + 255) / 256, 256, 0, st->stream>>>(
            st->page_tables, (const int32_t *)(st->d_meta + st->off_deltas), n_deltas);
        TRY(cudaGetLastError(), "step_begin: scatter_pages");
    }
    for (int32_t i = 0; i < step->n_entries; i++) {
        resa_seq *q = &ctx->seqs[step->entries[i].slot];
        q->dev_synced = q->n_pages;
    }
    st->cur = cur;

    resa_cuda_layer_args &a = st->step;
    memset(&a, 0, sizeof a);
    a.dims = D;
    a.page_tables = st->page_tables;
    a.entries = (const resa_dev_entry *)st->d_meta;
    a.n_entries = step->n_entries;
    a.decode_ids = (const int32_t *)(st->d_meta + st->off_decode);
    a.n_decode = n_decode;
    a.dense_ids = (const int32_t *)(st->d_meta + st->off_dense);
    a.n_dense = n_dense;
    a.n_query_dense = n_query_dense;
    a.sel_counts = resa_cuda_select_counts(&D, st->ws_select);
    a.touched = (const int32_t *)(st->d_meta + st->off_touched);
    a.n_touched = n_touched;
    a.n_rows = step->n_rows;
    a.scale = step->scale;
    a.score_width = step->score_width;
    a.group_score = step->group_score;
    a.local_blocks = step->local_blocks;
    a.sink_blocks = step->sink_blocks;
    a.ws_select = st->ws_select;
    a.ws_sparse = st->ws_sparse;
    a.ws_dense = st->ws_dense;
    a.stream = st->stream;
    return RESA_OK;
}

// The prepared step's arguments with the pool pointers of `layer`.
resa_cuda_layer_args layer_args(cuda_state *st, int32_t layer)
{
    const resa_cuda_dims &D = st->dims;
    resa_cuda_layer_args a = st->step;
    const size_t kv_off = kv_elems_per_layer(D) * layer * kv_elt(D);
    const size_t sum_off = sum_elems_per_layer(D) * layer * sum_elt(D);
    a.layer = layer;
    a.k = (char *)st->k + kv_off;
    a.v = (char *)st->v + kv_off;
    a.kscale = st->kscale ? st->kscale + scale_elems_per_layer(D) * layer : NULL;
    a.vscale = st->vscale ? st->vscale + scale_elems_per_layer(D) * layer : NULL;
    a.kmin = (char *)st->kmin + sum_off;
    a.kmax = (char *)st->kmax + sum_off;
    a.kexp = st->kexp ? st->kexp + exp_elems_per_layer(D) * layer : NULL;
    a.selection = st->selection ? st->selection + (size_t)layer * D.hkv * D.sel_words : NULL;
    a.stream = st->stream;
    return a;
}

resa_status cuda_step_attend(resa_ctx *ctx, const resa_step *step, int32_t layer, const void *q,
                             const void *k, const void *v, void *out, const resa_attend_extra *x)
{
    cuda_state *st = state(ctx);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    TRY(cudaStreamIsCapturing(st->stream, &capture), "step_attend: cudaStreamIsCapturing");
    if (capture == cudaStreamCaptureStatusActive)
    {
        // later steps of this shape may replay the graph (lib/step.c); the
        // module writes the ring itself: it cannot call libresa's internals
        bool known = false;
        for (int i = 0; i < RESA_CAPTURED_SHAPES; i++)
            known |= ctx->captured[i] == step->shape;
        if (!known) {
            ctx->captured[ctx->captured_next] = step->shape;
            ctx->captured_next = (ctx->captured_next + 1) % RESA_CAPTURED_SHAPES;
        }
    }
    resa_cuda_layer_args a = layer_args(st, layer);
    a.q = q;
    a.k_in = k;
    a.v_in = v;
    a.out = out;
    a.lse = x->lse;
    a.thr_scores = x->threshold_scores;
    a.thr_blocks = x->threshold_blocks;
    // The first kernel (kv_write's, a plain launch) always runs, also for a
    // step of QUERY entries only (its warps store nothing then): the
    // selection is a programmatic dependent and reads q before its
    // griddepcontrol.wait, which is safe only behind a kernel of ours.
    TRY(resa_cuda_kv_write(&a), "step_attend: resa_cuda_kv_write");
    if (a.n_decode > 0) {
        TRY(resa_cuda_select_blocks(&a), "step_attend: resa_cuda_select_blocks");
        TRY(resa_cuda_attention_sparse(&a), "step_attend: resa_cuda_attention_sparse");
    }
    if (a.n_dense > 0)
        TRY(resa_cuda_attention_dense(&a), "step_attend: resa_cuda_attention_dense");
    return RESA_OK;
}


// Phase 1 of the two-phase selection (docs/API.md, "Context parallelism"):
// the counts of the entries that are not sparse are zeroed (one memset, only
// when the step has such entries), then the selection kernel runs in its
// export mode (select_blocks.cu, resa_cuda_block_scores) on this layer's
// summaries.  Device pointers, only enqueued, no allocation.
resa_status cuda_block_scores(resa_ctx *ctx, const resa_step *step, int32_t layer, const void *q,
                              int64_t capacity, float *scores, int32_t *blocks, int32_t *counts)
{
    cuda_state *st = state(ctx);
    resa_cuda_layer_args a = layer_args(st, layer);
    if (step->n_sparse < step->n_entries)
        TRY(cudaMemsetAsync(counts, 0, sizeof(int32_t) * (size_t)step->n_entries * st->dims.hkv,
                            st->stream),
            "step_block_scores: cudaMemsetAsync(counts)");
    if (a.n_decode == 0)
        return RESA_OK;
    a.q = q;
    a.selection = NULL; // phase 1 records nothing
    a.cp_scores = scores;
    a.cp_blocks = blocks;
    a.cp_counts = counts;
    a.cp_capacity = capacity;
    TRY(resa_cuda_block_scores(&a), "step_block_scores: resa_cuda_block_scores");
    return RESA_OK;
}

// The thresholds from the gathered lists: one kernel (select_cp.cu) that
// reads the step's entries (n_pick, mode) from the uploaded metadata.
resa_status cuda_thresholds(resa_ctx *ctx, const resa_step *step, int32_t n_ranks,
                            int64_t capacity, const float *scores, const int32_t *blocks,
                            const int32_t *counts, float *thr_scores, int32_t *thr_blocks)
{
    cuda_state *st = state(ctx);
    TRY(resa_cuda_thresholds(st->step.entries, step->n_entries, st->dims.hkv, n_ranks, capacity,
                             scores, blocks, counts, thr_scores, thr_blocks, st->stream),
        "step_thresholds: resa_cuda_thresholds");
    return RESA_OK;
}

resa_status cuda_merge_states(resa_ctx *ctx, int32_t n_parts, int64_t n_rows,
                              const void *parts_out, const float *parts_lse, void *out,
                              float *lse)
{
    TRY(resa_cuda_merge_states((int32_t)ctx->cfg.io_dtype, n_parts, n_rows,
                               (int32_t)ctx->cfg.head_dim, parts_out, parts_lse, out, lse,
                               state(ctx)->stream),
        "merge_states: resa_cuda_merge_states");
    return RESA_OK;
}

const resa_backend_ops cuda_ops = {
    RESA_BACKEND_API_VERSION,
    "cuda",
    cuda_available,
    cuda_ctx_init,
    cuda_ctx_fini,
    cuda_check_config,
    cuda_pool_create,
    cuda_pool_destroy,
    cuda_set_stream,
    cuda_synchronize,
    cuda_copy_pages,
    cuda_refresh_summaries,
    cuda_clear_selection,
    cuda_step_prepare,
    cuda_step_attend,
    cuda_read_selection,
    cuda_check,
    cuda_block_scores,
    cuda_thresholds,
    cuda_merge_states,
};

} // namespace

extern "C" __attribute__((visibility("default"))) const resa_backend_ops *
resa_backend_module_entry(uint32_t api_version)
{
    return api_version == RESA_BACKEND_API_VERSION ? &cuda_ops : NULL;
}
