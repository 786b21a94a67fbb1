# SPDX-License-Identifier: MIT
"""Buffers in, (address, dtype, shape, device, writable) out, never a copy.

describe() takes a numpy array, a torch tensor or any DLPack producer and
returns a View of its memory; the checks against a step's expectations are in
check().  torch is never imported here: a torch tensor can only exist when
torch is already in sys.modules.  Every message names the argument."""
import sys

import numpy as np

from . import _dlpack
from ._enums import DType

__all__ = ["View", "describe", "check", "check_fixed", "check_io", "to_dtype", "numpy_dtype",
           "torch_dtype", "itemsize"]

# numpy and DLPack spell the three IO types the same way
_BY_NAME = {"float32": DType.F32, "float16": DType.F16, "bfloat16": DType.BF16}
_NAMES = {DType.F32: "float32", DType.F16: "float16", DType.BF16: "bfloat16"}
_ALIASES = {"f32": "float32", "fp32": "float32", "float": "float32", "float32": "float32",
            "f16": "float16", "fp16": "float16", "half": "float16", "float16": "float16",
            "bf16": "bfloat16", "bfloat16": "bfloat16"}
# the fp8 KV cache: a storage type for kv_dtype only (ml_dtypes / torch spell it
# float8_e4m3fn); no buffer the library reads or writes has it
_KV_ONLY = {"fp8": DType.FP8_E4M3, "fp8_e4m3": DType.FP8_E4M3, "e4m3": DType.FP8_E4M3,
            "float8_e4m3": DType.FP8_E4M3, "float8_e4m3fn": DType.FP8_E4M3}


class View:
    """The memory of one argument.  `keep` holds whatever must stay alive
    while the address is in use (a DLPack capsule)."""
    __slots__ = ("address", "dtype", "dtype_name", "shape", "contiguous", "aligned", "device",
                 "writable", "keep", "kind")

    def __init__(self, address, dtype, dtype_name, shape, contiguous, aligned, device, writable,
                 keep, kind):
        self.address, self.dtype, self.dtype_name, self.shape = address, dtype, dtype_name, shape
        self.contiguous, self.aligned, self.device, self.writable = contiguous, aligned, device, writable
        self.keep, self.kind = keep, kind


# numpy dtype -> (DType or None, its name for messages); dtype.name costs
# microseconds per call, a dict lookup of the dtype object a fraction of one.
_numpy_dtypes = {}


def _numpy_dtype(dt):
    found = _numpy_dtypes.get(dt)
    if found is None:
        name = dt.name if dt.isnative else dt.str  # ">f4": a byte-swapped array is another type
        found = (_BY_NAME.get(name) if dt.isnative else None, name)
        if len(_numpy_dtypes) < 256:  # structured dtypes could be endless: cache a few
            _numpy_dtypes[dt] = found
    return found


def _from_numpy(a):
    dtype, name = _numpy_dtype(a.dtype)
    flags = a.flags
    return View(a.ctypes.data, dtype, name, a.shape, flags.c_contiguous, flags.aligned, "cpu",
                flags.writeable, None, "numpy")


_torch_dtypes = None


def _torch_dtype_map(torch):
    global _torch_dtypes
    if _torch_dtypes is None:
        _torch_dtypes = {torch.float32: DType.F32, torch.float16: DType.F16,
                         torch.bfloat16: DType.BF16}
    return _torch_dtypes


def _from_torch(torch, t, name):
    if t.layout != torch.strided:
        raise ValueError("%s: expected a dense (strided) tensor, got layout %s" % (name, t.layout))
    dev = t.device
    device = "cpu" if dev.type == "cpu" else "%s:%d" % (dev.type, dev.index or 0)
    address = t.data_ptr()
    return View(address, _torch_dtype_map(torch).get(t.dtype), str(t.dtype).replace("torch.", ""),
                tuple(t.shape), t.is_contiguous(), address % t.element_size() == 0, device, True,
                None, "torch")


def _row_major(shape, strides, itemsize):
    """Whether element strides describe a C-contiguous layout (dimensions of
    size 1 may have any stride, as numpy and torch agree)."""
    if strides is None:
        return True
    expected = 1
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _from_dlpack(obj, name, stream):
    try:
        device_type, device_id = obj.__dlpack_device__()
    except AttributeError:
        raise TypeError("%s: expected a numpy array, a torch tensor or a DLPack producer, got %s"
                        % (name, type(obj).__name__)) from None
    on_cuda = device_type in (_dlpack.KDL_CUDA, _dlpack.KDL_CUDA_MANAGED)
    # the array API: -1 means "no synchronization"; 1 is the legacy default stream
    e = _dlpack.export(obj, (stream or 1) if on_cuda else None)
    if e.device_type in (_dlpack.KDL_CPU, _dlpack.KDL_CUDA_HOST):
        device = "cpu"  # pinned host memory is host memory
    elif e.device_type in (_dlpack.KDL_CUDA, _dlpack.KDL_CUDA_MANAGED):
        device = "cuda:%d" % e.device_id
    else:
        device = "dlpack_device%d:%d" % (e.device_type, e.device_id)
    writable = not e.read_only and not e.copied  # writing into a copy would be lost
    return View(e.address, _BY_NAME.get(e.dtype_name), e.dtype_name, e.shape,
                _row_major(e.shape, e.strides, e.itemsize),
                e.address % max(e.itemsize, 1) == 0, device, writable, e, "dlpack")


