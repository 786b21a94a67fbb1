/* SPDX-License-Identifier: MIT */
/*
 * Finds the CUDA backend module at run time, once per process, so that
 * libresa.so has no NEEDED entry for libcudart or libcublas and loads on
 * machines without CUDA.  Search order: $RESA_CUDA_MODULE (a path), the
 * directory libresa.so was loaded from, then the dynamic loader's path.
 * The result is immutable after pthread_once: no global mutable state.
 *
 * Built with RESA_NO_CUDA_MODULE (meson -Dgpu=disabled) there is no CUDA
 * backend at all: nothing is loaded, dlopen is never called (libresa needs
 * no libdl), and CUDA is RESA_ERR_NOT_SUPPORTED.
 */
#ifdef RESA_NO_CUDA_MODULE
#include "backend.h"

const resa_backend_ops *resa_cuda_backend(resa_status *why, const char **detail)
{
    *why = RESA_ERR_NOT_SUPPORTED;
    *detail = "libresa was built without the CUDA backend (-Dgpu=disabled)";
    return NULL;
}
#else
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* dladdr */
#endif
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

static pthread_once_t once = PTHREAD_ONCE_INIT;
static const resa_backend_ops *cuda_ops;
static resa_status cuda_why = RESA_ERR_NOT_SUPPORTED;
static char cuda_detail[256] = "the CUDA backend module (" RESA_CUDA_MODULE ") was not found";

static void *open_module(void)
{
    const char *env = getenv("RESA_CUDA_MODULE");
    if (env && *env) {
        void *h = dlopen(env, RTLD_NOW | RTLD_LOCAL);
        if (h)
            return h;
    }
    Dl_info info;
    if (dladdr((const void *)&cuda_why, &info) && info.dli_fname) {
        char path[4096];
        const char *slash = strrchr(info.dli_fname, '/');
        if (slash && (size_t)(slash - info.dli_fname) + sizeof RESA_CUDA_MODULE + 1 < sizeof path) {
            snprintf(path, sizeof path, "%.*s/%s", (int)(slash - info.dli_fname), info.dli_fname,
                     RESA_CUDA_MODULE);
            void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
            if (h)
                return h;
        }
    }
    void *h = dlopen(RESA_CUDA_MODULE, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *err = dlerror();
        snprintf(cuda_detail, sizeof cuda_detail, "%s", err ? err : "dlopen failed");
    }
    return h;
}

static void load_once(void)
{
    void *h = open_module();
    if (!h)
        return;
    resa_backend_entry_fn entry;
    void *sym = dlsym(h, RESA_BACKEND_ENTRY);
    memcpy(&entry, &sym, sizeof entry); /* object to function pointer, POSIX-style */
    if (!entry) {
        snprintf(cuda_detail, sizeof cuda_detail, "%s has no %s", RESA_CUDA_MODULE,
                 RESA_BACKEND_ENTRY);
        dlclose(h);
        return;
    }
    const resa_backend_ops *ops = entry(RESA_BACKEND_API_VERSION);
    if (!ops || ops->api_version != RESA_BACKEND_API_VERSION) {
        cuda_why = RESA_ERR_VERSION_MISMATCH;
        snprintf(cuda_detail, sizeof cuda_detail,
                 "%s does not provide backend API version %u", RESA_CUDA_MODULE,
                 RESA_BACKEND_API_VERSION);
        dlclose(h);
        return;
    }
    cuda_ops = ops; /* the module stays loaded for the life of the process */
}

const resa_backend_ops *resa_cuda_backend(resa_status *why, const char **detail)
{
    pthread_once(&once, load_once);
    *why = cuda_why;
    *detail = cuda_detail;
    return cuda_ops;
}
#endif /* RESA_NO_CUDA_MODULE */
