# SPDX-License-Identifier: MIT
"""Finds and loads libresa, and declares every C function of include/resa.h.

Search order (the first that loads wins):
  1. $RESA_LIBRARY, a path (a build tree, a test);
  2. libresa.so* in this package's directory (a pip-installed wheel carries
     the library there, and libresa finds libresa-cuda.so.0 next to itself);
  3. ctypes.util.find_library("resa") (the dynamic loader's cache);
  4. "libresa.so.0", the SONAME, through the loader's search path;
  5. the library directory of a `meson install` that installed this package
     (recorded in _version.py), for prefixes the loader does not search.

Only this module touches ctypes' CDLL; everything else calls `lib.resa_*`.
"""
import ctypes
import ctypes.util
import glob
import os

__all__ = ["lib", "path"]

_i32, _i64, _u32, _f64 = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_double
_p, _int, _str = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
_P = ctypes.POINTER

# (result, [arguments]) per function, in the header's order.  Enums are C
# ints; resa_status is returned as a plain int and mapped by _errors.
SIGNATURES = {
    "resa_version_number": (_u32, []),
    "resa_version_string": (_str, []),
    "resa_abi_version": (_u32, []),
    "resa_status_string": (_str, [_int]),
    "resa_status_name": (_str, [_int]),
    "resa_block_size": (_u32, []),
    "resa_max_head_dim": (_u32, []),
    "resa_backend_available": (_i32, [_int]),
    "resa_ctx_create": (_int, [_int, _p, _P(_p)]),
    "resa_ctx_destroy": (None, [_p]),
    "resa_ctx_reset": (_int, [_p, _u32]),
    "resa_ctx_get_backend": (_int, [_p, _P(_int)]),
    "resa_ctx_last_error": (_str, [_p]),
    "resa_ctx_set_param": (_int, [_p, _int, _i64]),
    "resa_ctx_get_param": (_int, [_p, _int, _P(_i64)]),
    "resa_ctx_set_param_f64": (_int, [_p, _int, _f64]),
    "resa_ctx_set_preset": (_int, [_p, _int]),
    "resa_ctx_get_param_f64": (_int, [_p, _int, _P(_f64)]),
    "resa_param_bounds": (_int, [_int, _P(_i64), _P(_i64)]),
    "resa_param_bounds_f64": (_int, [_int, _P(_f64), _P(_f64)]),
    "resa_ctx_set_stream": (_int, [_p, _p]),
    "resa_ctx_synchronize": (_int, [_p]),
    "resa_seq_create": (_int, [_p, _P(_i32)]),
    "resa_seq_release": (_int, [_p, _i32]),
    "resa_seq_fork": (_int, [_p, _i32, _P(_i32)]),
    "resa_seq_length": (_int, [_p, _i32, _P(_i64)]),
    "resa_seq_pending": (_int, [_p, _i32, _P(_i64)]),
    "resa_seq_rectify_due": (_int, [_p, _i32, _P(_i32)]),
    "resa_ctx_free_tokens": (_int, [_p, _P(_i64)]),
    "resa_seq_set_span": (_int, [_p, _i32, _i64, _i64]),
    "resa_ctx_step_begin": (_int, [_p, _i32, _P(_i32), _P(_i32), _P(_i32), _u32]),
    "resa_ctx_step_attend": (_int, [_p, _i32, _p, _p, _p, _p, _u32]),
    "resa_ctx_step_end": (_int, [_p, _u32]),
    # float * and int32_t * buffers are passed as addresses, like the IO buffers
    "resa_ctx_step_block_scores": (_int, [_p, _i32, _p, _i64, _p, _p, _p, _u32]),
    "resa_ctx_step_thresholds": (_int, [_p, _i32, _i64, _p, _p, _p, _p, _p, _u32]),
    "resa_ctx_step_attend_ex": (_int, [_p, _i32, _p, _p, _p, _p, _p, _p, _p, _u32]),
    "resa_ctx_step_cancel": (_int, [_p]),
    "resa_merge_states": (_int, [_int, _i32, _i64, _i32, _p, _p, _p, _p, _u32]),
    "resa_ctx_merge_states": (_int, [_p, _i32, _i64, _p, _p, _p, _p, _u32]),
    "resa_seq_selected_blocks": (_int, [_p, _i32, _i32, _i32, _P(_i32), _i64, _P(_i64)]),
}

# The ABI these declarations describe (RESA_ABI_VERSION, the SONAME major).
ABI_VERSION = 0


def _installed_libdir():
    try:
        from ._version import LIBDIR  # written by meson; absent in the source tree
    except ImportError:
        return ""
    return LIBDIR


def _candidates():
    env = os.environ.get("RESA_LIBRARY")
    if env:
        yield env
        return  # an explicit choice: never fall back to another copy silently
    here = os.path.dirname(os.path.abspath(__file__))
    # plain libresa.so first (what the wheel holds), then any versioned name
    for name in sorted(glob.glob(os.path.join(here, "libresa.so*")), key=len):
        yield name
    found = ctypes.util.find_library("resa")
    if found:
        yield found
    yield "libresa.so.%d" % ABI_VERSION
    libdir = _installed_libdir()
    if libdir:
        yield os.path.join(libdir, "libresa.so.%d" % ABI_VERSION)


def _load():
    errors = []
    for candidate in _candidates():
        try:
            return ctypes.CDLL(candidate), candidate
        except OSError as e:
            errors.append("%s: %s" % (candidate, e))
    raise ImportError("resa: libresa could not be loaded (set RESA_LIBRARY to its path); tried "
                      + "; ".join(errors))


def _declare(cdll):
    for name, (result, args) in SIGNATURES.items():
        f = getattr(cdll, name)
        f.restype, f.argtypes = result, args


lib, path = _load()
_declare(lib)
if lib.resa_abi_version() != ABI_VERSION:
    raise ImportError("resa: %s has ABI version %d; these bindings need %d"
                      % (path, lib.resa_abi_version(), ABI_VERSION))
