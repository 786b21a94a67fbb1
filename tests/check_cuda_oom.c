/* SPDX-License-Identifier: MIT */
/*
 * Device memory exhaustion on the CUDA backend.  A KV pool larger than the
 * free device memory (once where K fits and V does not, once where nothing
 * fits) makes the first resa_seq_create return RESA_ERR_DEVICE_OUT_OF_MEMORY
 * naming the cudaMalloc, with nothing changed: no id, the parameters and
 * free tokens as before, the shape still unlocked, the device memory back to
 * what it was.  Then, with a smaller RESA_PARAM_MAX_TOKENS, the same context
 * locks and its steps (prefill, decodes, rectification) match the float64
 * reference.  Skips (exit 77) where there is no GPU or no CUDA module.
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

typedef int (*mem_get_info_fn)(size_t *free_bytes, size_t *total_bytes);

/* cudaMemGetInfo from the libcudart the harness already loaded. */
static mem_get_info_fn mem_get_info(void)
{
    static const char *names[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (!h)
            continue;
        void *f = dlsym(h, "cudaMemGetInfo");
        if (f) {
            mem_get_info_fn fn;
            memcpy(&fn, &f, sizeof fn); /* object to function pointer, POSIX */
            return fn;
        }
    }
    return NULL;
}

START_TEST(test_pool_over_device_memory)
{
    enum { LAYERS = 8, HQ = 16, HKV = 8, DIM = 128 };
    mem_get_info_fn info = mem_get_info();
    TCHECK(info != NULL, "cudaMemGetInfo not found in libcudart");

    ref_params p;
    ref_params_default(&p);
    p.n_layers = LAYERS;
    p.hq = HQ;
    p.hkv = HKV;
    p.d = DIM;
    p.kv_dtype = RESA_DTYPE_F16;
    p.io_dtype = RESA_DTYPE_F16;
    p.min_blocks = 2;
    p.interval = 4;
    th_opts o;
    th_opts_default(&o);
    o.backend = RESA_BACKEND_CUDA;
    o.max_tokens = 16384;
    o.max_seq_tokens = 8192; /* small page tables whatever the pool size */
    o.max_seqs = 4;
    th t;
    th_init(&t, "cuda_oom", &p, &o);
    resa_ctx *c = t.ctx;

    size_t free0 = 0, total = 0;
    TCHECK(info(&free0, &total) == 0 && total > 0, "cudaMemGetInfo failed");
    const double per_token = 2.0 * LAYERS * HKV * DIM * 2; /* K and V, f16 */
    /* 1.5x the free memory: K (0.75x) is allocated, V is not; then 4x the
     * whole device: K already fails */
    const int64_t pools[2] = {(int64_t)(1.5 * (double)free0 / per_token),
                              (int64_t)(4.0 * (double)total / per_token)};
    const size_t slack = total / 100 > ((size_t)256 << 20) ? total / 100 : (size_t)256 << 20;
    for (int i = 0; i < 2; i++) {
        TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, pools[i]));
        int64_t free_before = -1, free_after = -1, mt = -1;
        TOK(c, resa_ctx_free_tokens(c, &free_before));
        size_t dev_before = 0, dev_after = 0;
        TCHECK(info(&dev_before, &total) == 0, "cudaMemGetInfo failed");
        int32_t id = -7;
        TFAIL(c, RESA_ERR_DEVICE_OUT_OF_MEMORY, "cudaMalloc", resa_seq_create(c, &id));
        TCHECK(id == -7, "a failed resa_seq_create wrote the id %d", id);
        TOK(c, resa_ctx_free_tokens(c, &free_after));
        TCHECK(free_after == free_before, "free tokens %lld before the failed lock, %lld after",
               (long long)free_before, (long long)free_after);
        TOK(c, resa_ctx_get_param(c, RESA_PARAM_MAX_TOKENS, &mt));
        TCHECK(mt == pools[i], "MAX_TOKENS changed to %lld", (long long)mt);
        /* still unlocked: a shape parameter may be set */
        TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, pools[i]));
        TCHECK(info(&dev_after, &total) == 0, "cudaMemGetInfo failed");
        TCHECK(dev_after + slack >= dev_before,
               "pool %d: %zu MiB of device memory free before the failed lock, %zu MiB after",
               i, dev_before >> 20, dev_after >> 20);
        /* nothing deferred either */
        TOK(c, resa_ctx_synchronize(c));
    }

    /* shrink the pool: the same context locks and works */
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, o.max_tokens));
    th_seq s[2];
    th_seq_create(&t, &s[0]);
    th_seq_create(&t, &s[1]);
    th_prefill(&t, &s[0], 300, 128, 0);
    th_prefill(&t, &s[1], 77, 77, 0);
    for (int r = 0; r < 6; r++) {
        th_entry e[2];
        for (int i = 0; i < 2; i++)
            e[i] = ref_seq_pending(s[i].r) >= p.interval
                       ? (th_entry){&s[i], RESA_MODE_RECTIFY, 0}
                       : (th_entry){&s[i], RESA_MODE_DECODE, 1};
        th_step(&t, 2, e);
    }
    for (int i = 0; i < 2; i++) {
        th_check_state(&t, &s[i]);
        th_seq_release(&t, &s[i]);
    }
    TOK(c, resa_ctx_synchronize(c));
    th_fini(&t);
}
END_TEST

int main(void)
{
    if (!th_cuda_usable()) {
        printf("check_cuda_oom: no usable GPU or CUDA module here: skipped\n");
        return 77; /* meson: SKIP */
    }
    Suite *su = suite_create("cuda_oom");
    TCase *tc = tcase_create("cuda_oom");
    tcase_set_tags(tc, "gpu");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_pool_over_device_memory);
    suite_add_tcase(su, tc);
    /* in-process, as check_cuda: CUDA does not survive a fork */
    return th_run_suite(su, 0);
}
