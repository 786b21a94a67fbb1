// SPDX-License-Identifier: MIT
// K/V write into the paged pool and the block min/max summaries.
// CPU twin: lib/cpu/kv_write.c.
//
// Two launches per layer: the rows (one warp per (row, KV head), 16-byte
// copies), then the summaries of every touched block recomputed over its
// valid positions (one warp per (block, head)), exactly as the CPU does: a
// block's summary is min/max of the stored keys, so it is exact in the KV
// dtype (or rounded outward to fp8, RESA_SUMMARY_FP8_E4M3) and rectification
// and cancellation need no special case.
//
// The fp8 cache (F8, lib/kv_fp8.h): a warp quantizes its (row, head) with the
// CPU's own codec (amax by a NaN-sticky warp reduction, the scale, each byte),
// so both backends store the same bytes and scales; the summaries are the
// min/max of the values the bytes read back as (T(e4m3 * scale)), exact in T.
#include <float.h>

#include "common.cuh"
#include "kv_fp8.h"
#include "summary_fp8.h"

namespace {

using namespace resa;

// The (row, KV head) a warp of a write kernel stores: where it goes.
struct row_slot {
    const resa_dev_entry *e;
    int64_t pos;  // position of the row in its sequence
    size_t s;     // summary offset of (page, head): the K/V block starts at s * b
};

// amax of one head vector over a warp (each lane's part in `amax`), NaN-sticky
// like resa_fp8_amax: the result is the same in every lane and in any order.
__device__ __forceinline__ float warp_amax(float amax)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float b = __shfl_xor_sync(0xffffffffu, amax, o);
        amax = amax != amax ? amax : b != b ? b : fmaxf(amax, b);
    }
    return amax;
}

// Quantizes one head vector (d T values at src) into d bytes at dst and its
// scale at *scale, by the lanes of one warp (lane l: elements [l per, l per + per)).
template <typename T>
__device__ __forceinline__ void quantize_row(const T *src, uint8_t *dst, float *scale, int d,
                                             int lane)
{
    const int per = d / 32; // d in {64, 128, 256}
    float x[8];
    float amax = 0.0f;
    for (int i = 0; i < per; i++) {
        x[i] = to_f32(src[lane * per + i]);
        amax = resa_fp8_amax(amax, x[i]);
    }
    const float s = resa_fp8_scale(warp_amax(amax));
    for (int i = 0; i < per; i++)
        dst[lane * per + i] = resa_fp8_quantize(x[i], s);
    if (lane == 0)
        *scale = s;
}

// Stores K and V of one (row, KV head) into its page with 16-byte copies by
// the lanes of one warp (F8: quantized, with their scales); false for a warp
// past the last item or on a row of a QUERY entry, which stores nothing (its
// k and v rows are not read: they may not exist) (warp-uniform).
template <typename T, bool F8>
__device__ __forceinline__ bool store_row(const resa_cuda_layer_args &a, row_slot *out)
{
    const int warps = blockDim.x / 32;
    const int64_t item = (int64_t)blockIdx.x * warps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const resa_cuda_dims &D = a.dims;
    if (item >= a.n_rows * D.hkv)
        return false;
    const int64_t row = item / D.hkv;
    const int head = (int)(item % D.hkv);
    const resa_dev_entry &e = a.entries[entry_of_row(a.entries, a.n_entries, row)];
    if (e.mode == RESA_MODE_QUERY_DENSE || e.mode == RESA_MODE_QUERY_SPARSE)
        return false;
    const int64_t pos = e.start + (row - e.row);
    const int32_t page = a.page_tables[(size_t)e.slot * D.max_seq_blocks + (pos >> D.log2_b)];
    const size_t s = ((size_t)page * D.hkv + head) * D.d;
    const size_t dst = s * D.b + (size_t)(pos & (D.b - 1)) * D.d;
    const size_t src = ((size_t)row * D.hkv + head) * D.d;
    if constexpr (F8) {
        const size_t sc = (s / D.d) * D.b + (size_t)(pos & (D.b - 1)); // the token's scale
        quantize_row<T>((const T *)a.k_in + src, (uint8_t *)a.k + dst, a.kscale + sc, D.d, lane);
        quantize_row<T>((const T *)a.v_in + src, (uint8_t *)a.v + dst, a.vscale + sc, D.d, lane);
        *out = row_slot{&e, pos, s};
        return true;
    }
    const int chunks = D.d * (int)sizeof(T) / 16; // d is a multiple of 8
    for (int c = lane; c < 2 * chunks; c += 32) {
        const bool is_v = c >= chunks;
        const int cc = is_v ? c - chunks : c;
        const uint4 *from = (const uint4 *)((const T *)(is_v ? a.v_in : a.k_in) + src) + cc;
        uint4 *to = (uint4 *)((T *)(is_v ? a.v : a.k) + dst) + cc;
        *to = *from;
    }
    *out = row_slot{&e, pos, s};
    return true;
}

