# SPDX-License-Identifier: MIT
"""Context (one resa_ctx) and Step (one open step, a context manager).

Every buffer is checked in Python before the C call (dtype, device, shape,
contiguity, writability: _tensors.check), so a wrong argument is a TypeError
or ValueError naming it, never a crash or a silent out-of-bounds access.
Buffers are passed by address: no copies on the hot path.  Like resa_ctx, a
Context is not synchronized: one thread at a time (docs/THREADING.md)."""
import ctypes
import operator

import numpy as np

from . import _tensors
from ._enums import (Backend, DType, GroupScore, Mode, Param, Reset, STEP_REPLAY, REAL_PARAMS,
                     SummaryFormat)
from ._errors import ContextClosedError, ResaError, check, error_for
from ._lib import lib

__all__ = ["Context", "Step", "merge_states"]

_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1

# Context() keywords that name a parameter, in the order they are set: the
# model shape first so that a later failure names the parameter at fault.
_FIRST = (Param.NUM_LAYERS, Param.NUM_Q_HEADS, Param.NUM_KV_HEADS, Param.HEAD_DIM,
          Param.IO_DTYPE, Param.KV_DTYPE)


def _param(p):
    if isinstance(p, Param):
        return p
    if isinstance(p, str):
        try:
            return Param[p.upper()]
        except KeyError:
            raise ValueError("unknown parameter %r (see resa.Param)" % p) from None
    try:
        return Param(operator.index(p))
    except (TypeError, ValueError):
        raise ValueError("unknown parameter %r (see resa.Param)" % (p,)) from None


def _backend(b):
    if isinstance(b, str):
        try:
            return Backend[b.upper()]
        except KeyError:
            raise ValueError("backend: expected 'cpu', 'cuda' or 'auto', got %r" % b) from None
    return Backend(b)


def _int(value, name, lo=_I32_MIN, hi=_I32_MAX):
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError("%s: expected an integer, got %s" % (name, type(value).__name__)) from None
    if not lo <= v <= hi:  # ctypes would silently truncate
        raise ValueError("%s: %d is out of range [%d, %d]" % (name, v, lo, hi))
    return v


def _int_list(values, name, n=None):
    """A list of int32 from an int (repeated n times when n is given), a
    sequence or a numpy array."""
    if n is not None and not hasattr(values, "__len__"):
        return [_int(values, name)] * n
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not hasattr(values, "__len__"):
        return [_int(values, name)]
    return [_int(v, "%s[%d]" % (name, i)) for i, v in enumerate(values)]


def _param_value(p, value):
    if p in REAL_PARAMS:
        return float(value)
    if p in (Param.IO_DTYPE, Param.KV_DTYPE):
        return int(_tensors.to_dtype(value, p.name.lower()))
    if p == Param.SUMMARY_FORMAT and isinstance(value, str):
        key = {"kv": "KV_DTYPE", "fp8": "FP8_E4M3"}.get(value.lower(), value.upper())
        try:
            return int(SummaryFormat[key])
        except KeyError:
            raise ValueError("summary_format: expected 'kv_dtype' or 'fp8_e4m3', got %r"
                             % value) from None
    if p == Param.GROUP_SCORE and isinstance(value, str):
        try:
            return int(GroupScore[value.upper()])
        except KeyError:
            raise ValueError("group_score: expected 'pooled' or 'head_share', got %r"
                             % value) from None
    return _int(value, p.name.lower(), _I64_MIN, _I64_MAX)


_QUERY_MODES = (Mode.QUERY_DENSE, Mode.QUERY_SPARSE)
_SPARSE_MODES = (Mode.DECODE, Mode.QUERY_SPARSE)


class _StepState:
    """What attend checks against, fixed at step_begin."""
    __slots__ = ("rows", "entries", "all_kv", "no_kv", "sparse", "replay", "dtype", "hq", "hkv",
                 "d", "device", "stream", "side")


def _want(flag):
    """Whether an optional output (lse=, lse_out=) is asked for: True or a buffer."""
    return flag is not None and flag is not False


def _pair(value, name, what):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError("%s: expected a pair %s, got %s" % (name, what, type(value).__name__))
    return value


def _empty(shape, dtype, like, like_view, device):
    """An uninitialized output of dtype (a DType, "float32" or "int32"):
    a torch tensor beside a torch `like`, a numpy array beside a numpy one;
    for another producer or none, numpy on the host and torch on CUDA."""
    torch_like = like_view is not None and like_view.kind == "torch"
    if device == "cpu" and not torch_like:
        return np.empty(shape, np.dtype(dtype) if isinstance(dtype, str)
                        else _tensors.numpy_dtype(dtype))
    import torch
    return torch.empty(shape, dtype=_tensors.torch_dtype(dtype),
                       device=like.device if torch_like else device)


