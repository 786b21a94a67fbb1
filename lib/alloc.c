/* SPDX-License-Identifier: MIT */
/* Host memory through the context's allocation hooks (resa_allocator), and
 * the default hooks used when resa_ctx_create gets none. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static void *default_alloc(void *user, size_t size, size_t align)
{
    (void)user;
    void *p = NULL;
    if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size) != 0)
        return NULL;
    return p;
}
static void default_free(void *user, void *ptr)
{
    (void)user;
    free(ptr);
}

resa_allocator resa_default_allocator(void)
{
    return (resa_allocator){default_alloc, default_free, NULL};
}

void *resa_alloc(const resa_ctx *ctx, size_t size)
{
    if (size == 0)
        size = 1;
    void *p = ctx->alloc.alloc(ctx->alloc.user, size, 64);
    if (p)
        memset(p, 0, size);
    return p;
}

void resa_free(const resa_ctx *ctx, void *ptr)
{
    if (ptr)
        ctx->alloc.free(ctx->alloc.user, ptr);
}
