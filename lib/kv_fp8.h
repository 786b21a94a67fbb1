/* SPDX-License-Identifier: MIT */
/*
 * The fp8 KV cache (RESA_DTYPE_FP8_E4M3 as KV_DTYPE): the e4m3 codec and the
 * per (token, KV head) scale.  One copy for both backends, plain C that nvcc
 * also compiles for the device (RESA_HD), so that the CPU (lib/cpu/kv_write.c)
 * and the CUDA (cuda/kv_write.cu) caches hold the same bytes.
 *
 * A K (or V) head vector x[0 .. d) of one token is stored as d e4m3 bytes and
 * one fp32 scale:
 *   amax  = max_j |x_j|                        (NaN if any x_j is NaN)
 *   scale = amax / 448    (fp32 division; an amax > 0 whose quotient
 *                          underflows to 0 takes the smallest subnormal, 2^-149)
 *   c_j   = e4m3(x_j / scale)  (fp32 division, round to nearest even,
 *                               saturating at +-448; 0 when scale is 0)
 * and reads back as  IO(e4m3_value(c_j) * scale)  (fp32 product, then rounded
 * to IO_DTYPE): the cache then holds values of the IO dtype, exactly like a
 * cache of that dtype whose values went through fp8, so the block summaries
 * stay exact in the IO dtype and the CUDA tensor-core kernels read the same
 * values the CPU does.
 *
 * Why per token and not per block: a decode appends one token at a time and
 * a rectification rewrites a span; with a block scale a later token that
 * exceeds the block's range would force re-quantizing the earlier ones.  A
 * token scale keeps every write local, and copy-on-write copies scales with
 * their page.  Cost: 4 bytes per d (3 % of the K/V bytes at d = 128).
 *
 * Non-finite values (docs/API.md, "Non-finite values"): 448 is the largest
 * finite e4m3 value and e4m3 has no infinity.  A NaN anywhere in x makes the
 * scale NaN, an infinity makes it +inf; either way every element of that head
 * vector reads back as NaN (x / NaN, inf / inf are NaN; 0 * inf is NaN), so a
 * non-finite input never becomes finite and never leaks to other tokens.
 */
#ifndef RESA_KV_FP8_H
#define RESA_KV_FP8_H

#include <math.h>
#include <stdint.h>

#include "summary_fp8.h" /* RESA_HD and the e4m3 byte's value, resa_e4m3_to_f32 */

#define RESA_FP8_MAX 448.0f   /* largest finite e4m3 value */
#define RESA_FP8_NAN 0x7f     /* the NaN byte the encoder writes (0xff is NaN too) */

/* x to e4m3, round to nearest even, saturating at +-448 (SATFINITE: values
 * from 464, the midpoint to the absent 480, and infinities give 448), NaN to
 * 0x7f, the sign of zero kept.  With e = max(floor(log2 |x|), -6) the e4m3
 * values around |x| are m * 2^(e-3), m integer: m = rint(|x| * 2^(3-e)) is
 * the nearest (the scaling is exact), and the byte is ((e + 7) << 3) + m - 8,
 * which also covers subnormals (e = -6, m < 8) and m = 16 (next binade). */
RESA_HD uint8_t resa_fp8_encode(float x)
{
    if (x != x)
        return RESA_FP8_NAN;
    const uint32_t sign = signbit(x) ? 0x80u : 0u;
    const float a = fabsf(x);
    if (!(a < 464.0f))
        return (uint8_t)(sign | 0x7eu);
    if (a == 0.0f)
        return (uint8_t)sign;
    int e = ilogbf(a);
    if (e < -6)
        e = -6;
    float m = rintf(ldexpf(a, 3 - e));
    if (m >= 16.0f) { /* rounded up into the next binade */
        m = 8.0f;
        e++;
    }
    return (uint8_t)(sign | (uint32_t)((e + 7) * 8 + (int)m - 8));
}

/* Value of an e4m3 byte, exact; 0x7f and 0xff are NaN (the summaries'
 * decoder, which never sees them, otherwise). */
RESA_HD float resa_fp8_decode(uint8_t v)
{
    if ((v & 0x7fu) == 0x7fu)
        return nanf("");
    return resa_e4m3_to_f32(v);
}

/* One step of amax = max |x_j|, NaN-sticky (fmaxf would drop a NaN). */
RESA_HD float resa_fp8_amax(float amax, float x)
{
    if (amax != amax)
        return amax;
    const float a = fabsf(x);
    return (a > amax || a != a) ? a : amax;
}

/* The scale of a vector of largest magnitude amax (see the top). */
RESA_HD float resa_fp8_scale(float amax)
{
    const float s = amax / RESA_FP8_MAX;
    return (s == 0.0f && amax > 0.0f) ? ldexpf(1.0f, -149) : s;
}

/* One element's byte under `scale` (0 for an all-zero vector: x is +-0). */
RESA_HD uint8_t resa_fp8_quantize(float x, float scale)
{
    return resa_fp8_encode(scale == 0.0f ? x : x / scale);
}

#endif /* RESA_KV_FP8_H */
