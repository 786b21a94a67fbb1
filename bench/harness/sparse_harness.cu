// SPDX-License-Identifier: MIT
// Standalone check and benchmark of cuda/select_blocks.cu and
// cuda/attention_sparse.cu (not part of the library build).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 -I include -I lib -I cuda
//        bench/harness/sparse_harness.cu cuda/attention_sparse.cu cuda/kv_write.cu -o h
// (select_blocks.cu is included below, so that its scores can be timed apart.)
//   ./h check     correctness against a float64 CPU reference
//   ./h quick     4 small checks (for compute-sanitizer)
//   ./h topn      the top-n tail alone on crafted keys (ties, outliers, inf,
//                 NaN-like keys, all equal) against a CPU sort (also in check)
//   ./h topn-time the tail alone, M 16384, back-to-back launches
//   ./h time      timings (H200-sized: needs ~10 GB of device memory)
//   ./h           both
//
// check: random paged pools (random page tables, NaN in every unused page and
// every position past a sequence's end), every group size in {1,2,4,7,8,16},
// d in {64,128,256}, f16 and bf16, n_decode in {1,3,8}, lengths 1, 15, 17,
// 1000, 5000, 70000, block sizes 8..64, sink/local variants, bitmap recording
// on and off, keys in shared or global memory.  Selection must equal the
// float64 top-n except between blocks whose scores tie within rounding; the
// output is then compared with float64 attention over the GPU's own blocks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#include "kernels.h"
#include "resa.h"

#include "select_blocks.cu" // cuda/select_blocks.cu, through -I cuda

// A DECODE entry of a whole sequence (first_block 0, every block here) of
// length len, as backend_cuda.cu's step_prepare fills it.
static resa_dev_entry decode_entry(int slot, int M, int n, int sink, int local, int64_t row,
                                   int64_t len)
{
    resa_dev_entry e{};
    e.slot = slot;
    e.mode = RESA_MODE_DECODE;
    e.n = 1;
    e.n_blocks = M;
    e.n_select = n;
    const int cl = std::min(sink, M), ch = std::max(M - std::min(local, M), cl);
    e.n_pick = n < M ? std::max(0, n - (cl + (M - ch))) : 0;
    e.first_block = 0;
    e.local_blocks = M;
    e.row = row;
    e.start = len - 1;
    e.end = len;
    e.valid = len;
    return e;
}

static void ck(cudaError_t e, const char *what, int line)
{
    if (e != cudaSuccess) {
        fprintf(stderr, "CUDA error %s at line %d: %s\n", cudaGetErrorString(e), line, what);
        exit(2);
    }
}
#define CK(x) ck((x), #x, __LINE__)