def _overlaps(a, a_bytes, b, b_bytes):
    return a_bytes > 0 and b_bytes > 0 and a.address < b.address + b_bytes and \
        b.address < a.address + a_bytes


def _describe_merged(obj, name, stream, host_only):
    view = _tensors.describe(obj, name, stream)
    if host_only and view.device != "cpu":
        raise ValueError("%s: resa.merge_states takes host memory (numpy arrays, CPU tensors), "
                         "got %s; Context.merge_states merges in a context's memory space"
                         % (name, view.device))
    return view


def _merge_args(parts_out, parts_lse, out, lse_out, dtype, d, device, stream):
    """The checked buffers of a merge: (n_parts, n_rows, head_dim, dtype,
    out, lse_out or None, the views).  dtype, d: the context's IO_DTYPE and
    HEAD_DIM, or None (resa.merge_states: parts_out's, on the host)."""
    host_only = dtype is None
    vpo = _describe_merged(parts_out, "parts_out", stream, host_only)
    shape = tuple(vpo.shape)
    if len(shape) < 3 or shape[0] < 1:
        raise ValueError("parts_out: expected shape [n_parts, rows, d] or [n_parts, T, Hq, d] "
                         "with n_parts >= 1, got %s" % _tensors._shape_text(shape))
    if d is None:
        d = shape[-1]
        why = "[n_parts, rows..., d]"
    else:
        why = "[n_parts, rows..., d] with d = %d, the context's HEAD_DIM" % d
    dtype = _tensors.check_io(vpo, "parts_out", dtype, "the context's IO_DTYPE",
                              shape[:-1] + (d,), why, device)
    n_parts, rows = shape[0], 1
    for n in shape[1:-1]:
        rows *= n
    _int(n_parts, "parts_out: n_parts")
    vpl = _describe_merged(parts_lse, "parts_lse", stream, host_only)
    _tensors.check_fixed(vpl, "parts_lse", "float32", shape[:-1], "parts_out's shape without d",
                         device)
    if out is None:
        out = _empty(shape[1:], dtype, parts_out, vpo, device)
    vo = _describe_merged(out, "out", stream, host_only)
    _tensors.check_io(vo, "out", dtype, "parts_out's dtype", shape[1:],
                      "parts_out's shape without n_parts", device, writable=True)
    views = [vpo, vpl, vo]
    if _want(lse_out):
        if lse_out is True:
            lse_out = _empty(shape[1:-1], "float32", parts_out, vpo, device)
        vl = _describe_merged(lse_out, "lse_out", stream, host_only)
        _tensors.check_fixed(vl, "lse_out", "float32", shape[1:-1],
                             "parts_out's shape without n_parts and d", device, writable=True)
        views.append(vl)
    else:
        lse_out = None
    out_bytes = rows * d * _tensors.itemsize(dtype)
    sizes = {"parts_out": n_parts * out_bytes, "parts_lse": n_parts * rows * 4, "out": out_bytes,
             "lse_out": rows * 4}
    for written, wname in ((vo, "out"), (views[3] if lse_out is not None else None, "lse_out")):
        for read, rname in ((vpo, "parts_out"), (vpl, "parts_lse")):
            if written is not None and _overlaps(written, sizes[wname], read, sizes[rname]):
                raise ValueError("%s: must not overlap %s" % (wname, rname))
    return n_parts, rows, d, dtype, out, lse_out, views


def merge_states(parts_out, parts_lse, out=None, lse_out=None):
    """resa_merge_states, on host memory (numpy arrays, CPU tensors): joins
    the attention states of the same rows over disjoint key sets.

    parts_out [P, rows, d] (or [P, T, Hq, d]: the parts' attend outputs
    stacked) of float32, float16 or bfloat16; parts_lse [P, rows] (or [P, T,
    Hq]) float32.  Returns out (parts_out's shape without P and its dtype;
    allocated like parts_out when None), or (out, lse_out) when lse_out is
    True (allocated) or a float32 buffer of shape [rows] (or [T, Hq]).  A row
    whose every part is -inf gets a NaN out and lse -inf; a part with lse
    -inf is never read.  Thread-safe; no context needed."""
    n_parts, rows, d, dtype, out, lse_out, views = _merge_args(
        parts_out, parts_lse, out, lse_out, None, None, "cpu", None)
    status = lib.resa_merge_states(int(dtype), n_parts, rows, _int(d, "head_dim"),
                                   views[0].address, views[1].address, views[2].address,
                                   views[3].address if lse_out is not None else None, 0)
    if status != 0:  # no context, so no message: say what was passed
        raise error_for(status, "merge_states: refused dtype %s, n_parts %d, n_rows %d, "
                        "head_dim %d (head_dim must be in [1, %d])"
                        % (dtype.name, n_parts, rows, d, lib.resa_max_head_dim()))
    return out if lse_out is None else (out, lse_out)


