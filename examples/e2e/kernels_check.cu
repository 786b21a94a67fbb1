// SPDX-License-Identifier: MIT
// resa-e2e: a start-up check of the model's small kernels (RoPE with its
// bias, residual add + RMSNorm with and without the add, SwiGLU, greedy
// argmax) against float64 references on the host, on random inputs at the
// model's sizes, outputs poisoned with NaN.
// The timings mean nothing if these are wrong, and random weights would not
// show it in the generated tokens.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels_check.h"

namespace {

// Deterministic values in [-1, 1) (host only; the check needs no GPU RNG).
struct Rng {
    uint64_t s;
    double next()
    {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return (double)(s >> 11) * (2.0 / 9007199254740992.0) - 1.0;
    }
};

std::vector<bf16> random_bf16(size_t n, Rng &r, double amp)
{
    std::vector<bf16> v(n);
    for (bf16 &x : v)
        x = __float2bfloat16((float)(amp * r.next()));
    return v;
}

double f64(bf16 x) { return (double)__bfloat162float(x); }

template <typename T> T *to_device(const std::vector<T> &h)
{
    T *d = nullptr;
    CK(cudaMalloc(&d, h.size() * sizeof(T)));
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <typename T> T *poisoned(size_t n) // NaN in bf16 and in fp32
{
    T *d = nullptr;
    CK(cudaMalloc(&d, n * sizeof(T)));
    CK(cudaMemset(d, 0xFF, n * sizeof(T)));
    return d;
}
template <typename T> std::vector<T> to_host(const T *d, size_t n)
{
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

// Relative L2 error of got against ref (NaN counts as a failure).
struct Err {
    double num = 0, den = 0;
    bool nan = false;
    void add(double got, double ref)
    {
        if (std::isnan(got))
            nan = true;
        num += (got - ref) * (got - ref);
        den += ref * ref;
    }
    double rel() const { return nan ? INFINITY : std::sqrt(num / (den > 0 ? den : 1)); }
};

void verdict(const char *what, const Err &e, double tol)
{
    if (!(e.rel() <= tol)) {
        std::fprintf(stderr, "resa-e2e: kernel self-check failed: %s, relative L2 error %.3e "
                             "(tolerance %.1e)%s\n",
                     what, e.rel(), tol, e.nan ? ", NaN in the output" : "");
        std::exit(1);
    }
}

// bf16 outputs of fp32 math: rounding alone is ~2^-9 relative.
constexpr double kTol = 1e-2;

double check_rope(const ModelDims &D, cudaStream_t s, Rng &r)
{
    const int heads = D.hq + 2 * D.hkv, d = D.d, half = d / 2;
    const std::vector<int> pos = {0, 1, 4097, 131071, 262143, 1000003};
    const int rows = (int)pos.size();
    const std::vector<bf16> qkv = random_bf16((size_t)rows * heads * d, r, 2.0);
    const std::vector<bf16> bias = random_bf16((size_t)heads * d, r, 0.1);
    std::vector<double> inv(half);
    rope_inv_freq(inv.data(), d, D.rope_theta);
    bf16 *dqkv = to_device(qkv), *dbias = to_device(bias);
    int *dpos = to_device(pos);
    double *dinv = to_device(inv);
    bf16 *dq = poisoned<bf16>((size_t)rows * D.hq * d), *dk = poisoned<bf16>((size_t)rows * D.hkv * d),
         *dv = poisoned<bf16>((size_t)rows * D.hkv * d);
    launch_bias_rope(dqkv, dbias, dpos, dinv, dq, dk, dv, rows, D.hq, D.hkv, d, s);
    CK(cudaStreamSynchronize(s));
    const std::vector<bf16> q = to_host(dq, (size_t)rows * D.hq * d),
                            k = to_host(dk, (size_t)rows * D.hkv * d),
                            v = to_host(dv, (size_t)rows * D.hkv * d);
    Err e;
    for (int row = 0; row < rows; row++)
        for (int h = 0; h < heads; h++)
            for (int j = 0; j < half; j++) {
                const size_t at = ((size_t)row * heads + h) * d;
                const double x1 = f64(qkv[at + j]) + f64(bias[(size_t)h * d + j]);
                const double x2 = f64(qkv[at + j + half]) + f64(bias[(size_t)h * d + j + half]);
                // the full angle in double, reduced by the C library
                const double ang = pos[row] * std::pow(D.rope_theta, -2.0 * j / d);
                const double c = h < D.hq + D.hkv ? std::cos(ang) : 1.0;
                const double sn = h < D.hq + D.hkv ? std::sin(ang) : 0.0;
                const bf16 *out = h < D.hq ? &q[((size_t)row * D.hq + h) * d]
                                  : h < D.hq + D.hkv ? &k[((size_t)row * D.hkv + h - D.hq) * d]
                                                     : &v[((size_t)row * D.hkv + h - D.hq - D.hkv) * d];
                e.add(f64(out[j]), x1 * c - x2 * sn);
                e.add(f64(out[j + half]), x2 * c + x1 * sn);
            }
    for (void *p : {(void *)dqkv, (void *)dbias, (void *)dpos, (void *)dinv, (void *)dq, (void *)dk,
                    (void *)dv})
        CK(cudaFree(p));
    verdict("bias + RoPE", e, kTol);
    return e.rel();
}

double check_rmsnorm(const ModelDims &D, cudaStream_t s, Rng &r)
{
    const int rows = 3, n = D.hidden;
    std::vector<float> x((size_t)rows * n);
    for (float &v : x)
        v = (float)(3.0 * r.next());
    const std::vector<bf16> delta = random_bf16((size_t)rows * n, r, 1.0);
    const std::vector<bf16> gamma = random_bf16(n, r, 1.0);
    float *dx = to_device(x);
    bf16 *ddelta = to_device(delta), *dgamma = to_device(gamma);
    bf16 *dxn = poisoned<bf16>((size_t)rows * n);
    // without delta first (x must stay as it is), then with it
    bf16 *dxn0 = poisoned<bf16>((size_t)rows * n);
    launch_add_rmsnorm(dx, nullptr, dgamma, dxn0, rows, n, (float)D.eps, s);
    CK(cudaStreamSynchronize(s));
    const std::vector<float> x0 = to_host(dx, x.size());
    const std::vector<bf16> xn0 = to_host(dxn0, x.size());
    launch_add_rmsnorm(dx, ddelta, dgamma, dxn, rows, n, (float)D.eps, s);
    CK(cudaStreamSynchronize(s));
    const std::vector<float> xo = to_host(dx, x.size());
    const std::vector<bf16> xn = to_host(dxn, x.size());
    // the float64 reference of one launch: x (+ delta when given) and its norm
    Err ex, en;
    auto expect = [&](const std::vector<float> &x_out, const std::vector<bf16> &xn_out,
                      bool with_delta) {
        for (int row = 0; row < rows; row++) {
            double ss = 0;
            std::vector<double> sum(n);
            for (int i = 0; i < n; i++) {
                const size_t at = (size_t)row * n + i;
                sum[i] = (double)x[at] + (with_delta ? f64(delta[at]) : 0.0);
                ss += sum[i] * sum[i];
            }
            const double inv = 1.0 / std::sqrt(ss / n + D.eps);
            for (int i = 0; i < n; i++) {
                ex.add((double)x_out[(size_t)row * n + i], sum[i]);
                en.add(f64(xn_out[(size_t)row * n + i]), sum[i] * inv * f64(gamma[i]));
            }
        }
    };
    expect(x0, xn0, false);
    expect(xo, xn, true);
    CK(cudaFree(dxn0));
    for (void *p : {(void *)dx, (void *)ddelta, (void *)dgamma, (void *)dxn})
        CK(cudaFree(p));
    verdict("residual add", ex, 1e-6);
    verdict("RMSNorm", en, kTol);
    return std::max(ex.rel(), en.rel());
}

// Greedy sampling: random logits with the row maximum planted twice (the
// lower index must win) and a NaN (it must never win), at the vocabulary
// size (16-byte path) and one more (single-logit path); pos advanced.
// Returns the number of rows checked; exits on a mismatch.
int check_argmax(const ModelDims &D, cudaStream_t s, Rng &r)
{
    int checked = 0;
    for (int vocab : {D.vocab, D.vocab + 1}) {
        const int rows = 5;
        std::vector<float> lg((size_t)rows * vocab);
        for (float &v : lg)
            v = (float)(10.0 * r.next());
        std::vector<int> want(rows), pos0(rows);
        for (int row = 0; row < rows; row++) {
            float *l = &lg[(size_t)row * vocab];
            const int a = (int)((0.5 + 0.5 * r.next()) * (vocab - 1));
            const int b = (int)((0.5 + 0.5 * r.next()) * (vocab - 1));
            const int nan_at = (int)((0.5 + 0.5 * r.next()) * (vocab - 1));
            l[a] = l[b] = 11.0f;
            if (nan_at != a && nan_at != b)
                l[nan_at] = NAN;
            want[row] = std::min(a, b);
            pos0[row] = 1000 * row;
        }
        float *dl = to_device(lg);
        int *dpos = to_device(pos0), *dtok = poisoned<int>(rows);
        launch_argmax(dl, rows, vocab, dtok, dpos, 3, s);
        CK(cudaStreamSynchronize(s));
        const std::vector<int> tok = to_host(dtok, rows), pos = to_host(dpos, rows);
        for (int row = 0; row < rows; row++)
            if (tok[row] != want[row] || pos[row] != pos0[row] + 3) {
                std::fprintf(stderr, "resa-e2e: kernel self-check failed: argmax of row %d "
                                     "(vocab %d) gave %d (position %d), expected %d (%d)\n",
                             row, vocab, tok[row], pos[row], want[row], pos0[row] + 3);
                std::exit(1);
            }
        for (void *p : {(void *)dl, (void *)dpos, (void *)dtok})
            CK(cudaFree(p));
        checked += rows;
    }
    return checked;
}

double check_swiglu(const ModelDims &D, cudaStream_t s, Rng &r)
{
    const int rows = 3, n = D.inter;
    const std::vector<bf16> gu = random_bf16((size_t)rows * 2 * n, r, 4.0);
    bf16 *dgu = to_device(gu), *dact = poisoned<bf16>((size_t)rows * n);
    launch_swiglu(dgu, dact, rows, n, s);
    CK(cudaStreamSynchronize(s));
    const std::vector<bf16> act = to_host(dact, (size_t)rows * n);
    Err e;
    for (int row = 0; row < rows; row++)
        for (int i = 0; i < n; i++) {
            const double g = f64(gu[(size_t)row * 2 * n + i]), u = f64(gu[(size_t)row * 2 * n + n + i]);
            e.add(f64(act[(size_t)row * n + i]), g / (1.0 + std::exp(-g)) * u);
        }
    CK(cudaFree(dgu));
    CK(cudaFree(dact));
    verdict("SwiGLU", e, kTol);
    return e.rel();
}

} // namespace

void check_small_kernels(const ModelDims &D, cudaStream_t s)
{
    Rng r{0x5eed ^ kSeed};
    const double rope = check_rope(D, s, r), norm = check_rmsnorm(D, s, r),
                 swiglu = check_swiglu(D, s, r);
    const int argmax_rows = check_argmax(D, s, r);
    std::printf("# kernel self-check against float64: bias+RoPE %.1e (positions up to 1000003), "
                "add+RMSNorm %.1e, SwiGLU %.1e (relative L2 error); argmax exact on %d rows "
                "(planted ties and NaN)\n",
                rope, norm, swiglu, argmax_rows);
}
