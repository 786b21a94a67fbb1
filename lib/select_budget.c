/* SPDX-License-Identifier: MIT */
/* The ReSA block budget, shared by every backend (spec: "Budget"). */
#include <math.h>

#include "internal.h"

int32_t resa_forced_blocks(int64_t n_blocks, int64_t local_blocks, int64_t sink_blocks)
{
    int64_t forced = local_blocks + sink_blocks; /* the two ranges may overlap */
    return (int32_t)(forced < n_blocks ? forced : n_blocks);
}

int32_t resa_select_budget(int64_t n_blocks, double fraction, int64_t min_blocks,
                           int64_t local_blocks, int64_t sink_blocks)
{
    /* r in millionths, so ceil(r * M) is integer arithmetic: in doubles
     * 0.07 * 100 is 7.000000000000001 and would round up to 8. */
    int64_t r_ppm = (int64_t)llround(fraction * 1e6);
    int64_t n = (r_ppm * n_blocks + 999999) / 1000000;
    int64_t floor_n = min_blocks < n_blocks ? min_blocks : n_blocks;
    if (n < floor_n)
        n = floor_n;
    int64_t forced = resa_forced_blocks(n_blocks, local_blocks, sink_blocks);
    if (n < forced)
        n = forced;
    if (n > n_blocks)
        n = n_blocks;
    return (int32_t)n;
}
