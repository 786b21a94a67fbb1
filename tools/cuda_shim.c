/* SPDX-License-Identifier: MIT */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "cuda_shim.h"

#include <dlfcn.h>
#include <string.h>

int cuda_shim_load(cuda_shim *s)
{
    static const char *names[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so"};
    void *h = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !h; i++)
        h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return -1;
    struct { void **slot; const char *name; } syms[] = {
        {(void **)&s->Malloc, "cudaMalloc"},
        {(void **)&s->Free, "cudaFree"},
        {(void **)&s->Memcpy, "cudaMemcpy"},
        {(void **)&s->Memset, "cudaMemset"},
        {(void **)&s->DeviceSynchronize, "cudaDeviceSynchronize"},
        {(void **)&s->StreamCreate, "cudaStreamCreate"},
        {(void **)&s->StreamDestroy, "cudaStreamDestroy"},
        {(void **)&s->StreamSynchronize, "cudaStreamSynchronize"},
        {(void **)&s->EventCreate, "cudaEventCreate"},
        {(void **)&s->EventDestroy, "cudaEventDestroy"},
        {(void **)&s->EventRecord, "cudaEventRecord"},
        {(void **)&s->EventSynchronize, "cudaEventSynchronize"},
        {(void **)&s->EventElapsedTime, "cudaEventElapsedTime"},
        {(void **)&s->StreamBeginCapture, "cudaStreamBeginCapture"},
        {(void **)&s->StreamEndCapture, "cudaStreamEndCapture"},
        {(void **)&s->GraphInstantiate, "cudaGraphInstantiate"},
        {(void **)&s->GraphLaunch, "cudaGraphLaunch"},
        {(void **)&s->GraphExecDestroy, "cudaGraphExecDestroy"},
        {(void **)&s->GraphDestroy, "cudaGraphDestroy"},
        {(void **)&s->GetDeviceCount, "cudaGetDeviceCount"},
        {(void **)&s->GetErrorString, "cudaGetErrorString"},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        void *f = dlsym(h, syms[i].name);
        if (!f) {
            dlclose(h);
            return -1;
        }
        memcpy(syms[i].slot, &f, sizeof f); /* object to function pointer, POSIX */
    }
    int n = 0;
    if (s->GetDeviceCount(&n) != 0 || n == 0)
        return -1;
    return 0;
}
