/* SPDX-License-Identifier: MIT */
/*
 * The few CUDA runtime calls that resa-bench and the GPU tests need, loaded
 * from libcudart at run time.  They build on machines without CUDA and say
 * "no GPU" there instead of failing to link; on a GPU machine they move
 * inputs to device memory, time with events and capture CUDA graphs.
 * Types are the runtime's, seen as plain pointers and ints (its ABI).
 */
#ifndef RESA_CUDA_SHIM_H
#define RESA_CUDA_SHIM_H

#include <stddef.h>

typedef struct cuda_shim {
    int (*Malloc)(void **p, size_t bytes);
    int (*Free)(void *p);
    int (*Memcpy)(void *dst, const void *src, size_t bytes, int kind); /* 1 H2D, 2 D2H, 3 D2D */
    int (*Memset)(void *p, int value, size_t bytes);
    int (*DeviceSynchronize)(void);
    int (*StreamCreate)(void **stream);
    int (*StreamDestroy)(void *stream);
    int (*StreamSynchronize)(void *stream);
    int (*EventCreate)(void **event);
    int (*EventDestroy)(void *event);
    int (*EventRecord)(void *event, void *stream);
    int (*EventSynchronize)(void *event);
    int (*EventElapsedTime)(float *ms, void *start, void *end);
    int (*StreamBeginCapture)(void *stream, int mode); /* mode 0: global */
    int (*StreamEndCapture)(void *stream, void **graph);
    int (*GraphInstantiate)(void **exec, void *graph, unsigned long long flags);
    int (*GraphLaunch)(void *exec, void *stream);
    int (*GraphExecDestroy)(void *exec);
    int (*GraphDestroy)(void *graph);
    int (*GetDeviceCount)(int *n);
    const char *(*GetErrorString)(int err);
} cuda_shim;

/* Loads libcudart; returns 0 and fills *s when a GPU is usable, else -1. */
int cuda_shim_load(cuda_shim *s);

#endif
