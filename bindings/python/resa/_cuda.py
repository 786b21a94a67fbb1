# SPDX-License-Identifier: MIT
"""The torch side of CUDA contexts: which device, which stream.

Imported only by CUDA contexts.  torch is optional even there (a DLPack
producer such as CuPy works too); without it a context stays on the stream
that set_stream gave it (the legacy default stream until then)."""
import ctypes
import importlib.util

__all__ = ["torch", "current_device"]

_torch = None


def torch():
    """The torch module when it is installed, else None (imported on first use)."""
    global _torch
    if _torch is None and importlib.util.find_spec("torch") is not None:
        import torch as t
        _torch = t
    return _torch


def _driver_device():
    """The device of the calling thread's current CUDA context, from the
    driver (libresa's CUDA module made its device current at create)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int(-1)
        if cuda.cuCtxGetDevice(ctypes.byref(dev)) == 0 and dev.value >= 0:
            return dev.value
    except (OSError, AttributeError):
        pass
    return 0


def current_device():
    """The CUDA device current on this thread, the one a new libresa CUDA
    context works on (resa.h: the device current at resa_ctx_create)."""
    t = torch()
    if t is not None and t.cuda.is_available():
        return t.cuda.current_device()
    return _driver_device()