// ---- host helpers ----

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint64_t next()
    {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float uni() { return (float)((next() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; } // [-1, 1)
    int below(int n) { return (int)(next() % (uint64_t)n); }
};

static uint16_t to_bits(float f, int dtype)
{
    if (dtype == RESA_DTYPE_BF16) {
        uint32_t u;
        memcpy(&u, &f, 4);
        u += 0x7FFFu + ((u >> 16) & 1u);
        return (uint16_t)(u >> 16);
    }
    __half h = __float2half_rn(f);
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}
static double from_bits(uint16_t b, int dtype)
{
    if (dtype == RESA_DTYPE_BF16) {
        uint32_t u = (uint32_t)b << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    __half_raw raw;
    raw.x = b;
    return __half2float(__half(raw));
}
static uint16_t nan_bits(int dtype) { return dtype == RESA_DTYPE_BF16 ? 0x7FC0 : 0x7E00; }

static int32_t budget(int64_t M, double r, int64_t n_min, int64_t local, int64_t sink)
{
    int64_t r_ppm = llround(r * 1e6);
    int64_t n = (r_ppm * M + 999999) / 1000000;
    n = std::max(n, std::min(n_min, M));
    n = std::max(n, std::min(local + sink, M));
    return (int32_t)std::min(n, M);
}

template <typename X>
static X *dev_upload(const std::vector<X> &h)
{
    X *d = nullptr;
    CK(cudaMalloc(&d, std::max<size_t>(1, h.size()) * sizeof(X)));
    if (!h.empty())
        CK(cudaMemcpy(d, h.data(), h.size() * sizeof(X), cudaMemcpyHostToDevice));
    return d;
}
template <typename X>
static std::vector<X> dev_download(const X *d, size_t n)
{
    std::vector<X> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(X), cudaMemcpyDeviceToHost));
    return h;
}

static int g_num_sms = 0;

// f(0 .. n-1) on all host cores (pool generation is the slow part of a check).
template <typename F>
static void parallel_for(int n, F f)
{
    const int nt = (int)std::max(1u, std::min(32u, std::thread::hardware_concurrency()));
    std::vector<std::thread> th;
    for (int t = 0; t < nt; t++)
        th.emplace_back([&, t] {
            for (int i = t; i < n; i += nt)
                f(i);
        });
    for (auto &x : th)
        x.join();
}

// ---- correctness ----

struct Case {
    int dtype, g, hkv, d, b, n_decode, sink, local, record, big_msb;
    double r;
    std::vector<int64_t> lens;
};

struct Result {
    bool ok = true;
    double max_rel = 0.0;
    int sel_ties = 0; // selection differences accepted as ties
};

static Result run_case(const Case &c, uint64_t seed)
{
    Result res;
    Rng rng(seed);
    const int hq = c.g * c.hkv, d = c.d, b = c.b, nd = c.n_decode;
    int log2_b = 0;
    while ((1 << log2_b) < b)
        log2_b++;
    std::vector<int32_t> M(nd), n(nd);
    int32_t maxM = 1, total_blocks = 0;
    for (int e = 0; e < nd; e++) {
        M[e] = (int32_t)((c.lens[e] + b - 1) / b);
        n[e] = c.r >= 1.0 ? M[e] : budget(M[e], c.r, 16, c.local, c.sink);
        maxM = std::max(maxM, M[e]);
        total_blocks += M[e];
    }
    resa_cuda_dims D{};
    D.n_layers = 2;
    D.hq = hq;
    D.hkv = c.hkv;
    D.group = c.g;
    D.d = d;
    D.b = b;
    D.log2_b = log2_b;
    D.max_seqs = nd + 2;
    D.max_seq_blocks = c.big_msb ? std::max(70000, maxM + 3) : maxM + 3;
    D.sel_words = (D.max_seq_blocks + 31) / 32;
    D.kv_dtype = c.dtype;
    D.max_step_tokens = 64;
    D.num_sms = g_num_sms;
    const int extra_pages = 3; // never referenced: all NaN
    D.n_pages = total_blocks + extra_pages;
    const int nan_page = total_blocks; // unused page-table slots point here

    // slots and pages
    std::vector<int> slot(D.max_seqs);
    std::iota(slot.begin(), slot.end(), 0);
    for (int i = D.max_seqs - 1; i > 0; i--)
        std::swap(slot[i], slot[rng.below(i + 1)]);
    std::vector<int32_t> perm(total_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    for (int i = total_blocks - 1; i > 0; i--)
        std::swap(perm[i], perm[rng.below(i + 1)]);
    std::vector<int32_t> pt((size_t)D.max_seqs * D.max_seq_blocks, nan_page);
    std::vector<int> page_seq(D.n_pages, -1), page_blk(D.n_pages, -1);
    for (int e = 0, at = 0; e < nd; e++)
        for (int j = 0; j < M[e]; j++, at++) {
            pt[(size_t)slot[e] * D.max_seq_blocks + j] = perm[at];
            page_seq[perm[at]] = e;
            page_blk[perm[at]] = j;
        }

    // pool: random keys with a per-(block, head) offset so that scores differ
    const size_t tile = (size_t)b * d;
    std::vector<uint16_t> K((size_t)D.n_pages * c.hkv * tile), V(K.size());
    std::vector<uint16_t> kmin((size_t)D.n_pages * c.hkv * d), kmax(kmin.size());
    const uint16_t nanb = nan_bits(c.dtype);
    parallel_for(D.n_pages, [&](int p) {
        Rng prng(seed * 1000003u + (uint64_t)p);
        for (int h = 0; h < c.hkv; h++) {
            const size_t base = ((size_t)p * c.hkv + h) * tile;
            const size_t sb = ((size_t)p * c.hkv + h) * d;
            const int e = page_seq[p];
            const int64_t valid = e < 0 ? 0 : std::min<int64_t>(b, c.lens[e] - (int64_t)page_blk[p] * b);
            const float bias = 0.6f * prng.uni();
            for (int t = 0; t < b; t++)
                for (int x = 0; x < d; x++) {
                    const bool ok = t < valid;
                    K[base + t * d + x] = ok ? to_bits(prng.uni() + bias, c.dtype) : nanb;
                    V[base + t * d + x] = ok ? to_bits(prng.uni(), c.dtype) : nanb;
                }
            for (int x = 0; x < d; x++) {
                double mn = INFINITY, mx = -INFINITY;
                for (int t = 0; t < valid; t++) {
                    const double v = from_bits(K[base + t * d + x], c.dtype);
                    mn = std::min(mn, v);
                    mx = std::max(mx, v);
                }
                kmin[sb + x] = valid ? to_bits((float)mn, c.dtype) : nanb;
                kmax[sb + x] = valid ? to_bits((float)mx, c.dtype) : nanb;
            }
        }
    });

    // step: one APPEND entry (rows 0..2, must stay untouched), then the decodes
    const int n_rows = 3 + nd;
    std::vector<uint16_t> q((size_t)n_rows * hq * d);
    for (auto &x : q)
        x = to_bits(2.0f * rng.uni(), c.dtype);
    std::vector<resa_dev_entry> ent(1 + nd);
    ent[0] = resa_dev_entry{};
    ent[0].slot = slot[nd];
    ent[0].mode = RESA_MODE_APPEND;
    ent[0].n = 3;
    ent[0].end = ent[0].valid = 3;
    for (int e = 0; e < nd; e++)
        ent[1 + e] = decode_entry(slot[e], M[e], n[e], c.sink, c.local, 3 + e, c.lens[e]);
    std::vector<int32_t> decode_ids(nd);
    std::iota(decode_ids.begin(), decode_ids.end(), 1);
    for (int i = nd - 1; i > 0; i--)
        std::swap(decode_ids[i], decode_ids[rng.below(i + 1)]);

    // device
    void *dK = dev_upload(K), *dV = dev_upload(V), *dmin = dev_upload(kmin), *dmax = dev_upload(kmax);
    int32_t *dpt = dev_upload(pt);
    resa_dev_entry *dent = dev_upload(ent);
    int32_t *dids = dev_upload(decode_ids);
    void *dq = dev_upload(q);
    std::vector<uint16_t> out_poison((size_t)n_rows * hq * d, nanb);
    void *dout = dev_upload(out_poison);
    const size_t sel_total = (size_t)D.max_seqs * D.n_layers * c.hkv * D.sel_words;
    uint32_t *dsel = nullptr;
    if (c.record)
        dsel = dev_upload(std::vector<uint32_t>(sel_total, 0xDEADBEEFu));
    void *ws_sel = nullptr, *ws_sp = nullptr;
    const size_t wsel = resa_cuda_select_workspace(&D), wsp = resa_cuda_sparse_workspace(&D);
    CK(cudaMalloc(&ws_sel, wsel));
    CK(cudaMalloc(&ws_sp, wsp));
    CK(cudaMemset(ws_sel, 0xFF, wsel)); // poison: -1 indices, NaN partials
    CK(cudaMemset(ws_sp, 0xFF, wsp));
    CK(resa_cuda_select_init(&D, ws_sel, 0));

    resa_cuda_layer_args a{};
    a.dims = D;
    a.layer = 1;
    a.k = dK;
    a.v = dV;
    a.kmin = dmin;
    a.kmax = dmax;
    a.selection = dsel ? dsel + (size_t)1 * c.hkv * D.sel_words : nullptr;
    a.page_tables = dpt;
    a.entries = dent;
    a.n_entries = 1 + nd;
    a.decode_ids = dids;
    a.n_decode = nd;
    a.n_rows = n_rows;
    a.scale = 1.0f / sqrtf((float)d);
    a.local_blocks = c.local;
    a.sink_blocks = c.sink;
    a.q = dq;
    a.out = dout;
    a.ws_select = ws_sel;
    a.ws_sparse = ws_sp;
    a.sel_counts = resa_cuda_select_counts(&D, ws_sel);
    a.stream = 0;
    // Twice, lists and output poisoned in between: the second launch shows
    // that the first left the select workspace ready (arrival counters zero).
    for (int rep = 0; rep < 2; rep++) {
        CK(resa_cuda_select_blocks(&a));
        CK(resa_cuda_attention_sparse(&a));
        CK(cudaDeviceSynchronize());
        if (rep == 0) {
            CK(cudaMemset(ws_sel, 0xFF, counters_offset(&D)));
            CK(cudaMemcpy(dout, out_poison.data(), out_poison.size() * 2, cudaMemcpyHostToDevice));
        }
    }

    std::vector<uint16_t> out = dev_download((const uint16_t *)dout, out_poison.size());
    std::vector<int32_t> lists = dev_download((const int32_t *)ws_sel, (size_t)nd * c.hkv * D.max_seq_blocks);
    std::vector<uint32_t> sel;
    if (dsel)
        sel = dev_download(dsel, sel_total);

    // untouched rows
    for (size_t x = 0; x < (size_t)3 * hq * d; x++)
        if (out[x] != nanb) {
            printf("    FAIL: row of the APPEND entry written\n");
            res.ok = false;
            break;
        }

    for (int i = 0; i < nd; i++) {
        const int e = decode_ids[i] - 1;
        const int64_t len = c.lens[e];
        const int Me = M[e], ne = n[e];
        const int sink = std::min(c.sink, Me), local_from = Me - std::min(c.local, Me);
        const int lo = sink, hi = std::max(local_from, sink);
        const int k = ne - (sink + (Me - hi));
        for (int h = 0; h < c.hkv; h++) {
            const int32_t *L = &lists[((size_t)i * c.hkv + h) * D.max_seq_blocks];
            std::vector<char> chosen(Me, 0);
            bool list_ok = true;
            for (int t = 0; t < ne; t++) {
                if (L[t] < 0 || L[t] >= Me || (t > 0 && L[t] <= L[t - 1])) {
                    list_ok = false;
                    break;
                }
                chosen[L[t]] = 1;
            }
            if (!list_ok) {
                printf("    FAIL: entry %d head %d: list not ascending in [0, M)\n", e, h);
                res.ok = false;
                continue;
            }
            // selection against float64 scores
            if (ne < Me) {
                for (int j = 0; j < Me; j++)
                    if ((j < lo || j >= hi) && !chosen[j]) {
                        printf("    FAIL: entry %d head %d: forced block %d missing\n", e, h, j);
                        res.ok = false;
                    }
                std::vector<double> qp(d, 0.0);
                for (int r = 0; r < c.g; r++)
                    for (int x = 0; x < d; x++)
                        qp[x] += from_bits(q[((size_t)(3 + e) * hq + h * c.g + r) * d + x], c.dtype);
                for (auto &v : qp)
                    v /= c.g;
                std::vector<double> sc(Me, 0.0), mag(Me, 0.0);
                std::vector<int> ord;
                for (int j = lo; j < hi; j++) {
                    const size_t sb = ((size_t)pt[(size_t)slot[e] * D.max_seq_blocks + j] * c.hkv + h) * d;
                    for (int x = 0; x < d; x++) {
                        const double t = std::max(qp[x] * from_bits(kmax[sb + x], c.dtype),
                                                  qp[x] * from_bits(kmin[sb + x], c.dtype));
                        sc[j] += t;
                        mag[j] += fabs(t);
                    }
                    ord.push_back(j);
                }
                std::sort(ord.begin(), ord.end(), [&](int x, int y) {
                    return sc[x] > sc[y] || (sc[x] == sc[y] && x < y);
                });
                if (k > 0) {
                    const double thr = sc[ord[k - 1]];
                    for (int t = 0; t < (int)ord.size(); t++) {
                        const int j = ord[t];
                        const bool want = t < k;
                        if (want == (bool)chosen[j])
                            continue;
                        // fp32 rounding of the GPU's scores: relative 1e-5 of the
                        // score or of the sum of |terms| (cancellation)
                        const double tol = 1e-5 * (std::max(fabs(sc[j]), fabs(thr)) + mag[j]);
                        if (fabs(sc[j] - thr) <= tol) {
                            res.sel_ties++;
                        } else {
                            printf("    FAIL: entry %d head %d: block %d (score %.9g, thr %.9g) %s\n",
                                   e, h, j, sc[j], thr, want ? "missing" : "extra");
                            res.ok = false;
                        }
                    }
                }
            }
            // bitmap of this layer
            if (dsel) {
                const uint32_t *w = &sel[(((size_t)slot[e] * D.n_layers + 1) * c.hkv + h) * D.sel_words];
                const uint32_t *w0 = &sel[(((size_t)slot[e] * D.n_layers + 0) * c.hkv + h) * D.sel_words];
                for (int x = 0; x < D.sel_words; x++) {
                    uint32_t want = 0;
                    for (int bit = 0; bit < 32; bit++) {
                        const int j = x * 32 + bit;
                        if (j < Me && chosen[j])
                            want |= 1u << bit;
                    }
                    if (w[x] != want || w0[x] != 0xDEADBEEFu) {
                        printf("    FAIL: entry %d head %d: bitmap word %d = %08x, want %08x\n", e, h,
                               x, w[x], want);
                        res.ok = false;
                        break;
                    }
                }
            }
            // attention over the GPU's blocks, float64
            double err2 = 0.0, ref2 = 0.0;
            bool finite = true;
            for (int r = 0; r < c.g; r++) {
                const size_t qo = ((size_t)(3 + e) * hq + h * c.g + r) * d;
                std::vector<double> qr(d), acc(d, 0.0), s;
                std::vector<size_t> vrow;
                for (int x = 0; x < d; x++)
                    qr[x] = from_bits(q[qo + x], c.dtype);
                double mx = -INFINITY;
                for (int t = 0; t < ne; t++) {
                    const int blk = L[t];
                    const int page = pt[(size_t)slot[e] * D.max_seq_blocks + blk];
                    for (int p = 0; p < b && (int64_t)blk * b + p < len; p++) {
                        const size_t ko = (((size_t)page * c.hkv + h) * b + p) * d;
                        double dot = 0.0;
                        for (int x = 0; x < d; x++)
                            dot += qr[x] * from_bits(K[ko + x], c.dtype);
                        dot *= (double)(1.0f / sqrtf((float)d)); // the scale the kernel gets
                        s.push_back(dot);
                        vrow.push_back(ko);
                        mx = std::max(mx, dot);
                    }
                }
                double l = 0.0;
                for (size_t t = 0; t < s.size(); t++) {
                    const double p = exp(s[t] - mx);
                    l += p;
                    for (int x = 0; x < d; x++)
                        acc[x] += p * from_bits(V[vrow[t] + x], c.dtype);
                }
                for (int x = 0; x < d; x++) {
                    const double ref = acc[x] / l, got = from_bits(out[qo + x], c.dtype);
                    if (!std::isfinite(got))
                        finite = false;
                    err2 += (got - ref) * (got - ref);
                    ref2 += ref * ref;
                }
            }
            const double rel = sqrt(err2 / std::max(ref2, 1e-300));
            res.max_rel = std::max(res.max_rel, finite ? rel : INFINITY);
            if (!finite || !(rel < 1e-2)) {
                printf("    FAIL: entry %d head %d: rel L2 %.3g%s\n", e, h, rel,
                       finite ? "" : " (non-finite output)");
                res.ok = false;
            }
        }
    }
    for (void *p : {dK, dV, dmin, dmax, (void *)dpt, (void *)dent, (void *)dids, dq, dout,
                    (void *)dsel, ws_sel, ws_sp})
        if (p)
            CK(cudaFree(p));
    return res;
}

// A few small cases for compute-sanitizer (memcheck, racecheck).
static int check_quick()
{
    int fails = 0;
    const int gs[4] = {7, 16, 1, 4}, ds[4] = {64, 256, 128, 128}, bs[4] = {8, 64, 16, 32};
    for (int i = 0; i < 4; i++) {
        Case c;
        c.dtype = i & 1 ? RESA_DTYPE_F16 : RESA_DTYPE_BF16;
        c.g = gs[i];
        c.hkv = 2;
        c.d = ds[i];
        c.b = bs[i];
        c.n_decode = 3;
        c.sink = i == 2 ? 2 : 0;
        c.local = i == 2 ? 3 : 1;
        c.record = 1;
        c.big_msb = i == 3;
        c.r = 0.1;
        c.lens = {1000, 17, 3000};
        const Result r = run_case(c, 77 + i);
        printf("quick %d: rel L2 %.2e %s\n", i, r.max_rel, r.ok ? "ok" : "FAIL");
        fails += !r.ok;
    }
    return fails ? 1 : 0;
}

static int check_all()
{
    const int64_t lens[6] = {1, 15, 17, 1000, 5000, 70000};
    const int groups[6] = {1, 2, 4, 7, 8, 16}, dims_d[3] = {64, 128, 256}, nds[3] = {1, 3, 8};
    const int bs[5] = {16, 8, 16, 32, 64};
    int n_cases = 0, n_fail = 0, ties = 0;
    double worst = 0.0;
    for (int dt = 0; dt < 2; dt++)
        for (int gi = 0; gi < 6; gi++)
            for (int di = 0; di < 3; di++)
                for (int ni = 0; ni < 3; ni++) {
                    const int id = n_cases++;
                    Case c;
                    c.dtype = dt ? RESA_DTYPE_F16 : RESA_DTYPE_BF16;
                    c.g = groups[gi];
                    c.hkv = 2;
                    c.d = dims_d[di];
                    c.b = bs[id % 5];
                    c.n_decode = nds[ni];
                    c.sink = id % 3 == 0 ? 2 : 0;
                    c.local = id % 3 == 0 ? 3 : 1;
                    c.record = id & 1;
                    c.big_msb = id % 4 == 0;
                    c.r = id % 11 == 5 ? 1.0 : 0.1; // some dense decodes
                    for (int e = 0; e < c.n_decode; e++)
                        c.lens.push_back(lens[(id + 5 * e) % 6]);
                    const Result r = run_case(c, 1000 + id);
                    ties += r.sel_ties;
                    worst = std::max(worst, r.max_rel);
                    if (!r.ok)
                        n_fail++;
                    if (!r.ok || id % 12 == 0) {
                        printf("case %3d %s g=%2d d=%3d b=%2d nd=%d sink=%d local=%d rec=%d msb=%s r=%.1f lens=",
                               id, dt ? "f16 " : "bf16", c.g, c.d, c.b, c.n_decode, c.sink, c.local,
                               c.record, c.big_msb ? "big" : "fit", c.r);
                        for (auto l : c.lens)
                            printf("%lld,", (long long)l);
                        printf(" max rel L2 %.2e ties %d %s\n", r.max_rel, r.sel_ties,
                               r.ok ? "ok" : "FAIL");
                    }
                }
    printf("CHECK: %d cases, %d failed, worst rel L2 %.3e, %d selection ties accepted\n", n_cases,
           n_fail, worst, ties);
    return n_fail == 0 ? 0 : 1;
}

// ---- timing ----

__global__ void fill_random(uint16_t *p, size_t n, uint64_t seed, int bf16)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + seed) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        const float f = (float)((z >> 40) & 0xFFFFFF) * (2.0f / 16777216.0f) - 1.0f;
        if (bf16) {
            __nv_bfloat16 h = __float2bfloat16_rn(f);
            p[i] = *(uint16_t *)&h;
        } else {
            __half h = __float2half_rn(f);
            p[i] = *(uint16_t *)&h;
        }
    }
}

