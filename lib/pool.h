/* SPDX-License-Identifier: MIT */
/* The page allocator: pages of one block each, reference counted so that
 * forked sequences share full pages copy-on-write. */
#ifndef RESA_POOL_H
#define RESA_POOL_H

#include "internal.h"

/* Pops a free page and sets its count to 1; -1 when none is free. */
RESA_HIDDEN int32_t resa_pool_take(resa_pool *pool);
/* Adds a holder of a page. */
RESA_HIDDEN void resa_pool_ref(resa_pool *pool, int32_t page);
/* Drops a holder; the page returns to the free list with its last holder. */
RESA_HIDDEN void resa_pool_unref(resa_pool *pool, int32_t page);

#endif
