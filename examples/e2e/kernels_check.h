// SPDX-License-Identifier: MIT
// resa-e2e: start-up check of the small kernels against float64 references
// (kernels_check.cu); exits with a message on a mismatch.
#pragma once

#include "kernels.h"

void check_small_kernels(const ModelDims &D, cudaStream_t s);
