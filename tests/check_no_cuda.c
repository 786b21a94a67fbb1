/* SPDX-License-Identifier: MIT */
/* -Dgpu=disabled: CUDA is not available and RESA_ERR_NOT_SUPPORTED, AUTO is
 * the CPU; and (docs/embedded.md) with RESA_PARAM_NUM_THREADS 1 the process
 * still has one thread after the pool is created (Linux: /proc/self/task).
 * Exit 0 on success. */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

#include <resa.h>

static int checked; /* EXPECTs that held */

#define EXPECT(c)                                                   \
    do {                                                            \
        if (!(c)) {                                                 \
            fprintf(stderr, "check_no_cuda: failed: %s\n", #c);    \
            return 1;                                               \
        }                                                           \
        checked++;                                                  \
    } while (0)

/* Threads of this process, or -1 where /proc is not there. */
static int threads(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

int main(void)
{
    resa_ctx *ctx = NULL;
    resa_backend b = RESA_BACKEND_CUDA;
    EXPECT(resa_backend_available(RESA_BACKEND_CUDA) == 0);
    EXPECT(resa_ctx_create(RESA_BACKEND_CUDA, NULL, &ctx) == RESA_ERR_NOT_SUPPORTED);
    EXPECT(ctx == NULL);
    EXPECT(resa_ctx_create(RESA_BACKEND_AUTO, NULL, &ctx) == RESA_OK);
    EXPECT(resa_ctx_get_backend(ctx, &b) == RESA_OK && b == RESA_BACKEND_CPU);
    int32_t seq = -1;
    EXPECT(resa_ctx_set_param(ctx, RESA_PARAM_NUM_LAYERS, 1) == RESA_OK);
    EXPECT(resa_ctx_set_param(ctx, RESA_PARAM_NUM_Q_HEADS, 2) == RESA_OK);
    EXPECT(resa_ctx_set_param(ctx, RESA_PARAM_NUM_KV_HEADS, 1) == RESA_OK);
    EXPECT(resa_ctx_set_param(ctx, RESA_PARAM_HEAD_DIM, 64) == RESA_OK);
    EXPECT(resa_ctx_set_param(ctx, RESA_PARAM_NUM_THREADS, 1) == RESA_OK);
    EXPECT(resa_ctx_set_param(ctx, RESA_PARAM_MAX_TOKENS, 4096) == RESA_OK);
    EXPECT(resa_seq_create(ctx, &seq) == RESA_OK); /* the pool and its workers */
    EXPECT(threads() == 1 || threads() == -1);
    resa_ctx_destroy(ctx);
    printf("check_no_cuda: %d passed, 0 failed\n", checked);
    return 0;
}
