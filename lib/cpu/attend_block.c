/* SPDX-License-Identifier: MIT */
/*
 * The online-softmax update of a tile of query rows with one block of keys
 * and values: the inner loop of every CPU attention (dense tiles, sparse
 * decode).  Written as fixed-width loops that compilers vectorize, and
 * compiled twice (baseline x86-64 and x86-64-v3 with AVX2/FMA, picked at load
 * time by the ifunc resolver) so one portable binary runs fast on current CPUs.
 *
 * Per block:  S = Q K^T (4 query rows x 16 keys register tiles on a
 * transposed K),  m' = max(m, rowmax S),  P = exp(S - m'),
 * l' = l e^(m - m') + rowsum P,  acc' = acc e^(m - m') + P V.
 *
 * Non-finite values (docs/API.md, "Non-finite values"): a row reads only the
 * keys it attends.  Masked keys (the causal mask, limit[r]) get P = 0 and are
 * left out of the P V sum altogether, because 0 times a NaN or infinite value
 * is NaN: a poisoned V of a later token must not reach earlier rows.  Keys a
 * row attends always enter the sum, so a NaN or infinite value there makes
 * the row non-finite (even where its weight underflowed to 0).  A NaN score
 * is kept NaN (never mistaken for a small weight); a score of -inf weighs 0,
 * and a row whose every score is -inf is 0/0 = NaN, as on the GPU.
 */
#include <math.h>
#include <string.h>

#include "cpu.h"