template <typename T, bool F8>
__global__ void write_rows(resa_cuda_layer_args a)
{
    pdl_trigger(); // the summaries kernel may launch; it waits for our writes
    row_slot r;
    store_row<T, F8>(a, &r);
}

// min/max of the valid keys of one block of one head.  Called by a whole
// warp.  Lane l reads 16-byte chunk l % C (8 dimensions; C = d / 8 chunks a
// row, d in {64, 128, 256}) of rows l / C, l / C + 32 / C, ..., up to 8 of
// them in flight at once, and the lanes holding the same chunk then combine
// by shuffles: a block of 16 rows costs about one memory latency.  (A loop
// over the rows per dimension paid one latency per 8 rows per dimension
// group: the decode step's write kernel took ~13 us a layer at 8 x 256K,
// docs/performance.md, e2e v7.)  The summary at element offset s of the
// layer is stored exactly in T, or (fp8) rounded outward with the block's
// scale exponent, by the same codec as the CPU (lib/summary_fp8.h).
// F8: k holds e4m3 bytes (8 bytes a chunk) and kscale their tokens' scales;
// the keys are the values they read back as (fp8x8_read), as everywhere.
template <typename T, bool F8>
__device__ void summarize_block(const resa_cuda_dims &D, const void *k, const float *kscale,
                                void *kmin, void *kmax, int8_t *kexp, size_t s, int n_valid)
{
    static_assert(sizeof(T) == 2, "16-bit keys: 8 dimensions a 16-byte chunk");
    const int lane = threadIdx.x % 32;
    const int C = D.d / 8, c = lane % C, RP = 32 / C;
    // plain loads: this warp may have just stored one of these rows
    const uint4 *rows = reinterpret_cast<const uint4 *>((const T *)k + s * D.b) + c;
    const uint2 *rows8 = reinterpret_cast<const uint2 *>((const uint8_t *)k + s * D.b) + c;
    const float *scales = F8 ? kscale + (s / D.d) * D.b : nullptr;
    float mn[8], mx[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        mn[i] = FLT_MAX;
        mx[i] = -FLT_MAX;
    }
    for (int t0 = lane / C; t0 < n_valid; t0 += 8 * RP) {
        uint4 v[8];
        if constexpr (F8) {
            uint2 raw[8];
            float sc[8];
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (t0 + u * RP < n_valid) {
                    raw[u] = rows8[(size_t)(t0 + u * RP) * C];
                    sc[u] = scales[t0 + u * RP];
                }
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (t0 + u * RP < n_valid)
                    v[u] = fp8x8_read<T>(raw[u], sc[u]);
        } else {
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (t0 + u * RP < n_valid)
                    v[u] = rows[(size_t)(t0 + u * RP) * C];
        }
#pragma unroll
        for (int u = 0; u < 8; u++)
            if (t0 + u * RP < n_valid) {
                const T *x = reinterpret_cast<const T *>(&v[u]);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    mn[i] = fminf(mn[i], to_f32(x[i]));
                    mx[i] = fmaxf(mx[i], to_f32(x[i]));
                }
            }
    }
    for (int o = C; o < 32; o <<= 1)
#pragma unroll
        for (int i = 0; i < 8; i++) {
            mn[i] = fminf(mn[i], __shfl_xor_sync(0xffffffffu, mn[i], o));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], o));
        }
    // every lane now holds its chunk's result; lanes < C store it
    const size_t at = s + 8 * (size_t)c;
    if (!D.sum_fp8) {
        if (lane < C) {
            uint4 qn, qx;
            T *pn = reinterpret_cast<T *>(&qn), *px = reinterpret_cast<T *>(&qx);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                pn[i] = from_f32<T>(mn[i]); // exact: stored values
                px[i] = from_f32<T>(mx[i]);
            }
            *reinterpret_cast<uint4 *>((T *)kmin + at) = qn;
            *reinterpret_cast<uint4 *>((T *)kmax + at) = qx;
        }
        return;
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++)
        amax = fmaxf(amax, fmaxf(fabsf(mn[i]), fabsf(mx[i])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const int e = resa_fp8_scale_exp(amax);
    if (lane < C) {
        uint2 qn, qx;
        uint8_t *pn = reinterpret_cast<uint8_t *>(&qn), *px = reinterpret_cast<uint8_t *>(&qx);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            pn[i] = resa_e4m3_round(mn[i], e, 0);
            px[i] = resa_e4m3_round(mx[i], e, 1);
        }
        *reinterpret_cast<uint2 *>((uint8_t *)kmin + at) = qn;
        *reinterpret_cast<uint2 *>((uint8_t *)kmax + at) = qx;
    }
    if (lane == 0)
        kexp[s / D.d] = (int8_t)e;
}

