/* SPDX-License-Identifier: MIT */
/* Run-time version queries and compile-time constants as functions (for FFI). */
#include "internal.h"

uint32_t resa_version_number(void) { return RESA_VERSION_NUMBER; }
const char *resa_version_string(void) { return RESA_VERSION_STRING; }
uint32_t resa_abi_version(void) { return RESA_ABI_VERSION; }
uint32_t resa_block_size(void) { return RESA_DEFAULT_BLOCK_SIZE; }
uint32_t resa_max_head_dim(void) { return RESA_MAX_HEAD_DIM; }