/* Not under gcc's ThreadSanitizer: its instrumented ifunc resolver runs at
 * relocation, before the TSan runtime is up, and crashes the process. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__gnu_linux__) && !defined(__SANITIZE_THREAD__)
#  define RESA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#  define RESA_MULTIVERSION
#endif

/* Eight floats: a GNU C vector, lowered to one AVX or two SSE registers. */
typedef float v8f __attribute__((vector_size(32)));
static inline v8f v8_load(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void v8_store(float *p, v8f v)
{
    memcpy(p, &v, sizeof v);
}
static inline v8f v8_splat(float x)
{
    /* GCC expands an initializer list of x (and -0 + x, which folds into
     * one) to a chain of inserts; +0 + x does not fold (it would turn -0 into
     * +0) and compiles to one add and one broadcast. */
    v8f zero = {0};
    return zero + x;
}

#define KC 16 /* keys per register tile */
#define RC 4  /* query rows per register tile */

/* e^x for x <= 0, relative error ~1e-7: x = (r + f) ln2, r integer, |f| <= 1/2,
 * e^(f ln2) by its degree-7 Taylor polynomial.  Branch-free so it vectorizes.
 * x < -87 (e^x below ~1.6e-38, and -inf) gives 0, NaN gives NaN.  The integer r
 * comes from a clamped copy of t = x log2 e that a NaN cannot reach (converting
 * a NaN to int, and shifting the negative result, is undefined behaviour),
 * while the polynomial sees t itself, so that a NaN comes out as NaN.  One
 * compare and select more than an exp without these cases. */
static inline float exp_nonpos(float x)
{
    float t = x * 1.44269504088896341f;
    float tc = t >= -125.5f ? t : -125.5f; /* x >= -87; NaN and -inf: -125.5 */
    float r = (tc + 12582912.0f) - 12582912.0f; /* round to nearest integer, in [-126, 0] */
    float y = (t - r) * 0.693147180559945309f;
    float p = 1.0f + y * (1.0f + y * (0.5f + y * (1.0f / 6 + y * (1.0f / 24 + y * (1.0f / 120 +
              y * (1.0f / 720 + y * (1.0f / 5040)))))));
    uint32_t e = (uint32_t)((int32_t)r + 127) << 23; /* 2^r: exponent field 1 .. 127 */
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

RESA_MULTIVERSION
void resa_cpu_attend_block(const float *q, int32_t rows, int32_t d, const float *kt,
                           const float *vt, int32_t n, const int32_t *limit,
                           resa_cpu_scratch *sc)
{
    int32_t n_pad = (n + KC - 1) / KC * KC;
    float *kT = sc->ktr; /* [d][n_pad], zero padded */
    for (int32_t i = 0; i < d; i++) {
        for (int32_t j = 0; j < n; j++)
            kT[(size_t)i * n_pad + j] = kt[(size_t)j * d + i];
        for (int32_t j = n; j < n_pad; j++)
            kT[(size_t)i * n_pad + j] = 0.0f;
    }
    float *s = sc->s; /* [rows][n_pad] */

    /* S = Q K^T, with 4 rows x 16 keys of accumulators in registers */
    for (int32_t c = 0; c < n_pad; c += KC) {
        int32_t r = 0;
        for (; r + RC <= rows; r += RC) {
            v8f acc[RC][2];
            for (int32_t u = 0; u < RC; u++)
                acc[u][0] = acc[u][1] = v8_splat(0.0f);
            for (int32_t i = 0; i < d; i++) {
                const float *kr = kT + (size_t)i * n_pad + c;
                v8f k0 = v8_load(kr), k1 = v8_load(kr + 8);
                for (int32_t u = 0; u < RC; u++) {
                    v8f qv = v8_splat(q[(size_t)(r + u) * d + i]);
                    acc[u][0] += qv * k0;
                    acc[u][1] += qv * k1;
                }
            }
            for (int32_t u = 0; u < RC; u++) {
                v8_store(s + (size_t)(r + u) * n_pad + c, acc[u][0]);
                v8_store(s + (size_t)(r + u) * n_pad + c + 8, acc[u][1]);
            }
        }
        for (; r < rows; r++) {
            v8f a0 = v8_splat(0.0f), a1 = v8_splat(0.0f);
            for (int32_t i = 0; i < d; i++) {
                const float *kr = kT + (size_t)i * n_pad + c;
                v8f qv = v8_splat(q[(size_t)r * d + i]);
                a0 += qv * v8_load(kr);
                a1 += qv * v8_load(kr + 8);
            }
            v8_store(s + (size_t)r * n_pad + c, a0);
            v8_store(s + (size_t)r * n_pad + c + 8, a1);
        }
    }

    /* online softmax: P in place of S, masked keys get 0 (and stay out of P V) */
    float corr[RESA_CPU_MAX_TILE_ROWS];
    int32_t nvis[RESA_CPU_MAX_TILE_ROWS]; /* keys row r attends: [0, nvis[r]) */
    for (int32_t r = 0; r < rows; r++) {
        int32_t nv = limit ? limit[r] : n;
        nv = nv < 0 ? 0 : nv > n ? n : nv;
        nvis[r] = nv;
        float *sr = s + (size_t)r * n_pad;
        float mx = -INFINITY;
        for (int32_t j = 0; j < nv; j++)
            mx = sr[j] > mx ? sr[j] : mx; /* NaN scores are not maxima (fmaxf's rule) */
        if (nv <= 0) {
            corr[r] = 1.0f;
            for (int32_t j = 0; j < n_pad; j++)
                sr[j] = 0.0f;
            continue;
        }
        float m_new = mx > sc->m[r] ? mx : sc->m[r];
        /* no finite score yet: weigh against 0, so that e^(-inf - ref) is 0, not NaN */
        float ref = m_new == -INFINITY ? 0.0f : m_new;
        corr[r] = exp_nonpos(sc->m[r] - ref);
        if (sc->m[r] == -INFINITY)
            corr[r] = 0.0f;
        float sum = 0.0f;
        for (int32_t j = 0; j < n_pad; j++) {
            float p = j < nv ? exp_nonpos(sr[j] - ref) : 0.0f;
            sr[j] = p;
            sum += p;
        }
        sc->l[r] = sc->l[r] * corr[r] + sum;
        sc->m[r] = m_new;
    }

    /* acc = acc * corr + P V, in 16-wide column strips of 4 rows.  Row r sums
     * keys t < nvis[r] only: keys every row of the strip attends go through
     * the plain loop, the few the causal mask cuts (one block per tile) are
     * added row by row. */
    int32_t c = 0;
    for (; c + KC <= d; c += KC) {
        int32_t r = 0;
        for (; r + RC <= rows; r += RC) {
            v8f a[RC][2];
            int32_t tlo = n, thi = 0;
            for (int32_t u = 0; u < RC; u++) {
                float *ar = sc->acc + (size_t)(r + u) * d + c;
                v8f cr = v8_splat(corr[r + u]);
                a[u][0] = v8_load(ar) * cr;
                a[u][1] = v8_load(ar + 8) * cr;
                tlo = nvis[r + u] < tlo ? nvis[r + u] : tlo;
                thi = nvis[r + u] > thi ? nvis[r + u] : thi;
            }
            for (int32_t t = 0; t < tlo; t++) {
                const float *vr = vt + (size_t)t * d + c;
                v8f v0 = v8_load(vr), v1 = v8_load(vr + 8);
                for (int32_t u = 0; u < RC; u++) {
                    v8f p = v8_splat(s[(size_t)(r + u) * n_pad + t]);
                    a[u][0] += p * v0;
                    a[u][1] += p * v1;
                }
            }
            for (int32_t t = tlo; t < thi; t++) {
                const float *vr = vt + (size_t)t * d + c;
                v8f v0 = v8_load(vr), v1 = v8_load(vr + 8);
                for (int32_t u = 0; u < RC; u++)
                    if (t < nvis[r + u]) {
                        v8f p = v8_splat(s[(size_t)(r + u) * n_pad + t]);
                        a[u][0] += p * v0;
                        a[u][1] += p * v1;
                    }
            }
            for (int32_t u = 0; u < RC; u++) {
                v8_store(sc->acc + (size_t)(r + u) * d + c, a[u][0]);
                v8_store(sc->acc + (size_t)(r + u) * d + c + 8, a[u][1]);
            }
        }
        for (; r < rows; r++) {
            float *ar = sc->acc + (size_t)r * d + c;
            v8f cr = v8_splat(corr[r]);
            v8f a0 = v8_load(ar) * cr, a1 = v8_load(ar + 8) * cr;
            for (int32_t t = 0; t < nvis[r]; t++) {
                v8f p = v8_splat(s[(size_t)r * n_pad + t]);
                a0 += p * v8_load(vt + (size_t)t * d + c);
                a1 += p * v8_load(vt + (size_t)t * d + c + 8);
            }
            v8_store(ar, a0);
            v8_store(ar + 8, a1);
        }
    }
    for (; c < d; c++) /* head dims that are not a multiple of 16 */
        for (int32_t r = 0; r < rows; r++) {
            float a = sc->acc[(size_t)r * d + c] * corr[r];
            for (int32_t t = 0; t < nvis[r]; t++)
                a += s[(size_t)r * n_pad + t] * vt[(size_t)t * d + c];
            sc->acc[(size_t)r * d + c] = a;
        }
}
