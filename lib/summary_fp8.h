/* SPDX-License-Identifier: MIT */
/*
 * fp8 block summaries (RESA_SUMMARY_FP8_E4M3): the codec, one copy for both
 * backends.  Plain C that nvcc also compiles for the device (RESA_HD), so the
 * CPU (lib/cpu/kv_write.c, attention_sparse.c) and CUDA (cuda/kv_write.cu,
 * select_blocks.cu) summaries are bit for bit the same.
 *
 * A block's summary for one KV head is d bytes of kmin, d bytes of kmax (OCP
 * fp8 e4m3: 1 sign, 4 exponent, 3 mantissa bits, bias 7, largest 448, no
 * infinity) and one power-of-two scale exponent s shared by both vectors:
 *   kmin_j >= decode(qmin_j) * 2^s    (qmin_j rounded toward -infinity)
 *   kmax_j <= decode(qmax_j) * 2^s    (qmax_j rounded toward +infinity)
 * so the box only grows and the block score
 *   2^s * sum_j max(q_j * qmax_j, q_j * qmin_j)
 * stays an upper bound of q . k over the block (algorithm spec, step 2).
 * s is the smallest exponent with max_j |k_j| * 2^-s <= 448: the largest
 * magnitude lands in (224, 448], where e4m3 spacing is 1/8 to 1/16 of the
 * value.  Scaling by 2^s is exact, so all rounding is in the two directed
 * roundings below.  An infinite key saturates at the largest e4m3 value
 * (docs/API.md, "Non-finite values"); NaN never reaches the codec (the
 * summaries' min/max skip NaN keys).
 */
#ifndef RESA_SUMMARY_FP8_H
#define RESA_SUMMARY_FP8_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#  define RESA_HD __host__ __device__ __forceinline__
#else
#  define RESA_HD static inline
#endif

#define RESA_E4M3_MAX 448.0f
#define RESA_E4M3_MAX_BITS 0x7e /* 0x7f is NaN: never produced */

/* Magnitude byte (0 .. 0x7e) of the e4m3 value nearest to a >= 0 on the side
 * `up` (1: smallest value >= a, 0: largest value <= a), for a * 2^-s <= 448.
 * With e = max(floor(log2(a * 2^-s)), -6), the e4m3 values around it are
 * m * 2^(e-3), m integer, and the byte is ((e + 7) << 3) + m - 8: this one
 * formula covers subnormals (e = -6, m < 8) and m = 16 (the next binade). */
RESA_HD uint32_t resa_e4m3_mag(float a, int s, int up)
{
    if (!(a > 0.0f))
        return 0;
    if (!(a <= 3.4028235e38f))
        return RESA_E4M3_MAX_BITS; /* infinity saturates (see the header comment) */
    int e = ilogbf(a) - s;
    if (e < -6)
        e = -6;
    float m = ldexpf(a, 3 - e - s); /* exact, except underflow far below 2^-9 */
    float r = up ? ceilf(m) : floorf(m);
    if (up && r < 1.0f)
        r = 1.0f; /* an underflowed positive a still rounds up to 2^-9 */
    return (uint32_t)((e + 7) * 8) + (uint32_t)r - 8u;
}

/* Byte of x rounded toward +infinity (up = 1) or -infinity (up = 0), scaled by 2^-s. */
RESA_HD uint8_t resa_e4m3_round(float x, int s, int up)
{
    if (x >= 0.0f)
        return (uint8_t)resa_e4m3_mag(x, s, up);
    return (uint8_t)(0x80u | resa_e4m3_mag(-x, s, !up));
}

/* Value of an e4m3 byte (never NaN here), unscaled. */
RESA_HD float resa_e4m3_to_f32(uint8_t v)
{
    uint32_t e = (v >> 3) & 15u, m = v & 7u;
    float mag = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8u + m), (int)e - 10);
    return (v & 0x80u) ? -mag : mag;
}

/* The scale exponent of a block: smallest s with amax * 2^-s <= 448, in
 * [-128, 127] (an all-zero block takes 0). */
RESA_HD int8_t resa_fp8_scale_exp(float amax)
{
    if (!(amax > 0.0f))
        return 0;
    if (!(amax <= 3.4028235e38f))
        return 127; /* not finite: saturate (see the header comment) */
    int s = ilogbf(amax) - 8; /* amax * 2^-s in [256, 512) */
    if (ldexpf(amax, -s) > RESA_E4M3_MAX)
        s++;
    return (int8_t)(s < -128 ? -128 : s);
}

/* Encodes one block summary: mn/mx[d] (exact, fp32) -> qmin/qmax[d] and *exp. */
RESA_HD void resa_fp8_summary_encode(const float *mn, const float *mx, int d, uint8_t *qmin,
                                     uint8_t *qmax, int8_t *exp)
{
    float amax = 0.0f;
    for (int j = 0; j < d; j++) {
        float a = fabsf(mn[j]), b = fabsf(mx[j]);
        amax = a > amax ? a : amax;
        amax = b > amax ? b : amax;
    }
    int s = resa_fp8_scale_exp(amax);
    for (int j = 0; j < d; j++) {
        qmin[j] = resa_e4m3_round(mn[j], s, 0);
        qmax[j] = resa_e4m3_round(mx[j], s, 1);
    }
    *exp = (int8_t)s;
}

#endif /* RESA_SUMMARY_FP8_H */
