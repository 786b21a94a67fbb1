/* SPDX-License-Identifier: MIT */
/* -Dgpu=disabled: CUDA is not available and RESA_ERR_NOT_SUPPORTED, AUTO is
 * the CPU.  Exit 0 on success. */
#include <stdio.h>
#include <stdlib.h>

#include <resa.h>

#define EXPECT(c)                                                   \
    do {                                                            \
        if (!(c)) {                                                 \
            fprintf(stderr, "check_no_cuda: failed: %s\n", #c);    \
            return 1;                                               \
        }                                                           \
    } while (0)

int main(void)
{
    resa_ctx *ctx = NULL;
    resa_backend b = RESA_BACKEND_CUDA;
    EXPECT(resa_backend_available(RESA_BACKEND_CUDA) == 0);
    EXPECT(resa_ctx_create(RESA_BACKEND_CUDA, NULL, &ctx) == RESA_ERR_NOT_SUPPORTED);
    EXPECT(ctx == NULL);
    EXPECT(resa_ctx_create(RESA_BACKEND_AUTO, NULL, &ctx) == RESA_OK);
    EXPECT(resa_ctx_get_backend(ctx, &b) == RESA_OK && b == RESA_BACKEND_CPU);
    resa_ctx_destroy(ctx);
    puts("check_no_cuda: 5 passed, 0 failed");
    return 0;
}
