# SPDX-License-Identifier: MIT
"""The enums of include/resa.h with the header's values, names without the
RESA_ prefix (Param.NUM_LAYERS, Mode.DECODE, DType.BF16, Status.ERR_CAPACITY).
Values are ABI: copied here, never computed."""
import enum

__all__ = ["Status", "Backend", "DType", "SummaryFormat", "Mode", "Param", "Reset",
           "STEP_REPLAY", "REAL_PARAMS"]


class Status(enum.IntEnum):
    OK = 0
    ERR_INVALID_ARGUMENT = 1
    ERR_BAD_STATE = 2
    ERR_OUT_OF_MEMORY = 3
    ERR_DEVICE_OUT_OF_MEMORY = 4
    ERR_CAPACITY = 5
    ERR_NOT_SUPPORTED = 6
    ERR_NO_DEVICE = 7
    ERR_BACKEND = 8
    ERR_VERSION_MISMATCH = 9
    ERR_INTERNAL = 10


class Backend(enum.IntEnum):
    CPU = 0
    CUDA = 1
    AUTO = 2


class DType(enum.IntEnum):
    F32 = 0
    F16 = 1
    BF16 = 2
    FP8_E4M3 = 3  # kv_dtype only: the fp8 KV cache (as io_dtype the library refuses it)


class SummaryFormat(enum.IntEnum):
    KV_DTYPE = 0
    FP8_E4M3 = 1


class GroupScore(enum.IntEnum):
    """How a GQA group ranks blocks (RESA_PARAM_GROUP_SCORE)."""
    POOLED = 0
    HEAD_SHARE = 1


class Mode(enum.IntEnum):
    APPEND = 0
    DECODE = 1
    RECTIFY = 2
    APPEND_KV = 3
    QUERY_DENSE = 4   # since 0.3.0: context parallelism
    QUERY_SPARSE = 5  # since 0.3.0


class Param(enum.IntEnum):
    NUM_LAYERS = 100
    NUM_Q_HEADS = 101
    NUM_KV_HEADS = 102
    HEAD_DIM = 103
    KV_DTYPE = 104
    IO_DTYPE = 105
    MAX_TOKENS = 106
    MAX_SEQUENCES = 107
    MAX_SEQ_TOKENS = 108
    MAX_STEP_TOKENS = 109
    SUMMARY_FORMAT = 110
    BLOCK_SIZE = 200
    SELECT_FRACTION = 201
    SELECT_MIN_BLOCKS = 202
    LOCAL_BLOCKS = 203
    SINK_BLOCKS = 204
    RECTIFY_INTERVAL = 205
    SOFTMAX_SCALE = 206
    SCORE_WIDTH = 207
    GROUP_SCORE = 208
    NUM_THREADS = 300
    RECORD_SELECTION = 301
    EXPERIMENTAL_1 = 1000


class Preset(enum.IntEnum):
    """Method presets (resa_ctx_set_preset): the library's defaults, or the paper's."""
    DEFAULT = 0
    PAPER = 1


class Reset(enum.IntFlag):
    SESSION = 1
    PARAMS = 2


STEP_REPLAY = 1

# Parameters set and read with the _f64 functions; every other one is int64.
REAL_PARAMS = frozenset({Param.SELECT_FRACTION, Param.SOFTMAX_SCALE, Param.SCORE_WIDTH})
