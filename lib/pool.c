/* SPDX-License-Identifier: MIT */
#include "pool.h"

int32_t resa_pool_take(resa_pool *pool)
{
    if (pool->n_free == 0)
        return -1;
    int32_t page = pool->free_list[--pool->n_free];
    pool->refcount[page] = 1;
    return page;
}

void resa_pool_ref(resa_pool *pool, int32_t page)
{
    pool->refcount[page]++;
}

void resa_pool_unref(resa_pool *pool, int32_t page)
{
    if (--pool->refcount[page] == 0)
        pool->free_list[pool->n_free++] = page;
}
