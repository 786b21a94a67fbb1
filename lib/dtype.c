/* SPDX-License-Identifier: MIT */
#include "internal.h"

size_t resa_dtype_size(resa_dtype t)
{
    switch (t) {
    case RESA_DTYPE_F32: return 4;
    case RESA_DTYPE_F16: return 2;
    case RESA_DTYPE_BF16: return 2;
    case RESA_DTYPE_FP8_E4M3: return 1;
    }
    return 0;
}
