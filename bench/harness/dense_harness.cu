// SPDX-License-Identifier: MIT
// Standalone check and benchmark of cuda/attention_dense.cu and, on a compute
// capability 9.0 GPU, its wgmma path cuda/attention_dense_sm90.cu (not part of
// the library build).  bench/harness/dense_run.sh has the build lines:
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -DRESA_CUDA_SM90A=1
//        -I include -I lib -I cuda -c cuda/attention_dense_sm90.cu -o sm90.o
//   nvcc -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 -I include -I lib -I cuda
//        bench/harness/dense_harness.cu cuda/attention_dense.cu sm90.o -o dh
//   ./dh check    correctness against a float64 CPU reference
//   ./dh quick    four small checks (for compute-sanitizer)
//   ./dh time     timings (needs ~20 GB of device memory); DH_TIME_CASES=a,b
//                 times only the cases whose names hold a or b,
//                 DH_TIME_PATHS=wgmma the wgmma paths alone
//   ./dh          both
//
// All paths: every d = 128 and d = 256 case runs the mma.sync kernel
// (RESA_CUDA_NO_WGMMA=1) and, where the GPU has it, the wgmma kernel
// (RESA_CUDA_WGMMA=1) with its TMA producer and with its cp.async one
// (RESA_CUDA_NO_TMA=1), each from NaN-poisoned output and workspace, against
// one float64 reference.
//
// check: paged pools with shuffled page tables, NaN in every unused page, in
// every position past a sequence's end and in every page-table entry past it
// (-1); entries (0,1) (0,37) (0,1000) (5000,32) (70000,32) (300,2048) in one
// call; every g in {1,2,4,7,8,16}, d in {64,128,256}, f16 and bf16, block
// sizes 8..64; rectify-only steps (many splits); d = 128 extras: 32/8 and
// 28/4 heads with 8 rectifications at contexts off the 16-token grid, prefill
// chunks at odd offsets (row counts off the 128 grid), one rectification cut
// into 64 splits, block sizes 4 (no TMA), 128 and 256; d = 256 extras: 16/2
// heads with 8 rectifications and prefill chunks, block sizes 4..128.  Output poisoned with NaN; every row is checked for NaN, and
// sampled rows (all heads) against float64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"
#include "resa.h"

static void ck(cudaError_t e, const char *what, int line)
{
    if (e != cudaSuccess) {
        fprintf(stderr, "CUDA error %s at line %d: %s\n", cudaGetErrorString(e), line, what);
        exit(2);
    }
}
#define CK(x) ck((x), #x, __LINE__)

