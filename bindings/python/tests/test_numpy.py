#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The numpy path of the resa package against the float64 model of
resa_reference.py, for every IO dtype (F32, F16, BF16 through ml_dtypes), on
the CPU backend: prefill, APPEND_KV, sparse decode, fork, rectification and
release in mixed batches, outputs poisoned with NaN before each call.

numpy and ml_dtypes are hard requirements here: a missing one FAILS (CI
installs them), it never skips.

Tolerances (max |out - float64 model|, outputs of magnitude <~ 3): the
library reads the rounded inputs exactly and accumulates in float32, then
rounds out to the IO dtype, so the error is that final rounding plus float32
summation: F32 ~1e-6 (checked at 2e-5), F16 half an ulp at 2-4 = 1e-3
(checked at 4e-3), BF16 half an ulp at 2-4 = 8e-3 (checked at 3e-2)."""
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bindings/python: the resa package
sys.path.insert(0, HERE)

try:
    import ml_dtypes
    import numpy as np
except ImportError as e:  # deliberately a failure, not a skip (exit 77)
    print("FAIL: test_numpy needs numpy and ml_dtypes (pip install numpy ml_dtypes): %s" % e)
    sys.exit(1)

import resa  # noqa: E402
from resa_reference import Scenario, io_numpy, seeded_rng  # noqa: E402

ATOL = {resa.DType.F32: 2e-5, resa.DType.F16: 4e-3, resa.DType.BF16: 3e-2}


class NumpyAdapter:
    @staticmethod
    def make(x, dtype):
        return x.astype(io_numpy(dtype))

    @staticmethod
    def empty(shape, dtype):
        return np.full(shape, np.nan, io_numpy(dtype))

    @staticmethod
    def to64(a):
        return a.astype(np.float64)


class TestNumpy(unittest.TestCase):
    def test_every_dtype_against_float64(self):
        rng = seeded_rng("test_numpy")
        for dtype in (resa.DType.F32, resa.DType.F16, resa.DType.BF16):
            with self.subTest(dtype=dtype.name), \
                    resa.Context("cpu", io_dtype=dtype, **Scenario.PARAMS) as ctx:
                worst = Scenario(ctx, NumpyAdapter, dtype, rng, ATOL[dtype],
                                 "numpy %s" % dtype.name).run()
                print("numpy %s: max |error| %.3g (limit %.3g)" % (dtype.name, worst, ATOL[dtype]))

    def test_fp8_kv_cache_against_float64(self):
        """kv_dtype fp8 (every IO dtype): the model quantizes its K/V with ml_dtypes'
        e4m3 by the documented rule and attends those values, so the tolerances
        are the IO dtype's, as above."""
        rng = seeded_rng("test_numpy_fp8_kv")
        for dtype in (resa.DType.F32, resa.DType.F16, resa.DType.BF16):
            with self.subTest(dtype=dtype.name), \
                    resa.Context("cpu", io_dtype=dtype, kv_dtype="fp8", **Scenario.PARAMS) as ctx:
                self.assertIs(ctx.get("kv_dtype"), resa.DType.FP8_E4M3)
                worst = Scenario(ctx, NumpyAdapter, dtype, rng, ATOL[dtype],
                                 "numpy fp8 kv %s" % dtype.name).run()
                print("numpy fp8 kv, io %s: max |error| %.3g (limit %.3g)"
                      % (dtype.name, worst, ATOL[dtype]))
        with self.assertRaises(resa.InvalidArgumentError) as cm:  # a storage type only
            resa.Context("cpu", num_layers=1, num_q_heads=1, num_kv_heads=1, head_dim=8,
                         io_dtype="fp8")
        self.assertIn("RESA_PARAM_KV_DTYPE", str(cm.exception))

    def test_head_share_against_float64(self):
        """GROUP_SCORE HEAD_SHARE: the chosen blocks rank by the summed per-head shares of
        the float64 model, and the outputs match it."""
        rng = seeded_rng("test_numpy_head_share")
        params = dict(Scenario.PARAMS, group_score="head_share")
        with resa.Context("cpu", io_dtype=resa.DType.F32, **params) as ctx:
            self.assertIs(ctx.get("group_score"), resa.GroupScore.HEAD_SHARE)
            worst = Scenario(ctx, NumpyAdapter, resa.DType.F32, rng, ATOL[resa.DType.F32],
                             "numpy head_share").run()
            print("numpy head_share: max |error| %.3g" % worst)

    def test_dtype_spellings_and_version(self):
        self.assertEqual(resa.__version__, resa.version_string())
        self.assertEqual(resa.__version__.count("."), 2)
        for spelling in ("bf16", "bfloat16", ml_dtypes.bfloat16, np.dtype(ml_dtypes.bfloat16),
                         resa.DType.BF16, 2):
            with resa.Context("cpu", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8,
                              io_dtype=spelling) as ctx:
                self.assertIs(ctx.get(resa.Param.IO_DTYPE), resa.DType.BF16)
                self.assertIs(ctx.get("kv_dtype"), resa.DType.BF16)  # kv_dtype follows io_dtype
        with resa.Context("cpu", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8,
                          io_dtype=np.float16, kv_dtype="f32") as ctx:
            self.assertIs(ctx.get("io_dtype"), resa.DType.F16)
            self.assertIs(ctx.get("kv_dtype"), resa.DType.F32)

    def test_parameters(self):
        with resa.Context(resa.Backend.CPU, num_layers=3, num_q_heads=8, num_kv_heads=2,
                          head_dim=32, select_fraction=0.5, summary_format="fp8") as ctx:
            self.assertEqual(ctx.backend, resa.Backend.CPU)
            self.assertEqual(ctx.device, "cpu")
            self.assertEqual(ctx.get(resa.Param.NUM_LAYERS), 3)
            self.assertEqual(ctx.get("select_fraction"), 0.5)
            self.assertIs(ctx.get("summary_format"), resa.SummaryFormat.FP8_E4M3)
            self.assertAlmostEqual(ctx.get(resa.Param.SOFTMAX_SCALE), 32 ** -0.5, places=12)
            ctx.set("softmax_scale", 0.25)
            self.assertEqual(ctx.get("softmax_scale"), 0.25)
            self.assertEqual(ctx.bounds("block_size"), (1, 256))
            self.assertEqual(ctx.bounds(resa.Param.SELECT_FRACTION), (0.0, 1.0))
            self.assertEqual(resa.param_bounds("num_layers"), (1, 4096))
            self.assertEqual(ctx.last_error, "")
            seq = ctx.seq_create()
            with self.assertRaises(resa.BadStateError) as cm:
                ctx.set(resa.Param.HEAD_DIM, 64)  # locked by the first sequence
            self.assertIn("HEAD_DIM", cm.exception.message)
            ctx.reset(resa.Reset.SESSION)
            ctx.set(resa.Param.HEAD_DIM, 64)
            self.assertEqual(ctx.get("head_dim"), 64)
            ctx.reset(resa.Reset.PARAMS)
            self.assertEqual(ctx.get("num_layers"), 1)
            with self.assertRaises(resa.InvalidArgumentError):
                ctx.seq_length(seq)  # released by the session reset
        self.assertEqual(resa.block_size(), 16)
        self.assertEqual(resa.max_head_dim(), 256)
        self.assertEqual(resa.abi_version(), 0)
        self.assertEqual(resa.version_number() // 10000, int(resa.__version__.split(".")[0]))
        self.assertEqual(resa.status_name(resa.Status.ERR_CAPACITY), "RESA_ERR_CAPACITY")
        self.assertTrue(resa.status_string(resa.Status.OK))
        self.assertTrue(resa.backend_available("cpu"))
        self.assertTrue(resa.backend_available(resa.Backend.AUTO))

    def test_presets(self):
        with resa.Context(resa.Backend.CPU, num_layers=1, num_q_heads=2, num_kv_heads=1,
                          head_dim=16, sink_blocks=5, score_width=0.3) as ctx:
            self.assertEqual(ctx.get("score_width"), 0.3)
            ctx.set_preset(resa.Preset.PAPER)
            self.assertEqual([ctx.get(p) for p in ("select_fraction", "select_min_blocks",
                                                   "local_blocks", "sink_blocks",
                                                   "rectify_interval", "score_width")],
                             [0.1, 16, 1, 0, 32, 1.0])
            ctx.set_preset(resa.Preset.DEFAULT)
            with resa.Context(resa.Backend.CPU, num_layers=1, num_q_heads=2, num_kv_heads=1,
                              head_dim=16) as fresh:
                for p in ("sink_blocks", "score_width", "select_fraction", "rectify_interval"):
                    self.assertEqual(ctx.get(p), fresh.get(p), p)
            with self.assertRaises(resa.InvalidArgumentError):
                ctx.set_preset(7)
            self.assertEqual(ctx.get("head_dim"), 16)

    def test_single_mode_and_count_apply_to_all(self):
        rng = seeded_rng("test_numpy broadcast")
        with resa.Context("cpu", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8) as ctx:
            a, b = ctx.seq_create(), ctx.seq_create()
            k = rng.standard_normal((6, 1, 8)).astype(np.float32)
            with ctx.step([a, b], resa.Mode.APPEND_KV, 3) as st:
                self.assertEqual(st.rows, 6)
                self.assertIsNone(st.attend(0, None, k, k))
            self.assertEqual((ctx.seq_length(a), ctx.seq_length(b)), (3, 3))
            # low level: begin, attend, end without the context manager
            ctx.step_begin(np.array([a, b]), [resa.Mode.DECODE] * 2, [1, 1])
            q = rng.standard_normal((2, 2, 8)).astype(np.float32)
            out = ctx.attend(0, q, k[:2], k[:2])
            self.assertEqual(out.shape, (2, 2, 8))
            self.assertEqual(out.dtype, np.float32)
            ctx.step_end()
            self.assertEqual((ctx.seq_length(a), ctx.seq_length(b)), (4, 4))

    def test_numpy_users_never_import_torch(self):
        code = ("import sys, numpy as np, resa\n"
                "with resa.Context('cpu', num_layers=1, num_q_heads=1, num_kv_heads=1,"
                " head_dim=8) as ctx:\n"
                "    s = ctx.seq_create()\n"
                "    with ctx.step([s], resa.Mode.APPEND, [2]) as st:\n"
                "        x = np.ones((2, 1, 8), np.float32)\n"
                "        st.attend(0, x, x, x)\n"
                "assert 'torch' not in sys.modules, 'torch was imported'\n")
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True)
        self.assertEqual(done.returncode, 0, done.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
