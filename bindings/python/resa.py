# SPDX-License-Identifier: MIT
"""ctypes bindings of libresa (include/resa.h), standard library only.

Every function of the C API is declared here with its exact argument and
result types; errors become ResaError carrying the status name and the
context's last-error text.  Buffers are anything exposing a writable or
readable buffer (ctypes arrays, array.array, numpy arrays, bytearray) or a
raw address (int) for device memory on the CUDA backend.

    import resa
    with resa.Context(resa.BACKEND_CPU) as ctx:
        ctx.set(resa.PARAM_HEAD_DIM, 64)
        seq = ctx.seq_create()
        ...
"""
import ctypes
import ctypes.util
import os

_i32, _i64, _u32, _f64 = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_double
_p = ctypes.c_void_p

# enums (fixed values, include/resa.h)
OK = 0
BACKEND_CPU, BACKEND_CUDA, BACKEND_AUTO = 0, 1, 2
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
MODE_APPEND, MODE_DECODE, MODE_RECTIFY, MODE_APPEND_KV = 0, 1, 2, 3
PARAM_NUM_LAYERS, PARAM_NUM_Q_HEADS, PARAM_NUM_KV_HEADS, PARAM_HEAD_DIM = 100, 101, 102, 103
PARAM_KV_DTYPE, PARAM_IO_DTYPE, PARAM_MAX_TOKENS, PARAM_MAX_SEQUENCES = 104, 105, 106, 107
PARAM_MAX_SEQ_TOKENS, PARAM_MAX_STEP_TOKENS, PARAM_SUMMARY_FORMAT = 108, 109, 110
SUMMARY_KV_DTYPE, SUMMARY_FP8_E4M3 = 0, 1
PARAM_BLOCK_SIZE, PARAM_SELECT_FRACTION, PARAM_SELECT_MIN_BLOCKS = 200, 201, 202
PARAM_LOCAL_BLOCKS, PARAM_SINK_BLOCKS, PARAM_RECTIFY_INTERVAL, PARAM_SOFTMAX_SCALE = \
    203, 204, 205, 206
PARAM_NUM_THREADS, PARAM_RECORD_SELECTION = 300, 301
REAL_PARAMS = {PARAM_SELECT_FRACTION, PARAM_SOFTMAX_SCALE}
RESET_SESSION, RESET_PARAMS = 1, 2
STEP_REPLAY = 1


def _load():
    path = os.environ.get("RESA_LIBRARY") or ctypes.util.find_library("resa") or "libresa.so.0"
    return ctypes.CDLL(path)


_lib = _load()

_SIGNATURES = {
    "resa_version_number": (_u32, []),
    "resa_version_string": (ctypes.c_char_p, []),
    "resa_abi_version": (_u32, []),
    "resa_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "resa_status_name": (ctypes.c_char_p, [ctypes.c_int]),
    "resa_block_size": (_u32, []),
    "resa_max_head_dim": (_u32, []),
    "resa_backend_available": (_i32, [ctypes.c_int]),
    "resa_ctx_create": (ctypes.c_int, [ctypes.c_int, _p, ctypes.POINTER(_p)]),
    "resa_ctx_destroy": (None, [_p]),
    "resa_ctx_reset": (ctypes.c_int, [_p, _u32]),
    "resa_ctx_get_backend": (ctypes.c_int, [_p, ctypes.POINTER(ctypes.c_int)]),
    "resa_ctx_last_error": (ctypes.c_char_p, [_p]),
    "resa_ctx_set_param": (ctypes.c_int, [_p, ctypes.c_int, _i64]),
    "resa_ctx_get_param": (ctypes.c_int, [_p, ctypes.c_int, ctypes.POINTER(_i64)]),
    "resa_ctx_set_param_f64": (ctypes.c_int, [_p, ctypes.c_int, _f64]),
    "resa_ctx_get_param_f64": (ctypes.c_int, [_p, ctypes.c_int, ctypes.POINTER(_f64)]),
    "resa_param_bounds": (ctypes.c_int, [ctypes.c_int, ctypes.POINTER(_i64), ctypes.POINTER(_i64)]),
    "resa_param_bounds_f64": (ctypes.c_int, [ctypes.c_int, ctypes.POINTER(_f64),
                                             ctypes.POINTER(_f64)]),
    "resa_ctx_set_stream": (ctypes.c_int, [_p, _p]),
    "resa_ctx_synchronize": (ctypes.c_int, [_p]),
    "resa_seq_create": (ctypes.c_int, [_p, ctypes.POINTER(_i32)]),
    "resa_seq_release": (ctypes.c_int, [_p, _i32]),
    "resa_seq_fork": (ctypes.c_int, [_p, _i32, ctypes.POINTER(_i32)]),
    "resa_seq_length": (ctypes.c_int, [_p, _i32, ctypes.POINTER(_i64)]),
    "resa_seq_pending": (ctypes.c_int, [_p, _i32, ctypes.POINTER(_i64)]),
    "resa_seq_rectify_due": (ctypes.c_int, [_p, _i32, ctypes.POINTER(_i32)]),
    "resa_ctx_free_tokens": (ctypes.c_int, [_p, ctypes.POINTER(_i64)]),
    "resa_ctx_step_begin": (ctypes.c_int, [_p, _i32, ctypes.POINTER(_i32), ctypes.POINTER(_i32),
                                           ctypes.POINTER(_i32), _u32]),
    "resa_ctx_step_attend": (ctypes.c_int, [_p, _i32, _p, _p, _p, _p, _u32]),
    "resa_ctx_step_end": (ctypes.c_int, [_p, _u32]),
    "resa_ctx_step_cancel": (ctypes.c_int, [_p]),
    "resa_seq_selected_blocks": (ctypes.c_int, [_p, _i32, _i32, _i32, ctypes.POINTER(_i32), _i64,
                                                ctypes.POINTER(_i64)]),
}
for _name, (_res, _args) in _SIGNATURES.items():
    _f = getattr(_lib, _name)
    _f.restype, _f.argtypes = _res, _args


