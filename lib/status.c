/* SPDX-License-Identifier: MIT */
/* Status names and messages: static strings, thread-safe. */
#include "internal.h"

const char *resa_status_name(resa_status s)
{
    switch (s) {
    case RESA_OK: return "RESA_OK";
    case RESA_ERR_INVALID_ARGUMENT: return "RESA_ERR_INVALID_ARGUMENT";
    case RESA_ERR_BAD_STATE: return "RESA_ERR_BAD_STATE";
    case RESA_ERR_OUT_OF_MEMORY: return "RESA_ERR_OUT_OF_MEMORY";
    case RESA_ERR_DEVICE_OUT_OF_MEMORY: return "RESA_ERR_DEVICE_OUT_OF_MEMORY";
    case RESA_ERR_CAPACITY: return "RESA_ERR_CAPACITY";
    case RESA_ERR_NOT_SUPPORTED: return "RESA_ERR_NOT_SUPPORTED";
    case RESA_ERR_NO_DEVICE: return "RESA_ERR_NO_DEVICE";
    case RESA_ERR_BACKEND: return "RESA_ERR_BACKEND";
    case RESA_ERR_VERSION_MISMATCH: return "RESA_ERR_VERSION_MISMATCH";
    case RESA_ERR_INTERNAL: return "RESA_ERR_INTERNAL";
    }
    return "RESA_ERR_UNKNOWN";
}

const char *resa_status_string(resa_status s)
{
    switch (s) {
    case RESA_OK: return "success";
    case RESA_ERR_INVALID_ARGUMENT: return "invalid argument (NULL, out of range, unknown flag or sequence)";
    case RESA_ERR_BAD_STATE: return "call not allowed in the context's current state";
    case RESA_ERR_OUT_OF_MEMORY: return "host memory allocation failed";
    case RESA_ERR_DEVICE_OUT_OF_MEMORY: return "device memory allocation failed";
    case RESA_ERR_CAPACITY: return "capacity exhausted (KV pool, sequence slots or step size); nothing changed";
    case RESA_ERR_NOT_SUPPORTED: return "not supported by this build or backend";
    case RESA_ERR_NO_DEVICE: return "no usable GPU or driver";
    case RESA_ERR_BACKEND: return "CUDA failure";
    case RESA_ERR_VERSION_MISMATCH: return "backend module of another version";
    case RESA_ERR_INTERNAL: return "internal error in libresa";
    }
    return "unknown status code";
}