def describe(obj, name, stream=None):
    """A View of obj's memory.  stream: the CUDA stream a DLPack producer
    should make its data ready on (ignored for numpy and torch)."""
    if isinstance(obj, np.ndarray):
        return _from_numpy(obj)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _from_torch(torch, obj, name)
    if hasattr(obj, "__dlpack__"):
        return _from_dlpack(obj, name, stream)
    raise TypeError("%s: expected a numpy array, a torch tensor or a DLPack producer, got %s"
                    % (name, type(obj).__name__))


def _shape_text(shape):
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _check_place(view, name, device, shape, expected_text, dtype_text, writable):
    """The checks every buffer shares, after its dtype: device, shape,
    contiguity, alignment and, for outputs, writability."""
    if view.device != device:
        if device == "cpu":
            raise ValueError("%s: expected host memory (numpy array or CPU tensor) for the "
                             "context's device cpu, got %s" % (name, view.device))
        raise ValueError("%s: expected a CUDA tensor on %s (the context's device), got %s"
                         % (name, device, view.device))
    if tuple(view.shape) != shape:
        raise ValueError("%s: expected shape %s (%s), got %s"
                         % (name, _shape_text(shape), expected_text, _shape_text(view.shape)))
    if not view.contiguous:
        raise ValueError("%s: expected a C-contiguous buffer, got a strided view "
                         "(pass a contiguous copy, e.g. .contiguous() or numpy.ascontiguousarray)"
                         % name)
    if not view.aligned:
        raise ValueError("%s: address 0x%x is not aligned to its %s elements"
                         % (name, view.address, dtype_text))
    if writable and not view.writable:
        raise ValueError("%s: not writable" % name)


def check(view, name, dtype, shape, layout, rows, device, writable=False):
    """Raises TypeError/ValueError unless view matches: dtype (the context's
    IO_DTYPE), device, shape ([rows, heads, d]; layout names it), C-contiguous,
    aligned and, for outputs, writable."""
    if view.dtype != dtype:
        raise TypeError("%s: expected dtype %s (the context's IO_DTYPE), got %s"
                        % (name, _NAMES[dtype], view.dtype_name))
    _check_place(view, name, device, shape,
                 "%s with T = %d rows of the open step" % (layout, rows), _NAMES[dtype], writable)


def check_fixed(view, name, dtype_name, shape, explain, device, writable=False):
    """check() for a buffer of a fixed element type ("float32" for lse and
    scores, "int32" for block indices and counts); explain says where the
    expected shape comes from."""
    if view.dtype_name != dtype_name:
        raise TypeError("%s: expected dtype %s, got %s" % (name, dtype_name, view.dtype_name))
    _check_place(view, name, device, shape, explain, dtype_name, writable)


def check_io(view, name, dtype, dtype_why, shape, explain, device, writable=False):
    """check() for a buffer of an IO dtype: `dtype` (dtype_why says whose it
    is), or when None any of float32, float16 and bfloat16.  Returns the
    buffer's DType."""
    if dtype is None:
        if view.dtype is None:
            raise TypeError("%s: expected dtype float32, float16 or bfloat16, got %s"
                            % (name, view.dtype_name))
        dtype = view.dtype
    elif view.dtype != dtype:
        raise TypeError("%s: expected dtype %s (%s), got %s"
                        % (name, _NAMES[dtype], dtype_why, view.dtype_name))
    _check_place(view, name, device, shape, explain, _NAMES[dtype], writable)
    return dtype


def to_dtype(value, what="dtype"):
    """DType from a DType, its int value, a name ("bf16", "float16"), a numpy
    dtype or type (ml_dtypes.bfloat16 included) or a torch dtype."""
    if isinstance(value, DType):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return DType(value)
    if isinstance(value, str):
        key = value.lower().replace("torch.", "").replace("numpy.", "")
        if key in _ALIASES:
            return _BY_NAME[_ALIASES[key]]
        if key in _KV_ONLY:
            return _KV_ONLY[key]
        raise ValueError("%s: unknown dtype %r (use float32, float16 or bfloat16; kv_dtype "
                         "also fp8)" % (what, value))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.dtype):
        if value == getattr(torch, "float8_e4m3fn", None):
            return DType.FP8_E4M3
        found = _torch_dtype_map(torch).get(value)
        if found is None:
            raise TypeError("%s: expected torch.float32, torch.float16 or torch.bfloat16, got %s"
                            % (what, value))
        return found
    try:
        name = np.dtype(value).name
    except TypeError:
        raise TypeError("%s: expected a resa.DType, a dtype name, a numpy or a torch dtype, got %r"
                        % (what, value)) from None
    if name in _KV_ONLY:
        return _KV_ONLY[name]
    if name not in _BY_NAME:
        raise TypeError("%s: expected float32, float16 or bfloat16, got %s" % (what, name))
    return _BY_NAME[name]


def numpy_dtype(dtype):
    """The numpy dtype of a DType (bfloat16 from ml_dtypes, imported here only)."""
    dtype = DType(dtype)
    if dtype == DType.BF16:
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NAMES[dtype])


def torch_dtype(dtype):
    """The torch dtype of a DType, or of "float32" / "int32"."""
    import torch
    if isinstance(dtype, str):
        return {"float32": torch.float32, "int32": torch.int32}[dtype]
    return {DType.F32: torch.float32, DType.F16: torch.float16,
            DType.BF16: torch.bfloat16}[DType(dtype)]


def itemsize(dtype):
    """Bytes per element of an IO DType."""
    return 4 if DType(dtype) == DType.F32 else 2
