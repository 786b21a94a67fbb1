#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Wrong inputs raise the documented exception, before any C call, and never
crash; statuses map to their exception classes; a step's context manager
cancels on an exception.  numpy path, CPU backend (the one CUDA case skips
without a GPU).  numpy is required (a missing one fails, never skips)."""
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

try:
    import numpy as np
except ImportError as e:
    print("FAIL: test_errors needs numpy (pip install numpy): %s" % e)
    sys.exit(1)

import resa  # noqa: E402
from resa import _errors  # noqa: E402

L, HQ, HKV, D = 2, 4, 2, 8
T = 7  # the step below: APPEND 4 + APPEND 3


def context(**extra):
    params = dict(num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=4)
    params.update(extra)
    return resa.Context("cpu", **params)


def cuda_tensor():
    try:
        import torch
    except ImportError:
        return None
    return torch.zeros((T, HQ, D), device="cuda") if torch.cuda.is_available() else None


class BadInputs(unittest.TestCase):
    def setUp(self):
        self.ctx = context()
        self.a, self.b = self.ctx.seq_create(), self.ctx.seq_create()
        self.ctx.step_begin([self.a, self.b], resa.Mode.APPEND, [4, 3])
        rng = np.random.default_rng(0)
        self.good = {"q": rng.standard_normal((T, HQ, D)).astype(np.float32),
                     "k": rng.standard_normal((T, HKV, D)).astype(np.float32),
                     "v": rng.standard_normal((T, HKV, D)).astype(np.float32),
                     "out": np.full((T, HQ, D), np.nan, np.float32)}

    def tearDown(self):
        self.ctx.close()

    def attend(self, **replace):
        args = dict(self.good)
        args.update(replace)
        return self.ctx.attend(0, args["q"], args["k"], args["v"], args["out"])

    def expect(self, exc, text, **replace):
        """The call raises exc naming the argument, and nothing was written."""
        with self.assertRaises(exc) as cm:
            self.attend(**replace)
        self.assertIn(text, str(cm.exception))
        self.assertTrue(np.isnan(self.good["out"]).all(), "out was written by a refused call")
        return cm.exception

    def shape(self, name):
        return (T, HKV if name in ("k", "v") else HQ, D)

    def test_wrong_dtypes(self):
        for name in ("q", "k", "v", "out"):
            for dtype in (np.float64, np.float16, np.int32):
                with self.subTest(arg=name, dtype=np.dtype(dtype).name):
                    e = self.expect(TypeError, "%s: expected dtype float32 (the context's IO_DTYPE)"
                                    ", got %s" % (name, np.dtype(dtype).name),
                                    **{name: np.zeros(self.shape(name), dtype)})
                    self.assertNotIsInstance(e, resa.ResaError)
            with self.subTest(arg=name, dtype=">f4"):  # byte-swapped: another type
                self.expect(TypeError, "%s: expected dtype float32" % name,
                            **{name: np.zeros(self.shape(name), ">f4")})

    def test_wrong_shapes(self):
        for name in ("q", "k", "v", "out"):
            t, h, d = self.shape(name)
            for bad in ((t - 1, h, d), (t + 1, h, d), (t, d, h), (h, t, d), (t, h * d),
                        (t, h, d, 1), (t, h, d // 4), (t * h * d // 4,)):
                with self.subTest(arg=name, shape=bad):
                    self.expect(ValueError, "%s: expected shape [%d, %d, %d] ([T, %s, d] with "
                                "T = 7 rows of the open step), got [%s]"
                                % (name, t, h, d, "Hkv" if name in "kv" else "Hq",
                                   ", ".join(map(str, bad))),
                                **{name: np.zeros(bad, np.float32)})

    def test_out_a_quarter_of_the_size(self):
        self.expect(ValueError, "out: expected shape", out=np.zeros((T * HQ * D) // 4, np.float32))
        self.expect(ValueError, "out: expected shape", out=np.zeros((2, HQ, D), np.float32))

    def test_non_contiguous_views(self):
        for name in ("q", "k", "v", "out"):
            t, h, d = self.shape(name)
            strided = np.zeros((t, h, 2 * d), np.float32)[:, :, ::2]
            transposed = np.zeros((t, d, h), np.float32).transpose(0, 2, 1)
            heads_major = np.zeros((h, t, d), np.float32).transpose(1, 0, 2)
            for label, view in (("strided", strided), ("transposed", transposed),
                                ("heads-major", heads_major)):
                with self.subTest(arg=name, view=label):
                    self.assertEqual(view.shape, (t, h, d))
                    self.expect(ValueError, "%s: expected a C-contiguous buffer" % name,
                                **{name: view})

    def test_misaligned(self):
        raw = np.zeros(T * HQ * D * 4 + 1, np.uint8)[1:].view(np.float32).reshape(T, HQ, D)
        self.expect(ValueError, "q: address", q=raw)

    def test_read_only_out(self):
        out = np.zeros((T, HQ, D), np.float32)
        out.flags.writeable = False
        self.expect(ValueError, "out: not writable", out=out)
        # q, k, v are only read: read-only inputs are fine
        q = self.good["q"].copy()
        q.flags.writeable = False
        self.ctx.attend(0, q, self.good["k"], self.good["v"], np.empty((T, HQ, D), np.float32))

    def test_wrong_types_and_missing(self):
        self.expect(TypeError, "q: expected a numpy array, a torch tensor or a DLPack producer, "
                    "got list", q=self.good["q"].tolist())
        self.expect(TypeError, "k: expected a numpy array", k=b"\0" * (T * HKV * D * 4))
        self.expect(ValueError, "k: required", k=None)
        self.expect(ValueError, "v: required", v=None)
        self.expect(ValueError, "q: required", q=None)  # an APPEND step needs q
        with self.assertRaises(TypeError):
            self.ctx.attend("0", self.good["q"], self.good["k"], self.good["v"])
        with self.assertRaises(ValueError):
            self.ctx.attend(1 << 40, self.good["q"], self.good["k"], self.good["v"])

    def test_layer_out_of_range_is_the_library_s_error(self):
        with self.assertRaises(resa.InvalidArgumentError) as cm:
            self.ctx.attend(L, self.good["q"], self.good["k"], self.good["v"], self.good["out"])
        self.assertIn("layer", cm.exception.message)
        self.assertEqual(cm.exception.message, self.ctx.last_error)

    def test_wrong_device(self):
        t = cuda_tensor()
        if t is None:
            self.skipTest("no CUDA device (torch.cuda.is_available() is false or no torch)")
        self.expect(ValueError, "q: expected host memory", q=t)

    def test_all_wrong_then_right(self):
        """After every refusal the step is intact: a good call works."""
        self.test_wrong_dtypes()
        self.test_wrong_shapes()
        self.test_non_contiguous_views()
        for layer in range(L):
            out = self.ctx.attend(layer, self.good["q"], self.good["k"], self.good["v"])
            self.assertFalse(np.isnan(out).any())
        self.ctx.step_end()
        self.assertEqual((self.ctx.seq_length(self.a), self.ctx.seq_length(self.b)), (4, 3))


class StateErrors(unittest.TestCase):
    def test_no_step_open(self):
        with context() as ctx:
            ctx.seq_create()
            q, k = np.zeros((1, HQ, D), np.float32), np.zeros((1, HKV, D), np.float32)
            with self.assertRaises(ValueError) as cm:
                ctx.attend(0, q, k, k)
            self.assertIn("no step is open", str(cm.exception))
            with self.assertRaises(resa.BadStateError):
                ctx.step_end()
            with self.assertRaises(resa.BadStateError):
                ctx.step_cancel()

    def test_closed_context(self):
        ctx = context()
        seq = ctx.seq_create()
        ctx.close()
        ctx.close()  # idempotent
        q, k = np.zeros((1, HQ, D), np.float32), np.zeros((1, HKV, D), np.float32)
        calls = [lambda: ctx.attend(0, q, k, k), lambda: ctx.step([seq], resa.Mode.DECODE, [1]),
                 lambda: ctx.step_begin([seq], [1], [1]), ctx.step_end, ctx.step_cancel,
                 ctx.seq_create, lambda: ctx.seq_length(seq), lambda: ctx.seq_fork(seq),
                 lambda: ctx.seq_release(seq), lambda: ctx.seq_pending(seq),
                 lambda: ctx.seq_rectify_due(seq), ctx.free_tokens,
                 lambda: ctx.selected_blocks(seq, 0, 0), lambda: ctx.get("head_dim"),
                 lambda: ctx.set("head_dim", 8), lambda: ctx.bounds("head_dim"),
                 lambda: ctx.set_stream(None), ctx.synchronize, ctx.reset,
                 lambda: ctx.backend, lambda: ctx.device, lambda: ctx.last_error]
        for i, call in enumerate(calls):
            with self.subTest(call=i):
                with self.assertRaises(resa.ContextClosedError) as cm:
                    call()
                self.assertIsInstance(cm.exception, resa.BadStateError)
                self.assertEqual(cm.exception.message, "context is closed")
                self.assertEqual(cm.exception.status, resa.Status.ERR_BAD_STATE)
        self.assertIn("closed", repr(ctx))

    def test_step_arguments(self):
        with context() as ctx:
            s = ctx.seq_create()
            with self.assertRaises(ValueError):
                ctx.step_begin([s, s + 1], [resa.Mode.APPEND], [1, 1])  # C would read 2 modes
            with self.assertRaises(ValueError):
                ctx.step_begin([s], [resa.Mode.APPEND], [1, 2])
            with self.assertRaises(ValueError):
                ctx.step_begin([1 << 31], [resa.Mode.APPEND], [1])
            with self.assertRaises(TypeError):
                ctx.step_begin([s], [resa.Mode.APPEND], [1.5])
            with self.assertRaises(resa.InvalidArgumentError):
                ctx.step_begin([s], [resa.Mode.DECODE], [2])  # DECODE is one token
            with self.assertRaises(resa.InvalidArgumentError):
                ctx.step_begin([s], [resa.Mode.APPEND], [1], replay=True)  # CPU never captures
            with ctx.step([s], resa.Mode.APPEND, [2]) as st:  # nothing above left a step open
                for layer in range(L):
                    st.attend(layer, np.zeros((2, HQ, D), np.float32),
                              np.zeros((2, HKV, D), np.float32), np.zeros((2, HKV, D), np.float32))
            self.assertEqual(ctx.seq_length(s), 2)

    def test_constructor_arguments(self):
        with self.assertRaises(TypeError):
            context(no_such_param=1)
        with self.assertRaises(TypeError):
            context(NUM_THREADS=1)
        with self.assertRaises(ValueError):
            resa.Context("tpu", num_layers=1, num_q_heads=1, num_kv_heads=1, head_dim=8)
        with self.assertRaises(TypeError):
            context(io_dtype=np.int8)
        with self.assertRaises(resa.InvalidArgumentError) as cm:
            context(block_size=3)
        self.assertIn("BLOCK_SIZE", cm.exception.message)
        with self.assertRaises(TypeError):
            resa.Context("cpu", num_layers=1)  # the shape is required


class Statuses(unittest.TestCase):
    def test_every_status_has_its_class(self):
        classes = {resa.Status.ERR_INVALID_ARGUMENT: resa.InvalidArgumentError,
                   resa.Status.ERR_BAD_STATE: resa.BadStateError,
                   resa.Status.ERR_OUT_OF_MEMORY: resa.OutOfMemoryError,
                   resa.Status.ERR_DEVICE_OUT_OF_MEMORY: resa.DeviceOutOfMemoryError,
                   resa.Status.ERR_CAPACITY: resa.CapacityError,
                   resa.Status.ERR_NOT_SUPPORTED: resa.NotSupportedError,
                   resa.Status.ERR_NO_DEVICE: resa.NoDeviceError,
                   resa.Status.ERR_BACKEND: resa.BackendError,
                   resa.Status.ERR_VERSION_MISMATCH: resa.VersionMismatchError,
                   resa.Status.ERR_INTERNAL: resa.InternalError}
        self.assertEqual(set(classes), set(resa.Status) - {resa.Status.OK})
        for status, cls in classes.items():
            e = _errors.error_for(status, "text")
            self.assertIs(type(e), cls)
            self.assertIsInstance(e, resa.ResaError)
            self.assertIsInstance(e, RuntimeError)
            self.assertEqual((e.status, e.message), (status, "text"))
            self.assertEqual(str(e), "RESA_%s: text" % status.name)
        unknown = _errors.error_for(99, "later")
        self.assertIs(type(unknown), resa.ResaError)
        self.assertEqual(unknown.status, 99)

    def test_capacity(self):
        with context(max_sequences=1, max_tokens=16, max_step_tokens=12) as ctx:
            s = ctx.seq_create()
            with self.assertRaises(resa.CapacityError) as cm:
                ctx.seq_create()
            self.assertEqual(cm.exception.message, ctx.last_error)
            self.assertTrue(cm.exception.message)
            with self.assertRaises(resa.CapacityError) as cm:
                ctx.step_begin([s], [resa.Mode.APPEND], [13])  # > MAX_STEP_TOKENS
            self.assertEqual(cm.exception.message, ctx.last_error)
            kv = np.zeros((12, HKV, D), np.float32)
            for n in (12, 12):  # the pool holds 16 tokens: the second step cannot fit
                try:
                    with ctx.step([s], resa.Mode.APPEND_KV, [n]) as st:
                        for layer in range(L):
                            st.attend(layer, None, kv[:n], kv[:n])
                except resa.CapacityError as e:
                    self.assertEqual(e.message, ctx.last_error)
                    self.assertEqual(e.status, resa.Status.ERR_CAPACITY)
                    self.assertIn("RESA_ERR_CAPACITY", str(e))
                    break
            else:
                self.fail("no CapacityError from a full pool")
            self.assertEqual(ctx.seq_length(s), 12)  # nothing changed

    def test_not_supported(self):
        with context() as ctx:
            with self.assertRaises(resa.NotSupportedError):
                ctx.set_stream(0x1234)  # the CPU backend takes only NULL
            ctx.set_stream(None)
        if not resa.backend_available("cuda"):
            with self.assertRaises((resa.NotSupportedError, resa.NoDeviceError)):
                resa.Context("cuda", num_layers=1, num_q_heads=1, num_kv_heads=1, head_dim=64)
            with self.assertRaises(resa.NotSupportedError):
                resa.graphs.StepGraph(context())


class StepContextManager(unittest.TestCase):
    def test_exception_cancels(self):
        with context() as ctx:
            s = ctx.seq_create()
            kv = np.ones((3, HKV, D), np.float32)
            with self.assertRaises(KeyError):
                with ctx.step([s], [resa.Mode.APPEND_KV], [3]) as st:
                    st.attend(0, None, kv, kv)
                    raise KeyError("the model failed")
            self.assertEqual(ctx.seq_length(s), 0)
            with self.assertRaises(ValueError):  # the step object is closed
                st.attend(1, None, kv, kv)
            with self.assertRaises(TypeError):  # a refused argument cancels too
                with ctx.step([s], [resa.Mode.APPEND_KV], [3]) as st:
                    st.attend(0, None, kv.astype(np.float64), kv)
            self.assertEqual(ctx.seq_length(s), 0)
            with ctx.step([s], [resa.Mode.APPEND_KV], [3]) as st:  # a fresh step works
                for layer in range(L):
                    st.attend(layer, None, kv, kv)
            self.assertEqual(ctx.seq_length(s), 3)

    def test_missing_layer_raises_and_cancels(self):
        with context() as ctx:
            s = ctx.seq_create()
            kv = np.ones((2, HKV, D), np.float32)
            with self.assertRaises(resa.BadStateError) as cm:
                with ctx.step([s], [resa.Mode.APPEND_KV], [2]) as st:
                    st.attend(0, None, kv, kv)  # layer 1 never attended
            self.assertIn("layer", cm.exception.message)
            self.assertEqual(ctx.seq_length(s), 0)
            with ctx.step([s], [resa.Mode.APPEND_KV], [2]) as st:  # no step was left open
                for layer in range(L):
                    st.attend(layer, None, kv, kv)
            self.assertEqual(ctx.seq_length(s), 2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
