/* SPDX-License-Identifier: MIT */
/*
 * Workers sleep on a condition variable until a new job generation is
 * published, then take items with an atomic counter (dynamic scheduling: the
 * items of a step are uneven, e.g. prompt tiles late in a chunk see more keys).
 */
#include <pthread.h>
#include <stdatomic.h>

#include "threadpool.h"

struct resa_threadpool {
    int32_t n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    uint64_t generation;     /* guarded by mu */
    int32_t busy;            /* workers still in the current job, guarded by mu */
    int32_t quit;
    resa_work_fn fn;
    void *arg;
    int64_t n_items;
    atomic_llong next;
};

typedef struct worker_arg {
    resa_threadpool *tp;
    int32_t index;
} worker_arg;

static void drain(resa_threadpool *tp, int32_t worker)
{
    for (;;) {
        long long i = atomic_fetch_add_explicit(&tp->next, 1, memory_order_relaxed);
        if (i >= tp->n_items)
            return;
        tp->fn(tp->arg, i, worker);
    }
}

static void *worker_main(void *p)
{
    worker_arg *wa = p;
    resa_threadpool *tp = wa->tp;
    int32_t index = wa->index;
    uint64_t seen = 0;
    pthread_mutex_lock(&tp->mu);
    for (;;) {
        while (tp->generation == seen && !tp->quit)
            pthread_cond_wait(&tp->wake, &tp->mu);
        if (tp->quit)
            break;
        seen = tp->generation;
        pthread_mutex_unlock(&tp->mu);
        drain(tp, index);
        pthread_mutex_lock(&tp->mu);
        if (--tp->busy == 0)
            pthread_cond_signal(&tp->done);
    }
    pthread_mutex_unlock(&tp->mu);
    return NULL;
}

resa_status resa_threadpool_create(const resa_ctx *ctx, int32_t n_threads, resa_threadpool **out)
{
    *out = NULL;
    if (n_threads < 1)
        n_threads = 1;
    resa_threadpool *tp = resa_alloc(ctx, sizeof *tp);
    if (!tp)
        return RESA_ERR_OUT_OF_MEMORY;
    tp->n_threads = n_threads;
    /* worker args live right after the thread handles */
    tp->threads = resa_alloc(ctx, (sizeof(pthread_t) + sizeof(worker_arg)) * (size_t)n_threads);
    if (!tp->threads) {
        resa_free(ctx, tp);
        return RESA_ERR_OUT_OF_MEMORY;
    }
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->wake, NULL);
    pthread_cond_init(&tp->done, NULL);
    atomic_init(&tp->next, 0);
    worker_arg *args = (worker_arg *)(void *)(tp->threads + n_threads);
    int32_t started = 1;
    for (int32_t i = 1; i < n_threads; i++) {
        args[i].tp = tp;
        args[i].index = i;
        if (pthread_create(&tp->threads[i], NULL, worker_main, &args[i]) != 0)
            break;
        started++;
    }
    tp->n_threads = started; /* fewer threads is still correct, only slower */
    *out = tp;
    return RESA_OK;
}

void resa_threadpool_destroy(const resa_ctx *ctx, resa_threadpool *tp)
{
    if (!tp)
        return;
    pthread_mutex_lock(&tp->mu);
    tp->quit = 1;
    pthread_cond_broadcast(&tp->wake);
    pthread_mutex_unlock(&tp->mu);
    for (int32_t i = 1; i < tp->n_threads; i++)
        pthread_join(tp->threads[i], NULL);
    pthread_cond_destroy(&tp->wake);
    pthread_cond_destroy(&tp->done);
    pthread_mutex_destroy(&tp->mu);
    resa_free(ctx, tp->threads);
    resa_free(ctx, tp);
}

int32_t resa_threadpool_size(const resa_threadpool *tp)
{
    return tp->n_threads;
}

void resa_threadpool_run(resa_threadpool *tp, int64_t n_items, resa_work_fn fn, void *arg)
{
    if (n_items <= 0)
        return;
    if (tp->n_threads == 1 || n_items == 1) {
        for (int64_t i = 0; i < n_items; i++)
            fn(arg, i, 0);
        return;
    }
    pthread_mutex_lock(&tp->mu);
    tp->fn = fn;
    tp->arg = arg;
    tp->n_items = n_items;
    atomic_store_explicit(&tp->next, 0, memory_order_relaxed);
    tp->busy = tp->n_threads - 1;
    tp->generation++;
    pthread_cond_broadcast(&tp->wake);
    pthread_mutex_unlock(&tp->mu);
    drain(tp, 0);
    pthread_mutex_lock(&tp->mu);
    while (tp->busy > 0)
        pthread_cond_wait(&tp->done, &tp->mu);
    pthread_mutex_unlock(&tp->mu);
}