static float median(std::vector<float> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

static double copy_bandwidth()
{
    const size_t bytes = (size_t)2 << 30;
    void *x, *y;
    CK(cudaMalloc(&x, bytes));
    CK(cudaMalloc(&y, bytes));
    CK(cudaMemset(x, 1, bytes));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> t;
    for (int i = 0; i < 13; i++) {
        CK(cudaEventRecord(e0));
        CK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 3)
            t.push_back(ms);
    }
    CK(cudaFree(x));
    CK(cudaFree(y));
    return 2.0 * bytes / (median(t) * 1e-3) / 1e9; // read + written
}


// ---- topn: the top-n tail alone, on crafted keys, against a CPU sort ----

// One CTA per pair (dims.hkv = 1, so pair = slot); key range given.
__global__ void __launch_bounds__(kScoreThreads, 1)
topn_kernel(resa_cuda_layer_args a, const uint32_t *keys, const int *Ms, const int *ns,
            const uint32_t *range, int stage)
{
    extern __shared__ uint32_t keys_s[];
    __shared__ TailShared ts;
    const int pair = blockIdx.x;
    Pair p;
    p.slot = pair;
    p.entry = pair;
    p.M = Ms[pair];
    p.all = ns[pair] >= p.M;
    p.fb = 0;
    p.row = 0;
    const int sink = min(max(a.sink_blocks, 0), p.M);
    const int local_from = p.M - min(max(a.local_blocks, 0), p.M);
    p.cand_lo = sink;
    p.cand_hi = max(local_from, sink);
    p.k = p.all ? 0 : max(0, ns[pair] - (sink + (p.M - p.cand_hi)));
    if (threadIdx.x == 0) {
        ts.lo = range[2 * pair];
        ts.hi = range[2 * pair + 1];
    }
    for (int t = threadIdx.x; t < kBins; t += blockDim.x)
        ts.hist[t] = 0u; // as score_select does before its arrival barrier
    __syncthreads();
    select_tail<false>(a, p, pair, keys + (size_t)pair * a.dims.max_seq_blocks, stage ? keys_s : nullptr,
                       ts);
}

