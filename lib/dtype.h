/* SPDX-License-Identifier: MIT */
/*
 * Scalar conversions between fp32 and the 16-bit storage types, round to
 * nearest even, NaN kept NaN.  Portable C (no F16C), shared by the CPU backend
 * and the tests' view of what the library stores.
 */
#ifndef RESA_DTYPE_H
#define RESA_DTYPE_H

#include <stdint.h>
#include <string.h>

#include "resa.h"

static inline uint32_t resa_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
static inline float resa_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float resa_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) { /* zero or subnormal: mant * 2^-24 */
        float f = (float)mant * 5.9604644775390625e-8f;
        return resa_bits_f32(resa_f32_bits(f) | sign);
    }
    if (exp == 31)
        return resa_bits_f32(sign | 0x7f800000u | (mant << 13));
    return resa_bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline uint16_t resa_f32_to_f16(float f)
{
    uint32_t x = resa_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or NaN */
        return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (ax >= 0x477ff000u) /* rounds past 65504 */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* f16 subnormal: let the fp32 adder round at 2^-24 */
        float t = resa_bits_f32(ax) + 0.5f;
        return (uint16_t)(sign | (resa_f32_bits(t) - 0x3f000000u));
    }
    uint32_t odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + odd; /* rebias exponent (-112 << 23) and round to even */
    return (uint16_t)(sign | (ax >> 13));
}

static inline float resa_bf16_to_f32(uint16_t h)
{
    return resa_bits_f32((uint32_t)h << 16);
}

static inline uint16_t resa_f32_to_bf16(float f)
{
    uint32_t x = resa_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* x rounded to type t (F32, F16 or BF16, not FP8_E4M3), as an fp32 value:
 * what storing x in a buffer of type t and loading it back gives. */
static inline float resa_round_f32(resa_dtype t, float x)
{
    if (t == RESA_DTYPE_F16)
        return resa_f16_to_f32(resa_f32_to_f16(x));
    if (t == RESA_DTYPE_BF16)
        return resa_bf16_to_f32(resa_f32_to_bf16(x));
    return x;
}

/* n elements of type t (F32, F16 or BF16: an fp8 cache is read through its
 * scales, lib/cpu/kv_read.c) starting at element `at` of src, to fp32. */
static inline void resa_load_f32(const void *src, resa_dtype t, size_t at, int32_t n, float *dst)
{
    if (t == RESA_DTYPE_F32) {
        memcpy(dst, (const float *)src + at, sizeof(float) * (size_t)n);
    } else if (t == RESA_DTYPE_F16) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int32_t i = 0; i < n; i++)
            dst[i] = resa_f16_to_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int32_t i = 0; i < n; i++)
            dst[i] = resa_bf16_to_f32(s[i]);
    }
}

/* n fp32 values to type t at element `at` of dst. */
static inline void resa_store_f32(void *dst, resa_dtype t, size_t at, int32_t n, const float *src)
{
    if (t == RESA_DTYPE_F32) {
        memcpy((float *)dst + at, src, sizeof(float) * (size_t)n);
    } else if (t == RESA_DTYPE_F16) {
        uint16_t *d = (uint16_t *)dst + at;
        for (int32_t i = 0; i < n; i++)
            d[i] = resa_f32_to_f16(src[i]);
    } else {
        uint16_t *d = (uint16_t *)dst + at;
        for (int32_t i = 0; i < n; i++)
            d[i] = resa_f32_to_bf16(src[i]);
    }
}

#endif
