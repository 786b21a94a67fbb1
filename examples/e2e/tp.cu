// SPDX-License-Identifier: MIT
// resa-e2e: NCCL communicators and the all-reduce (tp.h).
#include <cstdlib>
#include <initializer_list>

#include "tp.h"

#if RESA_E2E_NCCL
#include <nccl.h>

#define CN(call)                                                                     \
    do {                                                                             \
        ncclResult_t n_ = (call);                                                    \
        if (n_ != ncclSuccess) {                                                     \
            std::fprintf(stderr, "resa-e2e: %s:%d: %s failed: %s\n", __FILE__,       \
                         __LINE__, #call, ncclGetErrorString(n_));                   \
            std::exit(1);                                                            \
        }                                                                            \
    } while (0)

bool tp_available() { return true; }

std::string tp_describe()
{
    int v = 0;
    if (ncclGetVersion(&v) != ncclSuccess)
        return "NCCL (version unknown)";
    // NCCL_VERSION(X, Y, Z): X * 10000 + Y * 100 + Z since 2.9
    char buf[64];
    std::snprintf(buf, sizeof buf, "NCCL %d.%d.%d", v / 10000, v / 100 % 100, v % 100);
    return buf;
}

std::vector<void *> tp_init(int n)
{
    setenv("NCCL_NVLS_ENABLE", "0", 0); // keep the caller's setting if any
    // every connection at init (not at a later first collective, from inside
    // a rank thread or a graph capture)
    setenv("NCCL_RUNTIME_CONNECT", "0", 0);
    std::vector<ncclComm_t> c(n);
    std::vector<int> devs(n);
    for (int i = 0; i < n; i++)
        devs[i] = i;
    CN(ncclCommInitAll(c.data(), n, devs.data()));
    // NCCL connects its peers (and takes their buffers) at the first
    // collective: all-reduces of the engine's sizes now (a decode step's
    // rows up to a prefill's), so that the caller measures free memory after.
    const size_t most = 4u << 20; // bf16 elements, 8 MiB
    std::vector<void *> buf(n);
    std::vector<cudaStream_t> st(n);
    for (int i = 0; i < n; i++) {
        CK(cudaSetDevice(i));
        CK(cudaMalloc(&buf[i], most * 2));
        CK(cudaMemset(buf[i], 0, most * 2));
        CK(cudaStreamCreateWithFlags(&st[i], cudaStreamNonBlocking));
    }
    for (size_t count : {(size_t)8 * 3584, (size_t)512 * 3584, most}) {
        CN(ncclGroupStart()); // one thread, several devices: one group
        for (int i = 0; i < n; i++)
            CN(ncclAllReduce(buf[i], buf[i], count, ncclBfloat16, ncclSum, c[i], st[i]));
        CN(ncclGroupEnd());
    }
    for (int i = 0; i < n; i++) {
        CK(cudaSetDevice(i));
        CK(cudaStreamSynchronize(st[i]));
        CK(cudaStreamDestroy(st[i]));
        CK(cudaFree(buf[i]));
    }
    return std::vector<void *>(c.begin(), c.end());
}

void tp_destroy(std::vector<void *> &comms)
{
    for (void *c : comms)
        CN(ncclCommDestroy((ncclComm_t)c));
    comms.clear();
}

void tp_allreduce_bf16(void *comm, void *buf, size_t count, cudaStream_t s)
{
    CN(ncclAllReduce(buf, buf, count, ncclBfloat16, ncclSum, (ncclComm_t)comm, s));
}

#else // built without NCCL

namespace {
[[noreturn]] void no_nccl()
{
    std::fprintf(stderr, "resa-e2e: built without NCCL: --tp needs a build that found nccl.h "
                         "and libnccl (meson option nccl, examples/meson.build)\n");
    std::exit(2);
}
} // namespace

bool tp_available() { return false; }
std::string tp_describe() { return "no NCCL in this build"; }
std::vector<void *> tp_init(int) { no_nccl(); }
void tp_destroy(std::vector<void *> &comms) { comms.clear(); }
void tp_allreduce_bf16(void *, void *, size_t, cudaStream_t) { no_nccl(); }

#endif