template <typename T, bool F8>
__global__ void summarize_touched(resa_cuda_layer_args a)
{
    pdl_wait(); // write_rows' rows
    pdl_trigger();
    const int warps = blockDim.x / 32;
    const int64_t item = (int64_t)blockIdx.x * warps + threadIdx.x / 32;
    const resa_cuda_dims &D = a.dims;
    if (item >= (int64_t)a.n_touched * D.hkv)
        return;
    const int t = (int)(item / D.hkv), head = (int)(item % D.hkv);
    const resa_dev_entry &e = a.entries[a.touched[2 * t]];
    const int32_t blk = a.touched[2 * t + 1];
    const int32_t page = a.page_tables[(size_t)e.slot * D.max_seq_blocks + blk];
    const int64_t first = (int64_t)blk << D.log2_b;
    const int n_valid = (int)min((int64_t)D.b, e.valid - first);
    const size_t s = ((size_t)page * D.hkv + head) * D.d;
    summarize_block<T, F8>(D, a.k, a.kscale, a.kmin, a.kmax, a.kexp, s, n_valid);
}

// Decode-only steps (every entry one DECODE row): one warp per (row, head)
// stores the row, then recomputes the summary of the block holding it (the
// only block that row touches), so one launch does both.
template <typename T, bool F8>
__global__ void write_decode(resa_cuda_layer_args a)
{
    pdl_trigger(); // select_blocks may launch; it waits for our writes
    row_slot r;
    if (!store_row<T, F8>(a, &r))
        return;
    __syncwarp(); // the row's K (and scale) is visible to every lane of the warp
    const int64_t first = (r.pos >> a.dims.log2_b) << a.dims.log2_b;
    const int n_valid = (int)min((int64_t)a.dims.b, r.e->valid - first);
    summarize_block<T, F8>(a.dims, a.k, a.kscale, a.kmin, a.kmax, a.kexp, r.s, n_valid);
}

// k and kscale: the pool's base (every layer); the block of (layer, page,
// head) is at summary offset s, as within one layer.
template <typename T, bool F8>
__global__ void summarize_range(resa_cuda_dims D, const void *k, const float *kscale,
                                void *kmin, void *kmax, int8_t *kexp, const int32_t *pages,
                                int64_t first_block, int64_t valid)
{
    const int head = blockIdx.z;
    const int64_t blk = first_block + blockIdx.x;
    const int layer = blockIdx.y;
    const int32_t page = pages[blk];
    const int64_t first = blk << D.log2_b;
    const int n_valid = (int)min((int64_t)D.b, valid - first);
    const size_t s = (((size_t)layer * D.n_pages + page) * D.hkv + head) * D.d;
    summarize_block<T, F8>(D, k, kscale, kmin, kmax, kexp, s, n_valid);
}

constexpr int kWarps = 8;


} // namespace

cudaError_t resa_cuda_kv_write(const resa_cuda_layer_args *a)
{
    const int64_t rows = a->n_rows * a->dims.hkv;
    const int64_t touched = (int64_t)a->n_touched * a->dims.hkv;
    if (rows <= 0 && touched <= 0)
        return cudaGetLastError();
    // Decode-only step: each entry is one DECODE row touching one block (a
    // QUERY_SPARSE entry, also counted in n_decode, touches none, so the
    // step is not decode-only then).
    const bool decode_only = a->n_decode == a->n_entries && a->n_rows == a->n_entries &&
                             a->n_touched == a->n_entries;
    // The first kernel of the layer is a plain launch: its inputs come from
    // the host's kernels, which know nothing of programmatic launches.
    cudaError_t err = RESA_DISPATCH_DTYPE(a->dims.io_dtype, T, [&] {
        return dispatch_f8(a->dims, [&](auto f8) {
            constexpr bool F8 = decltype(f8)::value;
            if (decode_only) {
                write_decode<T, F8><<<(unsigned)((rows + kWarps - 1) / kWarps), kWarps * 32, 0,
                                      a->stream>>>(*a);
                return cudaGetLastError();
            }
            write_rows<T, F8><<<(unsigned)((rows + kWarps - 1) / kWarps), kWarps * 32, 0,
                                a->stream>>>(*a);
            cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess || touched <= 0)
                return e;
            return launch_pdl(summarize_touched<T, F8>,
                              dim3((unsigned)((touched + kWarps - 1) / kWarps)),
                              dim3(kWarps * 32), 0, a->stream, *a);
        });
    });
    if (err != cudaSuccess)
        return err;
    return cudaGetLastError();
}

cudaError_t resa_cuda_refresh_summaries(const resa_cuda_dims *dims, void *k,
                                        const float *kscale, void *kmin,
                                        void *kmax, int8_t *kexp, const int32_t *d_pages,
                                        int64_t lo, int64_t hi, int64_t valid,
                                        cudaStream_t stream)
{
    const int64_t first = lo >> dims->log2_b, last = (hi - 1) >> dims->log2_b;
    dim3 grid((unsigned)(last - first + 1), (unsigned)dims->n_layers, (unsigned)dims->hkv);
    RESA_DISPATCH_DTYPE(dims->io_dtype, T, [&] {
        return dispatch_f8(*dims, [&](auto f8) {
            summarize_range<T, decltype(f8)::value><<<grid, 32, 0, stream>>>(
                *dims, k, kscale, kmin, kmax, kexp, d_pages, first, valid);
            return 0;
        });
    });
    return cudaGetLastError();
}
