# SPDX-License-Identifier: MIT
"""Python bindings of libresa, Rectified Sparse Attention for long-context
decoding: numpy arrays, torch tensors or any DLPack producer in, no copies.

    import numpy as np, resa
    with resa.Context("cpu", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64) as ctx:
        seq = ctx.seq_create()
        with ctx.step([seq], resa.Mode.APPEND, [n]) as step:
            out = step.attend(0, q, k, v)      # q [n, 4, 64], k and v [n, 2, 64], float32

Context parallelism (one sequence split by position over several contexts,
docs/python.md "Context parallelism"): Context.seq_set_span(seq, first_token,
global_length=-1); the modes Mode.QUERY_DENSE and Mode.QUERY_SPARSE;
Step.block_scores(layer, q, capacity) -> (scores, blocks, counts);
Step.thresholds(scores, blocks, counts) -> (threshold_scores,
threshold_blocks); Step.attend(layer, q, k, v, out=None, lse=True,
thresholds=...) -> (out, lse); resa.merge_states(parts_out, parts_lse,
out=None, lse_out=None) on host memory and Context.merge_states(...) in the
context's memory space.

See docs/python.md; include/resa.h is the reference for every call.
"""
from ._enums import (Backend, DType, GroupScore, Mode, Param, Preset, Reset,  # noqa: F401
                     STEP_REPLAY, Status, SummaryFormat)
from ._errors import (BackendError, BadStateError, CapacityError,  # noqa: F401
                      ContextClosedError, DeviceOutOfMemoryError, InternalError,
                      InvalidArgumentError, NoDeviceError, NotSupportedError, OutOfMemoryError,
                      ResaError, VersionMismatchError)
from ._info import (abi_version, backend_available, block_size, max_head_dim,  # noqa: F401
                    param_bounds, status_name, status_string, version_number, version_string)
from ._context import Context, Step, merge_states  # noqa: F401
from . import graphs  # noqa: F401  (imports no torch until a StepGraph is made)

try:  # written by meson (the header's version) when the package is installed
    from ._version import __version__
except ImportError:  # the source tree: ask the library that was loaded
    __version__ = version_string()

__all__ = ["Backend", "DType", "GroupScore", "Mode", "Param", "Preset", "Reset", "STEP_REPLAY",
           "Status", "SummaryFormat",
           "ResaError", "InvalidArgumentError", "BadStateError", "OutOfMemoryError",
           "DeviceOutOfMemoryError", "CapacityError", "NotSupportedError", "NoDeviceError",
           "BackendError", "VersionMismatchError", "InternalError", "ContextClosedError",
           "abi_version", "backend_available", "block_size", "max_head_dim", "param_bounds",
           "status_name", "status_string", "version_number", "version_string",
           "Context", "Step", "merge_states", "graphs", "__version__"]
