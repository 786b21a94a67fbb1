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

__all__ = ["Context", "Step"]

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


class _StepState:
    """What attend checks against, fixed at step_begin."""
    __slots__ = ("rows", "all_kv", "replay", "dtype", "hq", "hkv", "d", "device", "stream",
                 "side")


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

    def selected_blocks(self, seq, layer, kv_head):
        """Block indices (ascending) seq's last DECODE attended for (layer,
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
        st.all_kv = all(m == Mode.APPEND_KV for m in modes)
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

    def attend(self, layer, q, k, v, out=None):
        """resa_ctx_step_attend for one layer of the open step; returns out
        (allocated like q when None).  q, out: [T, Hq, d]; k, v: [T, Hkv, d];
        the context's IO dtype, on its device, C-contiguous."""
        h = self._handle()
        st = self._step
        if st is None:
            raise ValueError("attend: no step is open (use ctx.step(...) or ctx.step_begin)")
        layer = _int(layer, "layer")
        rows, dtype, device, stream = st.rows, st.dtype, st.device, st.stream
        check_view = _tensors.check
        kv_shape = (rows, st.hkv, st.d)
        q_shape = (rows, st.hq, st.d)
        if k is None or v is None:
            raise ValueError("%s: required" % ("k" if k is None else "v"))
        vk = _tensors.describe(k, "k", stream)
        check_view(vk, "k", dtype, kv_shape, "[T, Hkv, d]", rows, device)
        vv = _tensors.describe(v, "v", stream)
        check_view(vv, "v", dtype, kv_shape, "[T, Hkv, d]", rows, device)
        q_addr = out_addr = None
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
        side = st.side
        if side is None:
            check(lib.resa_ctx_step_attend(h, layer, q_addr, vk.address, vv.address, out_addr, 0),
                  h)
            return out
        # StepGraph's side stream: eager work waits for the producer stream and
        # the producer stream for it; inside a capture both are the same stream.
        import torch
        current = torch.cuda.current_stream(self._cuda_index)
        if current.cuda_stream != side.cuda_stream:
            side.wait_stream(current)
            try:
                check(lib.resa_ctx_step_attend(h, layer, q_addr, vk.address, vv.address, out_addr,
                                               0), h)
            finally:
                current.wait_stream(side)
        else:
            check(lib.resa_ctx_step_attend(h, layer, q_addr, vk.address, vv.address, out_addr, 0),
                  h)
        return out


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

    def attend(self, layer, q, k, v, out=None):
        self._current()
        return self.ctx.attend(layer, q, k, v, out)

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
