/* SPDX-License-Identifier: MIT */
/*
 * White-box helpers: read the CPU pool (K, V, kmin, kmax) through
 * resa_cpu_pool_views() and the page tables of lib/internal.h.  Only for
 * tests linked with the library's objects (libresa_wb).
 */
#ifndef RESA_TEST_WB_H
#define RESA_TEST_WB_H

#include "harness.h"

/* Stored K/V of every position of s equal the reference bit for bit (values
 * rounded to KV_DTYPE; an fp8 cache: dequantized values and scales, against
 * the test's own quantizer), and every block summary equals the element-wise
 * min/max recomputed from scratch over the stored keys. */
void wb_check_cache(th *t, const th_seq *s);
/* Only the summaries. */
void wb_check_summaries(th *t, int32_t id);

/* A byte copy of everything a sequence owns: page table, length, pending
 * start, and the K/V/summary bytes of each of its pages, every layer. */
typedef struct wb_snap {
    int32_t id, n_pages;
    int64_t length, rect_start;
    int32_t *pages;
    unsigned char *bytes;
    size_t page_bytes;
} wb_snap;
void wb_snap_take(const resa_ctx *ctx, int32_t id, wb_snap *s);
/* Asserts the sequence is exactly as snapshotted. */
void wb_snap_check(const resa_ctx *ctx, const wb_snap *s, const char *why);
void wb_snap_free(wb_snap *s);

/* Page id of block `blk` of sequence id. */
int32_t wb_page(const resa_ctx *ctx, int32_t id, int64_t blk);
/* Reference count of a page (0 = free). */
int32_t wb_refcount(const resa_ctx *ctx, int32_t page);
/* Stored K (is_v = 0) or V element as double (an fp8 cache: as it reads back,
 * decoded by the test's own e4m3 table times the stored scale). */
double wb_kv(const resa_ctx *ctx, int32_t id, int is_v, int32_t layer, int64_t pos, int32_t h,
             int32_t j);
/* An fp8 cache's stored scale of one token's K (is_v = 0) or V head vector. */
double wb_scale(const resa_ctx *ctx, int32_t id, int is_v, int32_t layer, int64_t pos, int32_t h);

#endif