static uint32_t host_key(float s)
{
    if (s == 0.0f)
        s = 0.0f;
    uint32_t u;
    memcpy(&u, &s, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static double gauss(Rng &r)
{
    double u = (r.next() >> 11) * (1.0 / 9007199254740992.0) + 1e-300, v = (r.next() >> 11) * (1.0 / 9007199254740992.0);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static uint32_t gen_key(Rng &r, int dist)
{
    switch (dist) {
    case 0: return host_key((float)(40.0 + 4.0 * gauss(r)));
    case 1: return host_key((float)(5.0 + 20.0 * gauss(r)));
    case 2: return (uint32_t)r.next();
    case 3: return host_key((float)r.below(5));
    case 4: return host_key(1.5f);
    case 5: return r.below(500) == 0 ? host_key(r.below(2) ? 1e30f : -1e30f) : host_key((float)gauss(r));
    case 6: return host_key((float)(std::round(gauss(r) * 64.0) / 64.0));
    case 7: return host_key((float)exp(20.0 * gauss(r)) * (r.below(2) ? 1.0f : -1.0f));
    default: return r.below(50) == 0 ? host_key(r.below(2) ? INFINITY : -INFINITY) : host_key((float)gauss(r));
    }
}
static const int kDists = 9;

// Dimensions of a top-n launch: P pairs of one KV head, up to maxM blocks.
static resa_cuda_dims topn_dims(int P, int maxM)
{
    resa_cuda_dims D{};
    D.n_layers = 1;
    D.hkv = 1;
    D.max_seqs = P;
    D.max_seq_blocks = maxM;
    D.sel_words = (maxM + 31) / 32;
    return D;
}

// Keys of distribution `dist` at row[lo, hi); their range to range2[0..1]
// (as the score CTAs would merge it).
static void fill_keys(Rng &rng, int dist, int lo, int hi, uint32_t *row, uint32_t *range2)
{
    uint32_t mn = 0xffffffffu, mx = 0;
    for (int j = lo; j < hi; j++) {
        row[j] = gen_key(rng, dist);
        mn = std::min(mn, row[j]);
        mx = std::max(mx, row[j]);
    }
    range2[0] = mn;
    range2[1] = mx;
}

// P pairs of lengths Ms, budgets ns, distributions; returns failures.
static int topn_case(const std::vector<int> &Ms, const std::vector<int> &ns, const std::vector<int> &dists,
                     int sink, int local, int record, int maxM, uint64_t seed, bool verbose)
{
    const int P = (int)Ms.size();
    Rng rng(seed);
    const resa_cuda_dims D = topn_dims(P, maxM);
    std::vector<uint32_t> keys((size_t)P * maxM, 0xA5A5A5A5u), range(2 * P);
    for (int i = 0; i < P; i++) {
        const int cl = std::min(sink, Ms[i]), ch = std::max(Ms[i] - std::min(local, Ms[i]), cl);
        fill_keys(rng, dists[i], cl, ch, &keys[(size_t)i * maxM], &range[2 * i]);
    }
    uint32_t *dk = dev_upload(keys), *dr = dev_upload(range);
    int *dM = dev_upload(Ms), *dn = dev_upload(ns);
    int32_t *dl;
    CK(cudaMalloc(&dl, (size_t)P * maxM * 4));
    CK(cudaMemset(dl, 0xFF, (size_t)P * maxM * 4));
    uint32_t *dsel = nullptr;
    if (record)
        dsel = dev_upload(std::vector<uint32_t>((size_t)P * D.sel_words, 0xDEADBEEFu));
    int32_t *dcnt = dev_upload(std::vector<int32_t>((size_t)P, -1));
    resa_cuda_layer_args a{};
    a.dims = D;
    a.ws_select = dl;
    a.sel_counts = dcnt;
    a.selection = dsel;
    a.sink_blocks = sink;
    a.local_blocks = local;
    const size_t smem = keys_smem(D);
    CK(cudaFuncSetAttribute(topn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    topn_kernel<<<P, kScoreThreads, smem>>>(a, dk, dM, dn, dr, smem > 0);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<int32_t> lists = dev_download(dl, (size_t)P * maxM);
    std::vector<int32_t> counts = dev_download(dcnt, (size_t)P);
    std::vector<uint32_t> sel;
    if (record)
        sel = dev_download(dsel, (size_t)P * D.sel_words);
    int fails = 0;
    for (int i = 0; i < P; i++) {
        const int M = Ms[i], n = ns[i];
        const int cl = std::min(sink, M), ch = std::max(M - std::min(local, M), cl);
        std::vector<int> want;
        if (n >= M) {
            for (int j = 0; j < M; j++)
                want.push_back(j);
        } else {
            const int k = n - (cl + (M - ch));
            std::vector<int> c;
            for (int j = cl; j < ch; j++)
                c.push_back(j);
            const uint32_t *K = &keys[(size_t)i * maxM];
            std::sort(c.begin(), c.end(), [&](int x, int y) { return K[x] != K[y] ? K[x] > K[y] : x < y; });
            for (int j = 0; j < cl; j++)
                want.push_back(j);
            for (int j = ch; j < M; j++)
                want.push_back(j);
            for (int t = 0; t < k && t < (int)c.size(); t++)
                want.push_back(c[t]);
            std::sort(want.begin(), want.end());
        }
        bool ok = counts[i] == (int)want.size(); // the count attention_sparse reads
        const int32_t *L = &lists[(size_t)i * maxM];
        for (size_t t = 0; t < want.size(); t++)
            ok &= L[t] == want[t];
        if (record) {
            std::vector<uint32_t> w(D.sel_words, 0);
            for (int j : want)
                w[j >> 5] |= 1u << (j & 31);
            for (int x = 0; x < D.sel_words; x++)
                ok &= sel[(size_t)i * D.sel_words + x] == w[x];
        }
        if (!ok) {
            fails++;
            printf("    FAIL topn: pair %d M %d n %d dist %d sink %d local %d maxM %d\n", i, M, n, dists[i],
                   sink, local, maxM);
        } else if (verbose)
            printf("    ok topn: pair %d M %d n %d dist %d\n", i, M, n, dists[i]);
    }
    for (void *p : {(void *)dk, (void *)dr, (void *)dM, (void *)dn, (void *)dl, (void *)dsel,
                    (void *)dcnt})
        if (p)
            CK(cudaFree(p));
    return fails;
}

static int check_topn()
{
    const int Mv[] = {1, 2, 5, 31, 33, 100, 1000, 1025, 2048, 5000, 16384, 40000, 45000};
    int cases = 0, fails = 0;
    Rng rng(99);
    for (int mi = 0; mi < (int)(sizeof Mv / sizeof Mv[0]); mi++)
        for (int sv = 0; sv < 4; sv++) {
            const int sink = sv == 1 ? 2 : sv == 3 ? 70000 : 0, local = sv == 0 ? 1 : sv == 1 ? 3 : sv == 2 ? 0 : 5;
            std::vector<int> Ms, ns, ds;
            for (int dd = 0; dd < kDists; dd++)
                for (int nv = 0; nv < 3; nv++) {
                    const int M = Mv[mi];
                    Ms.push_back(M);
                    ns.push_back(nv == 0 ? std::max(1, (int)std::ceil(0.1 * M)) : nv == 1 ? 1 + rng.below(M) : std::min(M, 1 + sink + local + rng.below(3)));
                    ds.push_back(dd);
                }
            const int maxM = Mv[mi] > 40960 || (sv & 1) ? std::max(Mv[mi] + 3, 41000) : Mv[mi] + 3;
            fails += topn_case(Ms, ns, ds, sink, local, sv != 2, maxM, 1000 + cases, false);
            cases += (int)Ms.size();
        }
    printf("topn: %d pairs, %d failures\n", cases, fails);
    return fails ? 1 : 0;
}

// The tail alone, M = 16384, n = 1639, pairs 4 (batch 1, 4 KV heads) and 32.
static void time_topn()
{
    for (int P : {4, 32})
        for (int dist : {0, 1, 6}) {
            const int M = 16384, maxM = M;
            std::vector<int> Ms(P, M), ns(P, 1639), ds(P, dist);
            Rng rng(5);
            std::vector<uint32_t> keys((size_t)P * maxM), range(2 * P);
            for (int i = 0; i < P; i++) // the last block is the local one
                fill_keys(rng, dist, 0, M - 1, &keys[(size_t)i * maxM], &range[2 * i]);
            const resa_cuda_dims D = topn_dims(P, maxM);
            uint32_t *dk = dev_upload(keys), *dr = dev_upload(range);
            int *dM = dev_upload(Ms), *dn = dev_upload(ns);
            int32_t *dl;
            CK(cudaMalloc(&dl, (size_t)P * maxM * 4));
            uint32_t *dsel = dev_upload(std::vector<uint32_t>((size_t)P * D.sel_words, 0));
            int32_t *dcnt = dev_upload(std::vector<int32_t>((size_t)P, 0));
            resa_cuda_layer_args a{};
            a.dims = D;
            a.ws_select = dl;
            a.sel_counts = dcnt;
            a.selection = dsel;
            a.local_blocks = 1;
            const size_t smem = keys_smem(D);
            CK(cudaFuncSetAttribute(topn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            cudaEvent_t e0, e1;
            CK(cudaEventCreate(&e0));
            CK(cudaEventCreate(&e1));
            for (int w = 0; w < 10; w++)
                topn_kernel<<<P, kScoreThreads, smem>>>(a, dk, dM, dn, dr, 1);
            const int N = 200;
            CK(cudaEventRecord(e0));
            for (int w = 0; w < N; w++)
                topn_kernel<<<P, kScoreThreads, smem>>>(a, dk, dM, dn, dr, 1);
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            printf("TIME topn tail alone: %2d pairs M %d n 1639 dist %d: %.2f us per launch (back to back)\n", P,
                   M, dist, ms * 1e3 / N);
            for (void *p : {(void *)dk, (void *)dr, (void *)dM, (void *)dn, (void *)dl, (void *)dsel,
                            (void *)dcnt})
                CK(cudaFree(p));
            CK(cudaEventDestroy(e0));
            CK(cudaEventDestroy(e1));
        }
}

enum What { kLayer, kSelectOnly, kAttendOnly, kScoreOnly, kStep };

// The scores of resa_cuda_select_blocks alone (its kernel without the top-n tail).
static cudaError_t select_part(const resa_cuda_layer_args &a)
{
    const resa_cuda_dims &D = a.dims;
    uint32_t *keys = (uint32_t *)a.ws_select + list_elems(&D);
    PairCells *cells = (PairCells *)((char *)a.ws_select + counters_offset(&D));
    const dim3 grid = score_grid(D, a.n_decode);
    return RESA_DISPATCH_DTYPE(D.kv_dtype, T,
                               [&] { return launch_score<T, T, false, false>(&a, grid, keys, cells, nullptr, nullptr); });
}

static cudaError_t enqueue_e(const resa_cuda_layer_args &a, What w)
{
    cudaError_t e = cudaSuccess;
    if (w == kScoreOnly)
        return select_part(a);
    if (w == kStep) // the whole decode step of a layer: writes, select, attention
        e = resa_cuda_kv_write(&a);
    if (e == cudaSuccess && w != kAttendOnly)
        e = resa_cuda_select_blocks(&a);
    if (e == cudaSuccess && w != kSelectOnly)
        e = resa_cuda_attention_sparse(&a);
    return e;
}

static void enqueue(const resa_cuda_layer_args &a, What w)
{
    CK(enqueue_e(a, w));
}

// Median time (ms) of one layer over 20 graph replays, rotating pools.
static float time_graphs(std::vector<resa_cuda_layer_args> &args, What w, cudaStream_t st)
{
    const int R = (int)args.size();
    std::vector<cudaGraphExec_t> ex(R);
    bool graphs = true;
    for (int r = 0; r < R; r++) {
        args[r].stream = st;
        enqueue(args[r], w); // uncaptured first: module loading stays out of the capture
    }
    for (int r = 0; r < R && graphs; r++) {
        cudaGraph_t g = nullptr;
        cudaError_t e = cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal);
        if (e == cudaSuccess)
            e = enqueue_e(args[r], w);
        cudaError_t e2 = cudaStreamEndCapture(st, &g);
        if (e == cudaSuccess)
            e = e2;
        if (e == cudaSuccess)
            e = cudaGraphInstantiate(&ex[r], g, 0);
        if (g)
            cudaGraphDestroy(g);
        if (e != cudaSuccess) {
            printf("WARNING: graph capture failed (%s): timing direct launches\n",
                   cudaGetErrorString(e));
            cudaGetLastError();
            graphs = false;
        }
    }
    auto launch = [&](int i) {
        if (graphs)
            CK(cudaGraphLaunch(ex[i % R], st));
        else
            enqueue(args[i % R], w);
    };
    for (int i = 0; i < 3 + R; i++)
        launch(i);
    const int N = 20;
    std::vector<cudaEvent_t> ev(2 * N);
    for (auto &e : ev)
        CK(cudaEventCreate(&e));
    for (int i = 0; i < N; i++) {
        CK(cudaEventRecord(ev[2 * i], st));
        launch(i);
        CK(cudaEventRecord(ev[2 * i + 1], st));
    }
    CK(cudaStreamSynchronize(st));
    CK(cudaGetLastError());
    std::vector<float> t(N);
    for (int i = 0; i < N; i++)
        CK(cudaEventElapsedTime(&t[i], ev[2 * i], ev[2 * i + 1]));
    for (auto &e : ev)
        CK(cudaEventDestroy(e));
    if (graphs)
        for (auto &x : ex)
            CK(cudaGraphExecDestroy(x));
    return median(t);
}

static void time_case(int batch, int64_t len, double copy_gbs)
{
    const int hq = 32, hkv = 8, g = 4, d = 128, b = 16;
    const int M = (int)((len + b - 1) / b);
    const double pool_bytes = (double)batch * M * hkv * (b * d * 2 * 2 + 2 * d * 2);
    const int R = (int)std::min(16.0, std::max(1.0, ceil(2.5e9 / pool_bytes))); // rotate past L2
    resa_cuda_dims D{};
    D.n_layers = 1;
    D.hq = hq;
    D.hkv = hkv;
    D.group = g;
    D.d = d;
    D.b = b;
    D.log2_b = 4;
    D.n_pages = batch * M * R;
    D.max_seqs = batch * R;
    D.max_seq_blocks = M;
    D.sel_words = (M + 31) / 32;
    D.kv_dtype = RESA_DTYPE_BF16;
    D.max_step_tokens = batch;
    D.num_sms = g_num_sms;
    const size_t kv_elems = (size_t)D.n_pages * hkv * b * d, sum_elems = (size_t)D.n_pages * hkv * d;
    uint16_t *k, *v, *mn, *mx, *q, *out;
    CK(cudaMalloc(&k, kv_elems * 2));
    CK(cudaMalloc(&v, kv_elems * 2));
    CK(cudaMalloc(&mn, sum_elems * 2));
    CK(cudaMalloc(&mx, sum_elems * 2));
    CK(cudaMalloc(&q, (size_t)batch * hq * d * 2));
    CK(cudaMalloc(&out, (size_t)batch * hq * d * 2));
    fill_random<<<4096, 256>>>(k, kv_elems, 1, 1);
    fill_random<<<4096, 256>>>(v, kv_elems, 2, 1);
    fill_random<<<4096, 256>>>(mn, sum_elems, 3, 1);
    fill_random<<<4096, 256>>>(mx, sum_elems, 4, 1);
    fill_random<<<64, 256>>>(q, (size_t)batch * hq * d, 5, 1);
    CK(cudaGetLastError());
    // fragmented pool: every slot's table is a random slice of a permutation
    Rng rng(7);
    std::vector<int32_t> perm(D.n_pages);
    std::iota(perm.begin(), perm.end(), 0);
    for (int i = D.n_pages - 1; i > 0; i--)
        std::swap(perm[i], perm[rng.below(i + 1)]);
    int32_t *pt = dev_upload(perm); // slot s: perm[s*M .. s*M + M)
    void *ws_sel, *ws_sp;
    CK(cudaMalloc(&ws_sel, resa_cuda_select_workspace(&D)));
    CK(resa_cuda_select_init(&D, ws_sel, 0));
    CK(cudaMalloc(&ws_sp, resa_cuda_sparse_workspace(&D)));
    std::vector<int32_t> ids(batch);
    std::iota(ids.begin(), ids.end(), 0);
    int32_t *dids = dev_upload(ids);
    // the step's new K/V rows (one per entry) and the blocks they touch
    uint16_t *kin, *vin;
    CK(cudaMalloc(&kin, (size_t)batch * hkv * d * 2));
    CK(cudaMalloc(&vin, (size_t)batch * hkv * d * 2));
    fill_random<<<64, 256>>>(kin, (size_t)batch * hkv * d, 6, 1);
    fill_random<<<64, 256>>>(vin, (size_t)batch * hkv * d, 7, 1);
    std::vector<int32_t> tch(2 * batch);
    for (int e = 0; e < batch; e++) {
        tch[2 * e] = e;
        tch[2 * e + 1] = (int32_t)((len - 1) / b);
    }
    int32_t *dtch = dev_upload(tch);
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

    for (int dense = 0; dense < 2; dense++) {
        const int n = dense ? M : budget(M, 0.1, 16, 1, 0);
        std::vector<resa_dev_entry *> dents;
        std::vector<resa_cuda_layer_args> args;
        for (int r = 0; r < R; r++) {
            std::vector<resa_dev_entry> ent(batch);
            for (int e = 0; e < batch; e++)
                ent[e] = decode_entry(r * batch + e, M, n, 0, 1, e, len);
            dents.push_back(dev_upload(ent));
            resa_cuda_layer_args a{};
            a.dims = D;
            a.k = k;
            a.v = v;
            a.kmin = mn;
            a.kmax = mx;
            a.page_tables = pt;
            a.entries = dents.back();
            a.n_entries = batch;
            a.decode_ids = dids;
            a.n_decode = batch;
            a.n_rows = batch;
            a.scale = 1.0f / sqrtf((float)d);
            a.local_blocks = 1;
            a.q = q;
            a.out = out;
            a.ws_select = ws_sel;
            a.ws_sparse = ws_sp;
            a.sel_counts = resa_cuda_select_counts(&D, ws_sel);
            a.k_in = kin;
            a.v_in = vin;
            a.touched = dtch;
            a.n_touched = batch;
            args.push_back(a);
        }
        const float t_layer = time_graphs(args, kLayer, st);
        const float t_sel = time_graphs(args, kSelectOnly, st);
        const float t_att = time_graphs(args, kAttendOnly, st);
        const float t_score = dense ? 0.0f : time_graphs(args, kScoreOnly, st);
        const float t_step = time_graphs(args, kStep, st);
        const double heads = (double)batch * hkv;
        const double b_sum = dense ? 0.0 : heads * M * 2.0 * d * 2;
        const double b_pages = heads * n * (double)b * d * 2 * 2;
        const double bytes = b_sum + b_pages;
        const double gbs = bytes / (t_layer * 1e-3) / 1e9;
        printf("TIME batch %d x %6lld %-6s n=%5d/%5d rot=%2d: step %7.1f us | layer %7.1f us = select %6.1f (score %6.1f)"
               " + attend %7.1f | read %7.1f MB %5.0f GB/s = %5.1f%% of copy"
               " [score %3.0f%%, attend %3.0f%%]\n",
               batch, (long long)len, dense ? "dense" : "sparse", n, M, R, t_step * 1e3, t_layer * 1e3, t_sel * 1e3,
               t_score * 1e3, t_att * 1e3, bytes / 1e6, gbs, 100.0 * gbs / copy_gbs,
               dense ? 0.0 : 100.0 * b_sum / (t_score * 1e-3) / 1e9 / copy_gbs,
               100.0 * b_pages / (t_att * 1e-3) / 1e9 / copy_gbs);
        for (auto p : dents)
            CK(cudaFree(p));
    }
    CK(cudaStreamDestroy(st));
    for (void *p : {(void *)k, (void *)v, (void *)mn, (void *)mx, (void *)q, (void *)out, (void *)pt,
                    ws_sel, ws_sp, (void *)dids, (void *)kin, (void *)vin, (void *)dtch})
        CK(cudaFree(p));
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "all";
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    g_num_sms = prop.multiProcessorCount;
    printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
           prop.l2CacheSize >> 20);
    int rc = 0;
    if (!strcmp(mode, "quick"))
        rc |= check_quick();
    if (!strcmp(mode, "topn") || !strcmp(mode, "check") || !strcmp(mode, "all"))
        rc |= check_topn();
    if (!strcmp(mode, "topn-time"))
        time_topn();
    if (!strcmp(mode, "check") || !strcmp(mode, "all"))
        rc |= check_all();
    if (!strcmp(mode, "time") || !strcmp(mode, "all")) {
        const double copy = copy_bandwidth();
        printf("TIME cudaMemcpy D2D: %.0f GB/s (read + written)\n", copy);
        time_case(1, 32768, copy);
        time_case(8, 65536, copy);
        time_case(1, 262144, copy);
        time_case(8, 262144, copy);
    }
    return rc;
}
