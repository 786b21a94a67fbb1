# SPDX-License-Identifier: MIT
"""Reads a DLPack capsule's DLTensor in place (no copy, no numpy or torch).

A producer's __dlpack__() returns a PyCapsule named "dltensor" (legacy
DLManagedTensor) or "dltensor_versioned" (DLPack >= 1.0, with a read-only
flag).  We only look at the struct and never rename the capsule ("consume"
it), so the producer's capsule destructor releases the tensor when our
reference to the capsule goes away: keep the capsule alive across the C call.
Layouts: dlpack.h of DLPack 1.0 (dmlc/dlpack), stable since 0.x for DLTensor.
"""
import ctypes

__all__ = ["export", "Exported", "KDL_CPU", "KDL_CUDA", "KDL_CUDA_HOST", "KDL_CUDA_MANAGED"]

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_KDL_INT, _KDL_UINT, _KDL_FLOAT, _KDL_BFLOAT, _KDL_COMPLEX, _KDL_BOOL = 0, 1, 2, 4, 5, 6
_FLAG_READ_ONLY, _FLAG_IS_COPIED = 1, 2


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32),
                ("dtype", _DataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):  # DLManagedTensor: the tensor comes first
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _ManagedVersioned(ctypes.Structure):  # DLManagedTensorVersioned
    _fields_ = [("version", _Version), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", _Tensor)]


_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype, _get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype, _get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


class Exported:
    """What one __dlpack__ call exported.  `capsule` must outlive any use of
    `address`."""
    __slots__ = ("capsule", "address", "shape", "strides", "itemsize", "dtype_name",
                 "device_type", "device_id", "read_only", "copied")


def _dtype_name(code, bits, lanes):
    base = {_KDL_INT: "int", _KDL_UINT: "uint", _KDL_FLOAT: "float", _KDL_BFLOAT: "bfloat",
            _KDL_COMPLEX: "complex", _KDL_BOOL: "bool"}.get(code, "dlpack_code%d_" % code)
    name = base if code == _KDL_BOOL else "%s%d" % (base, bits)
    return name if lanes == 1 else "%sx%d" % (name, lanes)


def _call_dlpack(obj, stream):
    """__dlpack__ asking for a versioned, never-copied export, falling back
    to the older signatures that some producers still have."""
    attempts = (dict(max_version=(1, 0), copy=False), dict(max_version=(1, 0)), {})
    last = None
    for kwargs in attempts:
        if stream is not None:
            kwargs = dict(kwargs, stream=stream)
        try:
            return obj.__dlpack__(**kwargs)
        except TypeError as e:  # an older producer without these keywords
            last = e
    raise last


def export(obj, stream=None):
    """Exports obj through __dlpack__ (stream: the consumer's CUDA stream, for
    CUDA producers) and returns an Exported."""
    capsule = _call_dlpack(obj, stream)
    name = _get_name(capsule)
    pointer = _get_pointer(capsule, name)
    if name == b"dltensor_versioned":
        managed = _ManagedVersioned.from_address(pointer)
        flags = managed.flags
    elif name == b"dltensor":
        managed = _Managed.from_address(pointer)
        flags = 0  # legacy producers refuse read-only arrays instead of flagging them
    else:
        raise TypeError("__dlpack__ returned a capsule named %r" % name)
    t = managed.dl_tensor
    e = Exported()
    e.capsule = capsule
    e.address = (t.data or 0) + t.byte_offset
    e.shape = tuple(t.shape[i] for i in range(t.ndim))
    e.strides = tuple(t.strides[i] for i in range(t.ndim)) if t.strides else None
    e.itemsize = (t.dtype.bits * t.dtype.lanes + 7) // 8
    e.dtype_name = _dtype_name(t.dtype.code, t.dtype.bits, t.dtype.lanes)
    e.device_type, e.device_id = t.device.device_type, t.device.device_id
    e.read_only = bool(flags & _FLAG_READ_ONLY)
    e.copied = bool(flags & _FLAG_IS_COPIED)
    return e
