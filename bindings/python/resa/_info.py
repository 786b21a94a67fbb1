# SPDX-License-Identifier: MIT
"""The C API's context-free functions: versions, limits, status texts,
parameter bounds, backend availability."""
import ctypes

from ._enums import REAL_PARAMS
from ._errors import check
from ._lib import lib

__all__ = ["version_string", "version_number", "abi_version", "block_size", "max_head_dim",
           "status_string", "status_name", "param_bounds", "backend_available"]


def version_string():
    """The loaded library's version, "MAJOR.MINOR.PATCH"."""
    return lib.resa_version_string().decode()


def version_number():
    """MAJOR * 10000 + MINOR * 100 + PATCH of the loaded library."""
    return lib.resa_version_number()


def abi_version():
    return lib.resa_abi_version()


def block_size():
    """RESA_DEFAULT_BLOCK_SIZE."""
    return lib.resa_block_size()


def max_head_dim():
    return lib.resa_max_head_dim()


def status_string(status):
    return lib.resa_status_string(int(status)).decode()


def status_name(status):
    return lib.resa_status_name(int(status)).decode()


def param_bounds(param):
    """(lo, hi) of a Param (or its lowercase name): floats for the real
    parameters, else ints."""
    from ._context import _param
    p = _param(param)
    if p in REAL_PARAMS:
        lo, hi = ctypes.c_double(), ctypes.c_double()
        check(lib.resa_param_bounds_f64(int(p), ctypes.byref(lo), ctypes.byref(hi)), None)
    else:
        lo, hi = ctypes.c_int64(), ctypes.c_int64()
        check(lib.resa_param_bounds(int(p), ctypes.byref(lo), ctypes.byref(hi)), None)
    return lo.value, hi.value


def backend_available(backend):
    """Whether a Backend (or "cpu"/"cuda"/"auto") can be used here now."""
    from ._context import _backend
    return bool(lib.resa_backend_available(int(_backend(backend))))