// Values are a hash of (seed, index), the same function on host and device, so
// the reference reads the pool without copying it back.
__host__ __device__ inline float hval(uint64_t seed, uint64_t i)
{
    uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xD1B54A32D192ED03ull + 1;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((z >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; // [-1, 1)
}
__host__ __device__ inline uint16_t to_bits(float f, int dtype)
{
    if (dtype == RESA_DTYPE_BF16) {
        __nv_bfloat16 h = __float2bfloat16_rn(f);
        return *reinterpret_cast<uint16_t *>(&h);
    }
    __half h = __float2half_rn(f);
    return *reinterpret_cast<uint16_t *>(&h);
}
static double from_bits(uint16_t b, int dtype)
{
    if (dtype == RESA_DTYPE_BF16) {
        uint32_t u = (uint32_t)b << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    __half_raw r;
    r.x = b;
    return (double)__half2float(__half(r));
}
static const uint16_t NAN_BITS = 0x7FC0; // NaN in bf16; also NaN in f16 (exp all ones)

// ---- the two paths ----
bool resa_cuda_dense_sm90_built(); // attention_dense_sm90.cu
static bool g_wgmma = false;       // the wgmma path exists here (set in main)
// wgmma loads full K/V tiles with TMA (its default); wgmma-cp is the same
// kernel with every tile copied by cp.async (RESA_CUDA_NO_TMA=1), the
// fallback path.
constexpr int kPaths = 3;
static const char *PATH_NAME[kPaths] = {"mma", "wgmma", "wgmma-cp"};
static void use_path(int path)
{
    if (path > 0) {
        unsetenv("RESA_CUDA_NO_WGMMA");
        setenv("RESA_CUDA_WGMMA", "1", 1);
    } else {
        setenv("RESA_CUDA_NO_WGMMA", "1", 1);
    }
    if (path == 2)
        setenv("RESA_CUDA_NO_TMA", "1", 1);
    else
        unsetenv("RESA_CUDA_NO_TMA");
}
static int n_paths(int d) { return (d == 128 || d == 256) && g_wgmma ? kPaths : 1; }
static double g_worst[kPaths] = {0, 0, 0};

// pool element (page, head, off, dim): hashed value if off < limit[page], else NaN
__global__ void fill_pool(uint16_t *k, uint16_t *v, const int32_t *limit, int64_t n_pages, int hkv,
                          int b, int d, int dtype, uint64_t seed)
{
    const int64_t total = n_pages * hkv * b * d;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t page = i / ((int64_t)hkv * b * d);
        const int off = (int)((i / d) % b);
        const bool ok = off < limit[page];
        k[i] = ok ? to_bits(hval(seed, 2 * i), dtype) : NAN_BITS;
        v[i] = ok ? to_bits(hval(seed, 2 * i + 1), dtype) : NAN_BITS;
    }
}
// q: values in [-qs, qs)
__global__ void fill_q(uint16_t *q, int64_t n, int dtype, uint64_t seed, float qs)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        q[i] = to_bits(qs * hval(seed, i), dtype);
}

struct Ent { int64_t start; int32_t n; };

struct Setup {
    int dtype, d, g, hkv, hq, b, log2_b;
    std::vector<Ent> ents;
    uint64_t seed;
    float qs;
    // derived
    int32_t n_pages, max_seqs, max_seq_blocks;
    int64_t n_rows;
    std::vector<int32_t> tables;   // [max_seqs][max_seq_blocks]
    std::vector<int32_t> limit;    // [n_pages]
    std::vector<resa_dev_entry> dev;
    void *dk = nullptr, *dv = nullptr, *dq = nullptr, *dout = nullptr, *dws = nullptr;
    int32_t *dtab = nullptr, *dids = nullptr;
    resa_dev_entry *dent = nullptr;
    resa_cuda_layer_args a;
    std::vector<float> hk, hv, hqv; // decoded copies for the reference (empty: hash again)
};

static uint64_t g_rng = 12345;
static uint64_t rnd()
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

static void setup(Setup &s)
{
    s.hq = s.g * s.hkv;
    s.log2_b = 0;
    while ((1 << s.log2_b) < s.b)
        s.log2_b++;
    s.max_seqs = (int)s.ents.size();
    int64_t maxlen = 0, pages = 0;
    for (auto &e : s.ents) {
        maxlen = std::max(maxlen, e.start + e.n);
        pages += (e.start + e.n + s.b - 1) / s.b;
    }
    s.max_seq_blocks = (int32_t)((maxlen + s.b - 1) / s.b) + 2;
    s.n_pages = (int32_t)pages + 5; // a few unused (NaN) pages
    std::vector<int32_t> perm(s.n_pages);
    for (int i = 0; i < s.n_pages; i++)
        perm[i] = i;
    for (int i = s.n_pages - 1; i > 0; i--)
        std::swap(perm[i], perm[rnd() % (i + 1)]);
    s.tables.assign((size_t)s.max_seqs * s.max_seq_blocks, -1);
    s.limit.assign(s.n_pages, 0);
    int next = 0;
    s.n_rows = 0;
    s.dev.clear();
    for (int i = 0; i < s.max_seqs; i++) {
        const Ent &e = s.ents[i];
        const int64_t len = e.start + e.n;
        for (int64_t blk = 0; blk * s.b < len; blk++) {
            int32_t pg = perm[next++];
            s.tables[(size_t)i * s.max_seq_blocks + blk] = pg;
            s.limit[pg] = (int32_t)std::min<int64_t>(s.b, len - blk * s.b);
        }
        resa_dev_entry de{};
        de.slot = i;
        de.mode = (e.n == 32 && e.start > 0) ? RESA_MODE_RECTIFY : RESA_MODE_APPEND;
        de.n = e.n;
        de.row = s.n_rows;
        de.start = e.start;
        de.end = e.start + e.n;
        de.valid = de.end;
        s.dev.push_back(de);
        s.n_rows += e.n;
    }
    const size_t kv_elems = (size_t)s.n_pages * s.hkv * s.b * s.d;
    CK(cudaMalloc(&s.dk, kv_elems * 2));
    CK(cudaMalloc(&s.dv, kv_elems * 2));
    CK(cudaMalloc(&s.dq, (size_t)s.n_rows * s.hq * s.d * 2));
    CK(cudaMalloc(&s.dout, (size_t)s.n_rows * s.hq * s.d * 2));
    int32_t *dlimit;
    CK(cudaMalloc(&dlimit, sizeof(int32_t) * s.n_pages));
    CK(cudaMemcpy(dlimit, s.limit.data(), sizeof(int32_t) * s.n_pages, cudaMemcpyHostToDevice));
    fill_pool<<<2048, 256>>>((uint16_t *)s.dk, (uint16_t *)s.dv, dlimit, s.n_pages, s.hkv, s.b, s.d,
                             s.dtype, s.seed);
    CK(cudaGetLastError());
    fill_q<<<1024, 256>>>((uint16_t *)s.dq, s.n_rows * s.hq * s.d, s.dtype, s.seed + 7, s.qs);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    CK(cudaFree(dlimit));
    CK(cudaMalloc(&s.dtab, sizeof(int32_t) * s.tables.size()));
    CK(cudaMemcpy(s.dtab, s.tables.data(), sizeof(int32_t) * s.tables.size(), cudaMemcpyHostToDevice));
    CK(cudaMalloc(&s.dent, sizeof(resa_dev_entry) * s.dev.size()));
    CK(cudaMemcpy(s.dent, s.dev.data(), sizeof(resa_dev_entry) * s.dev.size(), cudaMemcpyHostToDevice));
    std::vector<int32_t> ids(s.max_seqs);
    for (int i = 0; i < s.max_seqs; i++)
        ids[i] = i;
    CK(cudaMalloc(&s.dids, sizeof(int32_t) * ids.size()));
    CK(cudaMemcpy(s.dids, ids.data(), sizeof(int32_t) * ids.size(), cudaMemcpyHostToDevice));

    resa_cuda_layer_args &a = s.a;
    memset(&a, 0, sizeof a);
    int dev = 0, sms = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    a.dims.n_layers = 1;
    a.dims.hq = s.hq;
    a.dims.hkv = s.hkv;
    a.dims.group = s.g;
    a.dims.d = s.d;
    a.dims.b = s.b;
    a.dims.log2_b = s.log2_b;
    a.dims.n_pages = s.n_pages;
    a.dims.max_seqs = s.max_seqs;
    a.dims.max_seq_blocks = s.max_seq_blocks;
    a.dims.sel_words = (s.max_seq_blocks + 31) / 32;
    a.dims.kv_dtype = s.dtype;
    a.dims.max_step_tokens = s.n_rows;
    a.dims.num_sms = sms;
    size_t ws = resa_cuda_dense_workspace(&a.dims);
    CK(cudaMalloc(&s.dws, ws));
    CK(cudaMemset(s.dws, 0xFF, ws)); // NaN garbage: a read of an unwritten partial shows
    a.k = s.dk;
    a.v = s.dv;
    a.page_tables = s.dtab;
    a.entries = s.dent;
    a.n_entries = s.max_seqs;
    a.dense_ids = s.dids;
    a.n_dense = s.max_seqs;
    a.n_rows = s.n_rows;
    a.scale = 1.0f / sqrtf((float)s.d);
    a.q = s.dq;
    a.out = s.dout;
    a.ws_dense = s.dws;
    a.stream = 0;
}

static void teardown(Setup &s)
{
    void *ptrs[] = {s.dk, s.dv, s.dq, s.dout, s.dws, s.dtab, s.dids, s.dent};
    for (void *p : ptrs)
        CK(cudaFree(p));
}

// float64 reference of (entry, token t, head h) into ref[d]
static void reference(const Setup &s, int ei, int t, int h, double *ref, std::vector<double> &sc)
{
    const Ent &e = s.ents[ei];
    const int d = s.d, kvh = h / s.g;
    const int64_t pos = e.start + t;
    const int64_t row = s.dev[ei].row + t;
    const bool dec = !s.hk.empty();
    auto kv = [&](uint64_t i, int is_v) -> double {
        if (dec)
            return is_v ? s.hv[i] : s.hk[i];
        return from_bits(to_bits(hval(s.seed, 2 * i + is_v), s.dtype), s.dtype);
    };
    std::vector<double> q(d);
    for (int i = 0; i < d; i++) {
        uint64_t qi = ((uint64_t)row * s.hq + h) * d + i;
        q[i] = dec ? s.hqv[qi] : from_bits(to_bits(s.qs * hval(s.seed + 7, qi), s.dtype), s.dtype);
    }
    sc.resize(pos + 1);
    double mx = -1e300;
    const double scale = 1.0 / std::sqrt((double)d);
    for (int64_t p = 0; p <= pos; p++) {
        int32_t page = s.tables[(size_t)ei * s.max_seq_blocks + (p >> s.log2_b)];
        uint64_t base = (((uint64_t)page * s.hkv + kvh) * s.b + (p & (s.b - 1))) * d;
        double acc = 0;
        for (int i = 0; i < d; i++)
            acc += q[i] * kv(base + i, 0);
        sc[p] = acc * scale;
        mx = std::max(mx, sc[p]);
    }
    double l = 0;
    for (int i = 0; i < d; i++)
        ref[i] = 0;
    for (int64_t p = 0; p <= pos; p++) {
        double w = std::exp(sc[p] - mx);
        l += w;
        int32_t page = s.tables[(size_t)ei * s.max_seq_blocks + (p >> s.log2_b)];
        uint64_t base = (((uint64_t)page * s.hkv + kvh) * s.b + (p & (s.b - 1))) * d;
        for (int i = 0; i < d; i++)
            ref[i] += w * kv(base + i, 1);
    }
    for (int i = 0; i < d; i++)
        ref[i] /= l;
}

// Runs one configuration; returns true when it passes.
// Copies the pool and q back and decodes them (in parallel) for the reference.
static void decode_all(Setup &s)
{
    const size_t kv_elems = (size_t)s.n_pages * s.hkv * s.b * s.d;
    const size_t q_elems = (size_t)s.n_rows * s.hq * s.d;
    std::vector<uint16_t> k(kv_elems), v(kv_elems), q(q_elems);
    CK(cudaMemcpy(k.data(), s.dk, kv_elems * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(v.data(), s.dv, kv_elems * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(q.data(), s.dq, q_elems * 2, cudaMemcpyDeviceToHost));
    s.hk.resize(kv_elems);
    s.hv.resize(kv_elems);
    s.hqv.resize(q_elems);
    const int nt = std::max(1u, std::thread::hardware_concurrency());
    std::vector<std::thread> th;
    for (int w = 0; w < nt; w++)
        th.emplace_back([&, w] {
            for (size_t i = kv_elems * w / nt; i < kv_elems * (w + 1) / nt; i++) {
                s.hk[i] = (float)from_bits(k[i], s.dtype);
                s.hv[i] = (float)from_bits(v[i], s.dtype);
            }
            for (size_t i = q_elems * w / nt; i < q_elems * (w + 1) / nt; i++)
                s.hqv[i] = (float)from_bits(q[i], s.dtype);
        });
    for (auto &t : th)
        t.join();
}

static bool check_one(Setup &s, const char *label)
{
    setup(s);
    decode_all(s);
    const size_t out_elems = (size_t)s.n_rows * s.hq * s.d;
    const int np = n_paths(s.d);
    std::vector<std::vector<uint16_t>> out(np, std::vector<uint16_t>(out_elems));
    size_t nan_count[kPaths] = {0, 0, 0};
    for (int path = 0; path < np; path++) {
        use_path(path);
        CK(cudaMemset(s.dout, 0xFF, out_elems * 2)); // NaN poison
        CK(cudaMemset(s.dws, 0xFF, resa_cuda_dense_workspace(&s.a.dims)));
        CK(resa_cuda_attention_dense(&s.a));
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(out[path].data(), s.dout, out_elems * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < out_elems; i++)
            if (std::isnan(from_bits(out[path][i], s.dtype)))
                nan_count[path]++;
    }
    // sampled tokens: all for short entries, else first, last and 4 random
    std::vector<std::pair<int, int>> items; // (entry, token)
    for (int ei = 0; ei < (int)s.ents.size(); ei++) {
        const Ent &e = s.ents[ei];
        if ((double)e.n * (e.start + e.n) * s.hq * s.d < 4e8) {
            for (int t = 0; t < e.n; t++)
                items.push_back({ei, t});
        } else {
            items.push_back({ei, 0});
            items.push_back({ei, e.n - 1});
            for (int k = 0; k < 4; k++)
                items.push_back({ei, (int)(rnd() % e.n)});
        }
    }
    const int nthreads = std::max(1u, std::thread::hardware_concurrency());
    std::vector<double> num(kPaths * nthreads, 0), den(nthreads, 0);
    std::vector<std::thread> th;
    const size_t jobs = items.size() * s.hq;
    for (int w = 0; w < nthreads; w++)
        th.emplace_back([&, w] {
            std::vector<double> ref(s.d), sc;
            for (size_t j = w; j < jobs; j += nthreads) {
                const auto &it = items[j / s.hq];
                const int h = (int)(j % s.hq);
                reference(s, it.first, it.second, h, ref.data(), sc);
                const size_t at = ((size_t)(s.dev[it.first].row + it.second) * s.hq + h) * s.d;
                for (int i = 0; i < s.d; i++) {
                    for (int path = 0; path < np; path++) {
                        double got = from_bits(out[path][at + i], s.dtype);
                        double diff = got - ref[i];
                        num[kPaths * w + path] += std::isnan(got) ? 1e30 : diff * diff;
                    }
                    den[w] += ref[i] * ref[i];
                }
            }
        });
    for (auto &t : th)
        t.join();
    bool ok_all = true;
    for (int path = 0; path < np; path++) {
        double n2 = 0, d2 = 0;
        for (int w = 0; w < nthreads; w++) {
            n2 += num[kPaths * w + path];
            d2 += den[w];
        }
        const double rel = std::sqrt(n2 / d2);
        const bool ok = nan_count[path] == 0 && rel < 1e-2;
        g_worst[path] = std::max(g_worst[path], std::isnan(rel) ? 1e30 : rel);
        ok_all = ok_all && ok;
        printf("%-4s %-8s %-46s d=%3d g=%2d hkv=%d b=%2d rows=%6lld  rel_l2=%.2e nan=%zu\n",
               ok ? "ok" : "FAIL", PATH_NAME[path], label, s.d, s.g, s.hkv, s.b,
               (long long)s.n_rows, rel, nan_count[path]);
    }
    teardown(s);
    return ok_all;
}

static int run_checks(bool quick)
{
    int fails = 0, total = 0;
    const std::vector<Ent> mixed = {{0, 1}, {0, 37}, {0, 1000}, {5000, 32}, {70000, 32}, {300, 2048}};
    const std::vector<Ent> rect = {{5000, 32}, {70000, 32}, {100, 32}, {31, 32}, {4096, 32}};
    const std::vector<Ent> small = {{0, 1}, {0, 37}, {17, 5}, {1000, 32}};
    // 8 rectifications at contexts off the 16-token grid; prefill chunks at odd
    // offsets (row counts off the 128 grid for every g)
    const std::vector<Ent> rect8 = {{4999, 32}, {70001, 32}, {100, 32}, {31, 32},
                                    {12345, 32}, {40000, 32}, {7, 32}, {2047, 32}};
    const std::vector<Ent> chunks = {{1000, 300}, {4077, 517}, {0, 129}, {33, 1}, {9001, 64}};
    auto one = [&](int dtype, int d, int g, int b, int hkv, const std::vector<Ent> &ents,
                   const char *name) {
        Setup s;
        s.dtype = dtype;
        s.d = d;
        s.g = g;
        s.b = b;
        s.hkv = hkv;
        s.ents = ents;
        s.seed = rnd();
        s.qs = 2.0f;
        char label[96];
        snprintf(label, sizeof label, "%s %s", dtype == RESA_DTYPE_BF16 ? "bf16" : "f16 ", name);
        total++;
        if (!check_one(s, label))
            fails++;
    };
    if (quick) {
        one(RESA_DTYPE_BF16, 128, 4, 16, 2, small, "small");
        one(RESA_DTYPE_F16, 128, 7, 16, 1, rect, "rectify (split-KV)");
        one(RESA_DTYPE_F16, 64, 7, 16, 2, rect, "rectify");
        one(RESA_DTYPE_BF16, 256, 8, 16, 1, rect, "rectify, d 256");
    } else {
        for (int dtype : {RESA_DTYPE_BF16, RESA_DTYPE_F16})
            for (int d : {64, 128, 256})
                for (int g : {1, 2, 4, 7, 8, 16})
                    one(dtype, d, g, 16, 2, mixed, "mixed (0,1)..(70000,32),(300,2048)");
        for (int b : {8, 32, 64})
            one(RESA_DTYPE_BF16, 128, 4, b, 2, mixed, "mixed, other block size");
        for (int dtype : {RESA_DTYPE_BF16, RESA_DTYPE_F16})
            for (int d : {64, 128, 256})
                for (int g : {1, 4, 7})
                    one(dtype, d, g, 16, 2, rect, "rectify x5 (split-KV)");
        one(RESA_DTYPE_BF16, 128, 4, 16, 8, rect, "rectify x5, hkv 8");
        for (int dtype : {RESA_DTYPE_BF16, RESA_DTYPE_F16}) {
            one(dtype, 128, 4, 16, 8, rect8, "rectify x8, 32/8 heads");
            one(dtype, 128, 7, 16, 4, rect8, "rectify x8, 28/4 heads");
            one(dtype, 128, 4, 16, 2, chunks, "prefill chunks + decode-size entries");
            one(dtype, 128, 7, 16, 4, chunks, "prefill chunks, 28/4 heads");
            one(dtype, 128, 4, 16, 1, {{100003, 32}}, "one rectification, 64 splits");
            // d = 256 on the wgmma kernel (64-key tiles, 3 K + 2 V slots): the 16/2 shape
            one(dtype, 256, 8, 16, 2, rect8, "rectify x8, 16/2 heads");
            one(dtype, 256, 8, 16, 2, chunks, "prefill chunks, 16/2 heads");
        }
        one(RESA_DTYPE_BF16, 128, 7, 8, 4, rect8, "rectify x8, 28/4 heads, b 8");
        one(RESA_DTYPE_BF16, 128, 4, 64, 8, chunks, "prefill chunks, b 64");
        // TMA boxes of a whole tile inside one page (b >= 128), and b < 8
        // (no TMA: every tile by cp.async)
        one(RESA_DTYPE_BF16, 128, 7, 128, 4, rect8, "rectify x8, 28/4 heads, b 128");
        one(RESA_DTYPE_F16, 128, 4, 256, 2, chunks, "prefill chunks, b 256");
        one(RESA_DTYPE_BF16, 128, 4, 4, 2, chunks, "prefill chunks, b 4");
        // d = 256 with boxes of 8, 64 (= a tile) and 128 (> a tile) rows, and b 4
        one(RESA_DTYPE_BF16, 256, 8, 8, 2, rect8, "rectify x8, 16/2 heads, b 8");
        one(RESA_DTYPE_F16, 256, 4, 64, 4, chunks, "prefill chunks, d 256, b 64");
        one(RESA_DTYPE_BF16, 256, 8, 128, 2, rect8, "rectify x8, 16/2 heads, b 128");
        one(RESA_DTYPE_BF16, 256, 2, 4, 2, chunks, "prefill chunks, d 256, b 4");
    }
    printf("checks: %d/%d passed (cases; d = 128 and 256 ones on %d path(s)); worst rel_l2 mma %.2e",
           total - fails, total, g_wgmma ? kPaths : 1, g_worst[0]);
    if (g_wgmma)
        printf(", wgmma %.2e, wgmma-cp %.2e", g_worst[1], g_worst[2]);
    printf("\n");
    return fails;
}

// ---- timing ----
static float time_it(Setup &s, int reps = 20)
{
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 3; i++)
        CK(resa_cuda_attention_dense(&s.a));
    CK(cudaDeviceSynchronize());
    std::vector<float> ts;
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(e0));
        CK(resa_cuda_attention_dense(&s.a));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return ts[ts.size() / 2];
}

static void run_timing()
{
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("\ntiming on %s (%d SMs), median of 20 after 3 warm-ups, bf16, b 16, d 128 unless named\n", prop.name,
           prop.multiProcessorCount);
    struct tcase {
        const char *name;
        int hq, hkv;
        std::vector<Ent> ents;
        int d = 128;
    };
    auto rect = [](int batch, int64_t len) { return std::vector<Ent>(batch, Ent{len - 32, 32}); };
    const std::vector<tcase> cases = {
        {"rectify 1x32K 32/8", 32, 8, rect(1, 32768)},
        {"rectify 8x32K 32/8", 32, 8, rect(8, 32768)},
        {"rectify 1x256K 32/8", 32, 8, rect(1, 262144)},
        {"rectify 8x256K 32/8", 32, 8, rect(8, 262144)},
        {"rectify 8x256K 28/4", 28, 4, rect(8, 262144)},
        {"prefill 2048 at 30K..32K 32/8", 32, 8, {{30720, 2048}}},
        {"prefill 8192 at 0 32/8", 32, 8, {{0, 8192}}},
        {"rectify 8x256K 16/2 d256", 16, 2, rect(8, 262144), 256},
        {"prefill 2048 at 30K 16/2 d256", 16, 2, {{30720, 2048}}, 256},
    };
    printf("%-30s %-5s %9s %8s %9s %9s\n", "case", "path", "time_us", "TB/s", "TFLOP/s", "rel_l2");
    std::vector<std::string> summary;
    // DH_TIME_CASES: comma-separated substrings, a case runs if its name holds
    // one (default all); DH_TIME_PATHS=wgmma times the wgmma paths alone
    const char *only = getenv("DH_TIME_CASES");
    const char *tp = getenv("DH_TIME_PATHS");
    const int first_path = tp && !strcmp(tp, "wgmma") && g_wgmma ? 1 : 0;
    auto wanted = [&](const char *name) {
        if (!only || !*only)
            return true;
        std::string list = only;
        size_t at = 0;
        while (at <= list.size()) {
            size_t end = list.find(',', at);
            if (end == std::string::npos)
                end = list.size();
            const std::string item = list.substr(at, end - at);
            if (!item.empty() && strstr(name, item.c_str()))
                return true;
            at = end + 1;
        }
        return false;
    };
    for (const tcase &c : cases) {
        if (!wanted(c.name))
            continue;
        const int d = c.d;
        Setup s;
        s.dtype = RESA_DTYPE_BF16;
        s.d = d;
        s.g = c.hq / c.hkv;
        s.b = 16;
        s.hkv = c.hkv;
        s.seed = rnd();
        s.qs = 2.0f;
        s.ents = c.ents;
        setup(s);
        double bytes = 2.0 * s.n_rows * c.hq * d * 2, flop = 0;
        for (const Ent &e : c.ents) {
            bytes += (double)(e.start + e.n) * c.hkv * d * 2 * 2;
            for (int t = 0; t < e.n; t++)
                flop += 4.0 * c.hq * d * (double)(e.start + t + 1);
        }
        float ms_path[3] = {0, 0, 0};
        for (int path = first_path; path < n_paths(d); path++) {
            use_path(path);
            CK(cudaMemset(s.dout, 0xFF, (size_t)s.n_rows * s.hq * d * 2));
            const float ms = ms_path[path] = time_it(s);
            // sanity: last token of the first entry, first and last head
            std::vector<uint16_t> out((size_t)s.n_rows * s.hq * d);
            CK(cudaMemcpy(out.data(), s.dout, out.size() * 2, cudaMemcpyDeviceToHost));
            double n2 = 0, d2 = 0;
            std::vector<double> ref(d), sc;
            const int t = c.ents[0].n - 1;
            for (int h : {0, c.hq - 1}) {
                reference(s, 0, t, h, ref.data(), sc);
                for (int i = 0; i < d; i++) {
                    double got = from_bits(out[((size_t)t * c.hq + h) * d + i], s.dtype);
                    n2 += std::isnan(got) ? 1e30 : (got - ref[i]) * (got - ref[i]);
                    d2 += ref[i] * ref[i];
                }
            }
            printf("%-30s %-8s %9.1f %8.2f %9.1f %9.1e\n", c.name, PATH_NAME[path], ms * 1e3,
                   bytes / (ms * 1e-3) / 1e12, flop / (ms * 1e-3) / 1e12, std::sqrt(n2 / d2));
        }
        char line[160];
        auto tf = [&](int path) {
            return ms_path[path] > 0 ? flop / (ms_path[path] * 1e-3) / 1e12 : 0.0;
        };
        snprintf(line, sizeof line, "%-30s %9.1f %7.1f %9.1f %7.1f %9.1f %7.1f %7.2fx", c.name,
                 ms_path[0] * 1e3, tf(0), ms_path[1] * 1e3, tf(1), ms_path[2] * 1e3, tf(2),
                 ms_path[1] > 0 ? ms_path[0] / ms_path[1] : 0.0);
        summary.push_back(line);
        teardown(s);
    }
    printf("\n%-30s %9s %7s %9s %7s %9s %7s %8s\n", "case (us, TFLOP/s)", "mma", "TF", "wgmma",
           "TF", "wgmma-cp", "TF", "speedup");
    for (const auto &l : summary)
        printf("%s\n", l.c_str());
}

int main(int argc, char **argv)
{
    const std::string mode = argc > 1 ? argv[1] : "all";
    int major = 0, minor = 0;
    CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
    CK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
    g_wgmma = resa_cuda_dense_sm90_built() && major == 9 && minor == 0;
    printf("compute capability %d.%d, wgmma path built: %d -> paths: mma%s\n", major, minor,
           (int)resa_cuda_dense_sm90_built(), g_wgmma ? " + wgmma" : " only");
    int fails = 0;
    if (mode == "check" || mode == "all")
        fails += run_checks(false);
    if (mode == "quick")
        fails += run_checks(true);
    if (mode == "time" || mode == "all")
        run_timing();
    return fails ? 1 : 0;
}