class ResaError(RuntimeError):
    def __init__(self, status, message):
        self.status = status
        self.name = _lib.resa_status_name(status).decode()
        super().__init__(f"{self.name}: {message}")


def version():
    return _lib.resa_version_string().decode()


def backend_available(backend):
    return bool(_lib.resa_backend_available(backend))


def _address(buf):
    """A pointer to the memory of buf (None for NULL, an int for device memory)."""
    if buf is None or isinstance(buf, int):
        return buf
    if isinstance(buf, ctypes.Array):
        return ctypes.addressof(buf)
    if hasattr(buf, "ctypes"):  # numpy
        return buf.ctypes.data
    view = memoryview(buf)
    if view.readonly:  # a copy would not outlive this call's argument list
        raise TypeError("libresa needs a writable buffer (array.array, bytearray, numpy, ctypes)")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _ints(values):
    return (_i32 * len(values))(*values)


class Context:
    """One resa_ctx; use from one thread at a time (docs/THREADING.md)."""

    def __init__(self, backend=BACKEND_CPU):
        handle = _p()
        status = _lib.resa_ctx_create(backend, None, ctypes.byref(handle))
        if status != OK:
            raise ResaError(status, "resa_ctx_create failed")
        self._h = handle

    def close(self):
        if self._h:
            _lib.resa_ctx_destroy(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def _check(self, status):
        if status != OK:
            raise ResaError(status, _lib.resa_ctx_last_error(self._h).decode())

    def set(self, param, value):
        if param in REAL_PARAMS:
            self._check(_lib.resa_ctx_set_param_f64(self._h, param, float(value)))
        else:
            self._check(_lib.resa_ctx_set_param(self._h, param, int(value)))

    def get(self, param):
        if param in REAL_PARAMS:
            v = _f64()
            self._check(_lib.resa_ctx_get_param_f64(self._h, param, ctypes.byref(v)))
        else:
            v = _i64()
            self._check(_lib.resa_ctx_get_param(self._h, param, ctypes.byref(v)))
        return v.value

    def backend(self):
        v = ctypes.c_int()
        self._check(_lib.resa_ctx_get_backend(self._h, ctypes.byref(v)))
        return v.value

    def reset(self, what=RESET_SESSION):
        self._check(_lib.resa_ctx_reset(self._h, what))

    def synchronize(self):
        self._check(_lib.resa_ctx_synchronize(self._h))

    def seq_create(self):
        v = _i32()
        self._check(_lib.resa_seq_create(self._h, ctypes.byref(v)))
        return v.value

    def seq_release(self, seq):
        self._check(_lib.resa_seq_release(self._h, seq))

    def seq_fork(self, seq):
        v = _i32()
        self._check(_lib.resa_seq_fork(self._h, seq, ctypes.byref(v)))
        return v.value

    def _query(self, fn, seq, ctype):
        v = ctype()
        self._check(fn(self._h, seq, ctypes.byref(v)))
        return v.value

    def seq_length(self, seq):
        return self._query(_lib.resa_seq_length, seq, _i64)

    def seq_pending(self, seq):
        return self._query(_lib.resa_seq_pending, seq, _i64)

    def seq_rectify_due(self, seq):
        return bool(self._query(_lib.resa_seq_rectify_due, seq, _i32))

    def free_tokens(self):
        v = _i64()
        self._check(_lib.resa_ctx_free_tokens(self._h, ctypes.byref(v)))
        return v.value

    def step_begin(self, seqs, modes, n_tokens, flags=0):
        self._check(_lib.resa_ctx_step_begin(self._h, len(seqs), _ints(seqs), _ints(modes),
                                             _ints(n_tokens), flags))

    def step_attend(self, layer, q, k, v, out):
        self._check(_lib.resa_ctx_step_attend(self._h, layer, _address(q), _address(k),
                                              _address(v), _address(out), 0))

    def step_end(self):
        self._check(_lib.resa_ctx_step_end(self._h, 0))

    def step_cancel(self):
        self._check(_lib.resa_ctx_step_cancel(self._h))

    def selected_blocks(self, seq, layer, kv_head):
        count = _i64()
        self._check(_lib.resa_seq_selected_blocks(self._h, seq, layer, kv_head, None, 0,
                                                  ctypes.byref(count)))
        blocks = (_i32 * max(count.value, 1))()
        self._check(_lib.resa_seq_selected_blocks(self._h, seq, layer, kv_head, blocks,
                                                  count.value, ctypes.byref(count)))
        return list(blocks[:count.value])