class Context:
    """One libresa context.

    Context(backend="cpu", *, num_layers, num_q_heads, num_kv_heads, head_dim,
            io_dtype=DType.F32, kv_dtype=None (= io_dtype), **params)

    params: any other Param by lowercase name (max_tokens=, block_size=,
    select_fraction=, ...).  Dtypes may be DType, names, numpy or torch dtypes.
    """

    def __init__(self, backend=Backend.CPU, *, num_layers, num_q_heads, num_kv_heads, head_dim,
                 io_dtype=DType.F32, kv_dtype=None, **params):
        self._h = None
        backend = _backend(backend)
        values = {Param.NUM_LAYERS: num_layers, Param.NUM_Q_HEADS: num_q_heads,
                  Param.NUM_KV_HEADS: num_kv_heads, Param.HEAD_DIM: head_dim,
                  Param.IO_DTYPE: io_dtype,
                  Param.KV_DTYPE: io_dtype if kv_dtype is None else kv_dtype}
        for key, value in params.items():
            try:
                p = Param[key.upper()]
            except KeyError:
                p = None
            if p is None or p in values or key != key.lower():
                raise TypeError("Context() got an unexpected keyword argument %r" % key)
            values[p] = value
        # convert (and so validate the Python types of) everything before creating
        converted = [(p, _param_value(p, values[p])) for p in _FIRST]
        converted += [(p, _param_value(p, v)) for p, v in values.items() if p not in _FIRST]

        handle = ctypes.c_void_p()
        status = lib.resa_ctx_create(int(backend), None, ctypes.byref(handle))
        if status != 0:  # no context to ask for details: the status's own text
            raise error_for(status, "Context(%r): %s" % (
                backend.name.lower(), lib.resa_status_string(status).decode()))
        self._h = handle
        self._step = None
        self._shape = None       # (layers, hq, hkv, d, io dtype), read at the first step
        self._cuda_index = None  # the device current at create, for CUDA contexts
        self._stream_mode = "follow"  # "follow" torch's stream, "explicit", or "side" (graphs)
        self._stream = 0         # the cudaStream_t libresa enqueues on (0: legacy default)
        self._stream_obj = None  # the torch stream of _stream, to order a switch after it
        self._side = None        # a StepGraph's stream
        try:
            for p, v in converted:
                self._set(p, v)
            if self.backend == Backend.CUDA:
                from . import _cuda
                self._cuda_index = _cuda.current_device()
        except BaseException:
            self.close()
            raise

    # ---- lifecycle ---------------------------------------------------------

    def _handle(self):
        h = self._h
        if h is None:
            raise ContextClosedError()
        return h

    def close(self):
        """Destroys the context (idempotent).  Every later call raises
        ContextClosedError."""
        h = getattr(self, "_h", None)
        if h is not None:
            self._h = None
            self._step = None
            lib.resa_ctx_destroy(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    def __repr__(self):
        if self._h is None:
            return "<resa.Context (closed)>"
        return "<resa.Context backend=%s device=%s>" % (self.backend.name.lower(), self.device)

    def reset(self, what=Reset.SESSION):
        """resa_ctx_reset: Reset.SESSION releases every sequence and the pool
        and unlocks the shape; Reset.PARAMS restores the defaults."""
        h = self._handle()
        check(lib.resa_ctx_reset(h, _int(what, "what", 0, 0xFFFFFFFF)), h)
        if what & Reset.SESSION:
            self._step = None
        self._shape = None

    @property
    def backend(self):
        """The Backend this context runs on (AUTO resolved; AUTO may still
        fall back to CPU at the first seq_create)."""
        h = self._handle()
        b = ctypes.c_int()
        check(lib.resa_ctx_get_backend(h, ctypes.byref(b)), h)
        return Backend(b.value)

    @property
    def device(self):
        """Where q, k, v and out must live, torch-style: "cpu" or "cuda:N"."""
        if self.backend == Backend.CPU:
            return "cpu"
        if self._cuda_index is None:
            from . import _cuda
            self._cuda_index = _cuda.current_device()
        return "cuda:%d" % self._cuda_index

    @property
    def last_error(self):
        """The text of the last failure on this context ("" after a success)."""
        text = lib.resa_ctx_last_error(self._handle())
        return text.decode("utf-8", "replace") if text else ""

    # ---- parameters ----------------------------------------------------------

    def _set(self, p, value):
        h = self._handle()
        if p in REAL_PARAMS:
            check(lib.resa_ctx_set_param_f64(h, int(p), value), h)
        else:
            check(lib.resa_ctx_set_param(h, int(p), value), h)
        self._shape = None

    def set_preset(self, preset):
        """resa_ctx_set_preset: Preset.DEFAULT (the library's defaults) or
        Preset.PAPER (the paper's method) for every selection and rectification
        parameter at once (docs/quality.md)."""
        h = self._handle()
        check(lib.resa_ctx_set_preset(h, _int(preset, "preset", -2**31, 2**31 - 1)), h)
        self._shape = None

    def set(self, param, value):
        """Sets a parameter (Param or lowercase name); int or float per parameter."""
        p = _param(param)
        self._set(p, _param_value(p, value))

    def get(self, param):
        """A parameter's value: float for the real ones, DType/SummaryFormat/
        GroupScore for those enums, else int.  SOFTMAX_SCALE reads the effective scale."""
        p = _param(param)
        h = self._handle()
        if p in REAL_PARAMS:
            v = ctypes.c_double()
            check(lib.resa_ctx_get_param_f64(h, int(p), ctypes.byref(v)), h)
            return v.value
        v = ctypes.c_int64()
        check(lib.resa_ctx_get_param(h, int(p), ctypes.byref(v)), h)
        if p in (Param.IO_DTYPE, Param.KV_DTYPE):
            return DType(v.value)
        if p == Param.SUMMARY_FORMAT:
            return SummaryFormat(v.value)
        if p == Param.GROUP_SCORE:
            return GroupScore(v.value)
        return v.value

    def bounds(self, param):
        """(lo, hi) of a parameter, ints or floats."""
        self._handle()
        from ._info import param_bounds
        return param_bounds(param)

    # ---- streams ----------------------------------------------------------------

    def set_stream(self, stream):
        """The CUDA stream libresa enqueues on: a torch.cuda.Stream (or any
        object with .cuda_stream or .ptr), an int address, or None (the legacy
        default stream).  From then on the context no longer follows torch's
        current stream; ordering against other streams is the caller's job.
        CPU contexts accept only None."""
        h = self._handle()
        if stream is None:
            addr = 0
        elif isinstance(stream, int):
            addr = stream
        elif hasattr(stream, "cuda_stream"):
            addr = stream.cuda_stream
        elif hasattr(stream, "ptr"):  # CuPy
            addr = stream.ptr
        else:
            raise TypeError("stream: expected a torch.cuda.Stream, an int address or None, got %s"
                            % type(stream).__name__)
        addr = _int(addr, "stream", 0, (1 << 64) - 1)
        check(lib.resa_ctx_set_stream(h, addr or None), h)
        self._stream_mode, self._stream = "explicit", addr
        self._stream_obj = stream if hasattr(stream, "wait_stream") else None

    def _use_side_stream(self, stream):
        """For StepGraph: every later step runs on `stream`, ordered against
        torch's current stream around each attend and replay."""
        self._stream_mode, self._side = "side", stream

    def _follow_stream(self, h):
        """At step_begin of a CUDA context: point libresa at torch's current
        stream (or the StepGraph's), after the work on the previous one."""
        if self._stream_mode == "explicit":
            return
        from . import _cuda
        torch = _cuda.torch()
        if torch is None:  # no torch: the stream set_stream gave, or the default
            return
        if self._stream_mode == "side":
            target = self._side
        else:
            target = torch.cuda.current_stream(self._cuda_index)
        addr = target.cuda_stream
        if addr == self._stream and self._stream_obj is not None:
            return
        previous = self._stream_obj
        if previous is None:  # nothing followed yet: libresa used the legacy default stream
            previous = torch.cuda.default_stream(self._cuda_index)
        if previous.cuda_stream != addr:
            target.wait_stream(previous)  # earlier steps' cache writes come first
        if addr != self._stream:
            check(lib.resa_ctx_set_stream(h, addr or None), h)
        self._stream, self._stream_obj = addr, target

    def synchronize(self):
        """Waits for all work of the context; reports deferred device faults."""
        h = self._handle()
        check(lib.resa_ctx_synchronize(h), h)

    # ---- sequences ------------------------------------------------------------

    def _out_i32(self, fn, *args):
        h = self._handle()
        v = ctypes.c_int32()
        check(fn(h, *args, ctypes.byref(v)), h)
        return v.value

    def _out_i64(self, fn, *args):
        h = self._handle()
        v = ctypes.c_int64()
        check(fn(h, *args, ctypes.byref(v)), h)
        return v.value

    def seq_create(self):
        """A new empty sequence's id.  The first call locks the shape."""
        return self._out_i32(lib.resa_seq_create)

    def seq_release(self, seq):
        h = self._handle()
        check(lib.resa_seq_release(h, _int(seq, "seq")), h)

    def seq_fork(self, seq):
        """A new sequence sharing seq's cache (copy-on-write); its id."""
        return self._out_i32(lib.resa_seq_fork, _int(seq, "seq"))

    def seq_length(self, seq):
        return self._out_i64(lib.resa_seq_length, _int(seq, "seq"))

    def seq_pending(self, seq):
        return self._out_i64(lib.resa_seq_pending, _int(seq, "seq"))

    def seq_rectify_due(self, seq):
        return bool(self._out_i32(lib.resa_seq_rectify_due, _int(seq, "seq")))

    def free_tokens(self):
        return self._out_i64(lib.resa_ctx_free_tokens)

    def seq_set_span(self, seq, first_token, global_length=-1):
        """resa_seq_set_span (context parallelism): this context holds the
        positions [first_token, first_token + length) of a longer sequence.
        first_token: a multiple of BLOCK_SIZE, changed only while seq is
        empty; global_length: the whole sequence's length (where QUERY rows
        sit), or -1 when this context holds the tail and follows its growth.
        A context whose global_length lies past its tokens takes only QUERY
        entries for seq."""
        h = self._handle()
        check(lib.resa_seq_set_span(h, _int(seq, "seq"),
                                    _int(first_token, "first_token", _I64_MIN, _I64_MAX),
                                    _int(global_length, "global_length", _I64_MIN, _I64_MAX)), h)

    def selected_blocks(self, seq, layer, kv_head):
        """Block indices (ascending, global: a span's first_token / BLOCK_SIZE
        counts) seq's last DECODE or QUERY_SPARSE attended for (layer,
        kv_head); needs record_selection=1.  CUDA: synchronizes."""
        h = self._handle()
        args = (_int(seq, "seq"), _int(layer, "layer"), _int(kv_head, "kv_head"))
        count = ctypes.c_int64()
        check(lib.resa_seq_selected_blocks(h, *args, None, 0, ctypes.byref(count)), h)
        blocks = (ctypes.c_int32 * max(count.value, 1))()
        check(lib.resa_seq_selected_blocks(h, *args, blocks, count.value, ctypes.byref(count)), h)
        return list(blocks[:count.value])

    # ---- steps ------------------------------------------------------------------

    def _shape_params(self):
        if self._shape is None:
            g = self.get
            self._shape = (g(Param.NUM_LAYERS), g(Param.NUM_Q_HEADS), g(Param.NUM_KV_HEADS),
                           g(Param.HEAD_DIM), g(Param.IO_DTYPE))
        return self._shape

    def step(self, seqs, modes, n_tokens, replay=False):
        """Begins a step and returns it as a context manager: a normal exit
        ends it, an exception cancels it (and propagates)."""
        return Step(self, seqs, modes, n_tokens, replay)

    def step_begin(self, seqs, modes, n_tokens, replay=False):
        """resa_ctx_step_begin.  seqs: ids; modes: one Mode or one per
        sequence; n_tokens: one count or one per sequence."""
        h = self._handle()
        seqs = _int_list(seqs, "seqs")
        n = len(seqs)
        modes = _int_list(modes, "modes", n)
        n_tokens = _int_list(n_tokens, "n_tokens", n)
        if len(modes) != n or len(n_tokens) != n:  # C reads n of each
            raise ValueError("step: seqs, modes and n_tokens differ in length (%d, %d, %d)"
                             % (n, len(modes), len(n_tokens)))
        on_cuda = self.backend == Backend.CUDA
        if on_cuda:
            self._follow_stream(h)
        arr = ctypes.c_int32 * n
        check(lib.resa_ctx_step_begin(h, n, arr(*seqs), arr(*modes), arr(*n_tokens),
                                      STEP_REPLAY if replay else 0), h)
        try:
            _, hq, hkv, d, dtype = self._shape_params()
        except BaseException:
            lib.resa_ctx_step_cancel(h)
            raise
        st = _StepState()
        st.rows = sum(n_tokens)
        st.entries = n
        st.all_kv = all(m == Mode.APPEND_KV for m in modes)
        st.no_kv = all(m in _QUERY_MODES for m in modes)  # nothing stores K/V
        st.sparse = any(m in _SPARSE_MODES for m in modes)
        st.replay = bool(replay)
        st.dtype, st.hq, st.hkv, st.d = dtype, hq, hkv, d
        st.device = self.device if on_cuda else "cpu"
        st.stream = self._stream if on_cuda else None
        st.side = self._side if on_cuda and self._stream_mode == "side" else None
        self._step = st

    def step_end(self):
        """Commits the open step.  A missing layer is BadStateError and the
        step stays open."""
        h = self._handle()
        check(lib.resa_ctx_step_end(h, 0), h)
        self._step = None

    def step_cancel(self):
        """Abandons the open step (closed even when this reports an error)."""
        h = self._handle()
        status = lib.resa_ctx_step_cancel(h)
        self._step = None
        check(status, h)

    def _allocate_like(self, q, view, st):
        if view.kind == "numpy":
            return np.empty(q.shape, q.dtype)
        if view.kind == "torch":
            import torch
            return torch.empty_like(q, memory_format=torch.contiguous_format)
        if st.device == "cpu":  # another DLPack producer: numpy on the host
            return np.empty(view.shape, _tensors.numpy_dtype(st.dtype))
        import torch
        return torch.empty(view.shape, dtype=_tensors.torch_dtype(st.dtype), device=st.device)

    def _open(self, what):
        h = self._handle()
        st = self._step
        if st is None:
            raise ValueError("%s: no step is open (use ctx.step(...) or ctx.step_begin)" % what)
        return h, st

    def _enqueue(self, h, side, call):
        """Runs call() (a libresa call returning a status) and raises its
        error.  side: a StepGraph's stream, which eager work orders against
        torch's current stream both ways; inside a capture both are the same
        stream."""
        if side is None:
            check(call(), h)
            return
        import torch
        current = torch.cuda.current_stream(self._cuda_index)
        if current.cuda_stream != side.cuda_stream:
            side.wait_stream(current)
            try:
                check(call(), h)
            finally:
                current.wait_stream(side)
        else:
            check(call(), h)

    def attend(self, layer, q, k, v, out=None, *, lse=None, thresholds=None):
        """resa_ctx_step_attend for one layer of the open step; returns out
        (allocated like q when None).  q, out: [T, Hq, d]; k, v: [T, Hkv, d];
        the context's IO dtype, on its device, C-contiguous.  k and v may be
        None when every entry is a QUERY mode.

        lse: True (allocated) or a float32 [T, Hq] buffer: each row's
        log-sum-exp over the keys it attended here (resa_ctx_step_attend_ex);
        then (out, lse) is returned.  thresholds: (scores float32, blocks
        int32), each [n_entries, Hkv], from thresholds(): the DECODE and
        QUERY_SPARSE entries attend the candidates at or above them."""
        h, st = self._open("attend")
        layer = _int(layer, "layer")
        rows, dtype, device, stream = st.rows, st.dtype, st.device, st.stream
        check_view = _tensors.check
        kv_shape = (rows, st.hkv, st.d)
        q_shape = (rows, st.hq, st.d)
        kv_views = []  # the views (DLPack capsules) stay alive until the call
        for name, buf in (("k", k), ("v", v)):
            if buf is None:
                if not st.no_kv:
                    raise ValueError("%s: required (None only when every entry is "
                                     "Mode.QUERY_DENSE or Mode.QUERY_SPARSE)" % name)
                kv_views.append(None)
                continue
            view = _tensors.describe(buf, name, stream)
            check_view(view, name, dtype, kv_shape, "[T, Hkv, d]", rows, device)
            kv_views.append(view)
        vk, vv = kv_views
        k_addr = vk.address if vk is not None else None
        v_addr = vv.address if vv is not None else None
        q_addr = out_addr = None
        vq = None
        if q is None:
            if not st.all_kv:
                raise ValueError("q: required (None only when every entry is Mode.APPEND_KV)")
        else:
            vq = _tensors.describe(q, "q", stream)
            check_view(vq, "q", dtype, q_shape, "[T, Hq, d]", rows, device)
            q_addr = vq.address
            if out is None:
                out = self._allocate_like(q, vq, st)
        if out is None:
            if not st.all_kv:
                raise ValueError("out: required when q is None")
        else:
            vo = _tensors.describe(out, "out", stream)
            check_view(vo, "out", dtype, q_shape, "[T, Hq, d]", rows, device, writable=True)
            out_addr = vo.address
        want_lse, lse_addr = _want(lse), None
        if want_lse:
            if lse is True:
                like, like_view = (q, vq) if vq is not None else (k, vk)
                lse = _empty((rows, st.hq), "float32", like, like_view, device)
            vl = _tensors.describe(lse, "lse", stream)
            _tensors.check_fixed(vl, "lse", "float32", (rows, st.hq),
                                 "[T, Hq] with T = %d rows of the open step" % rows, device,
                                 writable=True)
            lse_addr = vl.address
        ts_addr = tb_addr = None
        if thresholds is not None:
            ts, tb = _pair(thresholds, "thresholds", "(threshold_scores, threshold_blocks)")
            explain = "[n_entries, Hkv] with %d entries in the open step" % st.entries
            vts = _tensors.describe(ts, "threshold_scores", stream)
            _tensors.check_fixed(vts, "threshold_scores", "float32", (st.entries, st.hkv),
                                 explain, device)
            vtb = _tensors.describe(tb, "threshold_blocks", stream)
            _tensors.check_fixed(vtb, "threshold_blocks", "int32", (st.entries, st.hkv),
                                 explain, device)
            ts_addr, tb_addr = vts.address, vtb.address
        if want_lse or thresholds is not None:
            def call():
                return lib.resa_ctx_step_attend_ex(h, layer, q_addr, k_addr, v_addr, out_addr,
                                                   lse_addr, ts_addr, tb_addr, 0)
        else:
            def call():
                return lib.resa_ctx_step_attend(h, layer, q_addr, k_addr, v_addr, out_addr, 0)
        self._enqueue(h, st.side, call)
        return (out, lse) if want_lse else out

    def block_scores(self, layer, q, capacity, *, scores=None, blocks=None, counts=None):
        """resa_ctx_step_block_scores, phase 1 of the two-phase selection:
        for every entry i and KV head h of the open step, this context's best
        candidates of a DECODE or QUERY_SPARSE entry (at most K_i = n_i -
        forced_i of them; other entries list none).  q: the layer's [T, Hq,
        d] queries (None when no entry is sparse); capacity >= every K_i
        (else InvalidArgumentError naming the entry).  Returns (scores
        float32 [n_entries, Hkv, capacity], blocks int32 [n_entries, Hkv,
        capacity] of global indices, counts int32 [n_entries, Hkv]): the
        first counts[i, h] of scores[i, h] and blocks[i, h] are valid, in no
        particular order.  Outputs are allocated like q when None."""
        h, st = self._open("block_scores")
        layer = _int(layer, "layer")
        capacity = _int(capacity, "capacity", 0, _I64_MAX)
        rows, device, stream = st.rows, st.device, st.stream
        q_addr, vq = None, None
        if q is None:
            if st.sparse:
                raise ValueError("q: required (None only when no entry is Mode.DECODE or "
                                 "Mode.QUERY_SPARSE)")
        else:
            vq = _tensors.describe(q, "q", stream)
            _tensors.check(vq, "q", st.dtype, (rows, st.hq, st.d), "[T, Hq, d]", rows, device)
            q_addr = vq.address
        lists = (st.entries, st.hkv, capacity)
        explain = "[n_entries, Hkv, capacity] with %d entries in the open step" % st.entries
        outs = []
        for name, buf, dtype, shape, text in (
                ("scores", scores, "float32", lists, explain),
                ("blocks", blocks, "int32", lists, explain),
                ("counts", counts, "int32", lists[:2],
                 "[n_entries, Hkv] with %d entries in the open step" % st.entries)):
            if buf is None:
                buf = _empty(shape, dtype, q, vq, device)
            view = _tensors.describe(buf, name, stream)
            _tensors.check_fixed(view, name, dtype, shape, text, device, writable=True)
            outs.append((buf, view))
        (scores, vs), (blocks, vb), (counts, vc) = outs
        self._enqueue(h, st.side, lambda: lib.resa_ctx_step_block_scores(
            h, layer, q_addr, capacity, vs.address, vb.address, vc.address, 0))
        return scores, blocks, counts

    def thresholds(self, scores, blocks, counts, *, threshold_scores=None,
                   threshold_blocks=None):
        """resa_ctx_step_thresholds: from the block_scores lists of n_ranks
        contexts stacked as an all-gather leaves them (scores float32 and
        blocks int32 [n_ranks, n_entries, Hkv, capacity], counts int32
        [n_ranks, n_entries, Hkv]; n_ranks and capacity from the shape), the
        K_i-th best (score, block) of every (entry, KV head): returns
        (threshold_scores float32, threshold_blocks int32), each [n_entries,
        Hkv], (+inf, -1) where nothing is chosen by score; pass the pair to
        attend(thresholds=...).  Outputs are allocated like scores when None."""
        h, st = self._open("thresholds")
        device, stream = st.device, st.stream
        E, hkv = st.entries, st.hkv
        vs = _tensors.describe(scores, "scores", stream)
        shape = tuple(vs.shape)
        if len(shape) != 4 or shape[0] < 1 or shape[1:3] != (E, hkv):
            if vs.dtype_name != "float32":
                raise TypeError("scores: expected dtype float32, got %s" % vs.dtype_name)
            raise ValueError("scores: expected shape [n_ranks, %d, %d, capacity] ([n_ranks, "
                             "n_entries, Hkv, capacity] with n_ranks >= 1 and %d entries in the "
                             "open step), got %s" % (E, hkv, E, _tensors._shape_text(shape)))
        n_ranks, capacity = _int(shape[0], "scores: n_ranks"), shape[3]
        explain = "[n_ranks, n_entries, Hkv, capacity] as scores"
        _tensors.check_fixed(vs, "scores", "float32", shape, explain, device)
        vb = _tensors.describe(blocks, "blocks", stream)
        _tensors.check_fixed(vb, "blocks", "int32", shape, explain, device)
        vc = _tensors.describe(counts, "counts", stream)
        _tensors.check_fixed(vc, "counts", "int32", shape[:3], "[n_ranks, n_entries, Hkv] as "
                             "scores", device)
        outs = []
        for name, buf, dtype in (("threshold_scores", threshold_scores, "float32"),
                                 ("threshold_blocks", threshold_blocks, "int32")):
            if buf is None:
                buf = _empty((E, hkv), dtype, scores, vs, device)
            view = _tensors.describe(buf, name, stream)
            _tensors.check_fixed(view, name, dtype, (E, hkv), "[n_entries, Hkv] with %d entries "
                                 "in the open step" % E, device, writable=True)
            outs.append((buf, view))
        (threshold_scores, vts), (threshold_blocks, vtb) = outs
        self._enqueue(h, st.side, lambda: lib.resa_ctx_step_thresholds(
            h, n_ranks, capacity, vs.address, vb.address, vc.address, vts.address, vtb.address,
            0))
        return threshold_scores, threshold_blocks

    def merge_states(self, parts_out, parts_lse, out=None, lse_out=None):
        """resa_ctx_merge_states: resa.merge_states with the context's
        IO_DTYPE and HEAD_DIM, in its memory space (CUDA: device tensors, one
        kernel on the context's stream).  Inside a step or not."""
        h = self._handle()
        st = self._step
        _, _, _, d, dtype = self._shape_params()
        if st is not None:
            device, stream, side = st.device, st.stream, st.side
        elif self.backend == Backend.CUDA:
            self._follow_stream(h)  # as a step_begin would: torch's current stream
            device, stream = self.device, self._stream
            side = self._side if self._stream_mode == "side" else None
        else:
            device, stream, side = "cpu", None, None
        n_parts, rows, d, dtype, out, lse_out, views = _merge_args(
            parts_out, parts_lse, out, lse_out, dtype, d, device, stream)
        lse_addr = views[3].address if lse_out is not None else None
        self._enqueue(h, side, lambda: lib.resa_ctx_merge_states(
            h, n_parts, rows, views[0].address, views[1].address, views[2].address, lse_addr, 0))
        return out if lse_out is None else (out, lse_out)


class Step:
    """An open step.  `with ctx.step(seqs, modes, n_tokens) as step:` ends it
    on a normal exit and cancels it on an exception (which propagates); an
    end that fails (a layer not attended) cancels too, then raises."""

    def __init__(self, ctx, seqs, modes, n_tokens, replay=False):
        ctx.step_begin(seqs, modes, n_tokens, replay)
        self.ctx = ctx
        self._state = ctx._step

    @property
    def rows(self):
        """T, the rows of the step (the sum of n_tokens)."""
        return self._state.rows

    def _current(self):
        if self.ctx._step is not self._state:
            raise ValueError("step: this step is no longer open")

    def attend(self, layer, q, k, v, out=None, *, lse=None, thresholds=None):
        """Context.attend: returns out, or (out, lse) when lse is requested."""
        self._current()
        return self.ctx.attend(layer, q, k, v, out, lse=lse, thresholds=thresholds)

    def block_scores(self, layer, q, capacity, *, scores=None, blocks=None, counts=None):
        """Context.block_scores: (scores, blocks, counts)."""
        self._current()
        return self.ctx.block_scores(layer, q, capacity, scores=scores, blocks=blocks,
                                     counts=counts)

    def thresholds(self, scores, blocks, counts, *, threshold_scores=None,
                   threshold_blocks=None):
        """Context.thresholds: (threshold_scores, threshold_blocks)."""
        self._current()
        return self.ctx.thresholds(scores, blocks, counts, threshold_scores=threshold_scores,
                                   threshold_blocks=threshold_blocks)

    def end(self):
        self._current()
        self.ctx.step_end()

    def cancel(self):
        self._current()
        self.ctx.step_cancel()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.ctx._h is None or self.ctx._step is not self._state:
            return False  # closed, ended or cancelled inside the block
        if exc_type is None:
            try:
                self.ctx.step_end()
            except ResaError:
                self.ctx.step_cancel()
                raise
            return False
        try:
            self.ctx.step_cancel()
        except ResaError:
            pass  # the original exception matters more
        return False
