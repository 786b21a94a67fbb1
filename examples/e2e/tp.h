// SPDX-License-Identifier: MIT
// resa-e2e: tensor parallelism over NCCL (--tp N), the only file that sees
// nccl.h.  Built with NCCL when Meson found it (RESA_E2E_NCCL=1); without it
// every entry point below but tp_available() says so and exits.
//
// One process drives the N GPUs of one host, one host thread per rank (so
// that each rank's decode loop, graph capture included, is the single-GPU
// loop plus two all-reduces a layer: NCCL's multi-thread mode, which its
// documentation recommends over one thread driving all GPUs when NCCL calls
// are captured in CUDA graphs).  The communicators come from ncclCommInitAll.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "common.h"

// Whether this resa-e2e was built with NCCL.
bool tp_available();
// "NCCL 2.28.3" (linked library), or why there is none.
std::string tp_describe();
// One communicator per device 0 .. n - 1 (ncclCommInitAll), connected by a
// few all-reduces of the engine's sizes (so that NCCL's buffers are taken
// before the engine sizes its batches).  Sets NCCL_NVLS_ENABLE=0 first unless
// the environment sets it (no NVLink multicast: see scripts/device-run.sh).
// Leaves an arbitrary device current.
std::vector<void *> tp_init(int n);
void tp_destroy(std::vector<void *> &comms);
// buf[0 .. count) = its sum over the ranks of `comm`, bf16, in place, on s
// (capturable in a CUDA graph).
void tp_allreduce_bf16(void *comm, void *buf, size_t count, cudaStream_t s);
