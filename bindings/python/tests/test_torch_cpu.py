#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""torch CPU tensors and DLPack producers through the resa package, against
the float64 model of resa_reference.py (CPU backend), and the context-parallel
protocol of cp_reference.py (as test_cp.py runs it with numpy) with torch
tensors and a DLPack-only producer.  Exit status 77 (meson: skipped), with the
reason printed, when torch cannot be imported; numpy and ml_dtypes are
required.  Tolerances as in test_numpy.py and cp_reference.py."""
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

try:
    import numpy as np
    import ml_dtypes  # noqa: F401  (bfloat16 outputs of DLPack inputs are ml_dtypes arrays)
except ImportError as e:
    print("FAIL: test_torch_cpu needs numpy and ml_dtypes: %s" % e)
    sys.exit(1)
try:
    import torch
except ImportError as e:
    print("SKIP: test_torch_cpu needs torch (pip install torch): %s" % e)
    sys.exit(77)

import resa  # noqa: E402
from cp_reference import CPWorld  # noqa: E402
from resa_reference import Scenario, seeded_rng  # noqa: E402

ATOL = {resa.DType.F32: 2e-5, resa.DType.F16: 4e-3, resa.DType.BF16: 3e-2}
TORCH = {resa.DType.F32: torch.float32, resa.DType.F16: torch.float16,
         resa.DType.BF16: torch.bfloat16}


class TorchAdapter:
    device = "cpu"

    @classmethod
    def make(cls, x, dtype):
        return torch.from_numpy(x).to(device=cls.device, dtype=TORCH[dtype])

    @classmethod
    def empty(cls, shape, dtype):
        return torch.full(shape, float("nan"), dtype=TORCH[dtype], device=cls.device)

    @staticmethod
    def to64(t):
        return t.detach().to("cpu", torch.float64).numpy()


class DLPackOnly:
    """A producer with nothing but the DLPack protocol (as CuPy, JAX, ...)."""

    def __init__(self, tensor):
        self._tensor = tensor

    def __dlpack__(self, **kwargs):
        return self._tensor.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._tensor.__dlpack_device__()


class DLPackAdapter(TorchAdapter):
    @classmethod
    def make(cls, x, dtype):
        return DLPackOnly(TorchAdapter.make(x, dtype))

    @classmethod
    def empty(cls, shape, dtype):
        return DLPackOnly(TorchAdapter.empty(shape, dtype))

    @staticmethod
    def to64(w):
        return TorchAdapter.to64(w._tensor)


def _torch_dtype(dtype):
    return {"float32": torch.float32, "int32": torch.int32}[dtype] if isinstance(dtype, str) \
        else TORCH[dtype]


class TorchCP:
    """cp_reference's adapter for torch CPU tensors."""

    @staticmethod
    def make(x, dtype):
        return torch.from_numpy(x).to(TORCH[dtype])

    @staticmethod
    def full(shape, dtype, value):
        return torch.full(shape, value, dtype=_torch_dtype(dtype))

    stack = staticmethod(torch.stack)

    @staticmethod
    def to64(t):
        return t.to(torch.float64).numpy()

    @staticmethod
    def ints(t):
        return t.to(torch.int64).numpy()


class DLPackCP:
    """The same through producers with nothing but the DLPack protocol."""

    @staticmethod
    def make(x, dtype):
        return DLPackOnly(TorchCP.make(x, dtype))

    @staticmethod
    def full(shape, dtype, value):
        return DLPackOnly(TorchCP.full(shape, dtype, value))

    @staticmethod
    def stack(items):
        return DLPackOnly(torch.stack([x._tensor for x in items]))

    @staticmethod
    def to64(w):  # what the binding allocated for a host DLPack producer is numpy
        return TorchCP.to64(w._tensor) if isinstance(w, DLPackOnly) else w.astype(np.float64)

    @staticmethod
    def ints(w):
        return TorchCP.ints(w._tensor)


class TestContextParallelTorch(unittest.TestCase):
    def run_world(self, adapter, R, io, label):
        world = CPWorld(adapter, R, io, seeded_rng(label), label, decodes=12)
        try:
            print(world.run())
        finally:
            world.close()

    def test_torch_tensors(self):
        self.run_world(TorchCP, 2, resa.DType.BF16, "torch cp R 2 BF16")
        self.run_world(TorchCP, 3, resa.DType.F16, "torch cp R 3 F16")

    def test_dlpack_producer(self):
        self.run_world(DLPackCP, 2, resa.DType.F32, "dlpack cp R 2 F32")

    def test_allocations_follow_q(self):
        """lse, lists, thresholds and merged outputs: torch tensors for torch
        inputs; numpy arrays for another host DLPack producer."""
        g = torch.Generator().manual_seed(3)
        with resa.Context("cpu", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=16,
                          block_size=4, io_dtype=torch.bfloat16) as ctx:
            s = ctx.seq_create()
            q = torch.randn(6, 4, 16, generator=g).to(torch.bfloat16)
            k = torch.randn(6, 2, 16, generator=g).to(torch.bfloat16)
            with ctx.step([s], resa.Mode.APPEND, 6) as st:
                out, lse = st.attend(0, q, k, k, lse=True)
                self.assertEqual((type(lse), lse.dtype, tuple(lse.shape)),
                                 (torch.Tensor, torch.float32, (6, 4)))
                out2, lse2 = st.attend(0, DLPackOnly(q), DLPackOnly(k), DLPackOnly(k), lse=True)
                self.assertEqual((type(lse2), lse2.dtype), (np.ndarray, np.float32))
                self.assertTrue(np.array_equal(lse2, lse.numpy()))
            ctx.seq_set_span(s, 0, 60)
            with ctx.step([s], resa.Mode.QUERY_SPARSE, 1) as st:
                lists = st.block_scores(0, q[:1], 12)
                self.assertEqual([(type(x), x.dtype, tuple(x.shape)) for x in lists],
                                 [(torch.Tensor, torch.float32, (1, 2, 12)),
                                  (torch.Tensor, torch.int32, (1, 2, 12)),
                                  (torch.Tensor, torch.int32, (1, 2))])
                thr = st.thresholds(*[x[None] for x in lists])
                self.assertEqual([(type(x), x.dtype) for x in thr],
                                 [(torch.Tensor, torch.float32), (torch.Tensor, torch.int32)])
                part, part_lse = st.attend(0, q[:1], None, None, lse=True, thresholds=thr)
            parts = torch.stack([part, torch.zeros_like(part)])
            parts_lse = torch.stack([part_lse, torch.full_like(part_lse, -float("inf"))])
            for merged in (resa.merge_states(parts, parts_lse, lse_out=True),
                           ctx.merge_states(parts, parts_lse, lse_out=True)):
                self.assertIsInstance(merged[0], torch.Tensor)
                self.assertEqual((merged[0].dtype, tuple(merged[0].shape)),
                                 (torch.bfloat16, (1, 4, 16)))
                self.assertTrue(torch.equal(merged[0], part))  # the other part weighs 0
                self.assertTrue(torch.equal(merged[1], part_lse))

    def test_bad_tensors(self):
        with resa.Context("cpu", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=16,
                          block_size=4) as ctx:
            s = ctx.seq_create()
            q = torch.zeros(3, 4, 16)
            with ctx.step([s], resa.Mode.QUERY_DENSE, 3) as st:
                for exc, text, kw in [
                        (TypeError, "lse: expected dtype float32, got float16",
                         dict(lse=torch.zeros(3, 4, dtype=torch.float16))),
                        (ValueError, "lse: expected a C-contiguous buffer",
                         dict(lse=torch.zeros(4, 3).t())),
                        (TypeError, "threshold_blocks: expected dtype int32, got int64",
                         dict(thresholds=(torch.zeros(1, 2),
                                          torch.zeros(1, 2, dtype=torch.int64)))),
                ]:
                    with self.subTest(text=text):
                        with self.assertRaises(exc) as cm:
                            st.attend(0, q, None, None, lse=kw.get("lse"),
                                      thresholds=kw.get("thresholds"))
                        self.assertIn(text, str(cm.exception))
                with self.assertRaises(TypeError) as cm:
                    st.block_scores(0, q, 4, counts=torch.zeros(1, 2, dtype=torch.int64))
                self.assertIn("counts: expected dtype int32, got int64", str(cm.exception))
                st.attend(0, q, None, None)
            with self.assertRaises(TypeError) as cm:
                resa.merge_states(torch.zeros(2, 3, 16), torch.zeros(2, 3, dtype=torch.float64))
            self.assertIn("parts_lse: expected dtype float32, got float64", str(cm.exception))
            with self.assertRaises(ValueError) as cm:  # not host memory
                resa.merge_states(torch.zeros(2, 3, 16), torch.zeros(2, 3),
                                  torch.empty(3, 16, device="meta"))
            self.assertIn("out: resa.merge_states takes host memory (numpy arrays, CPU tensors), "
                          "got meta:0", str(cm.exception))
            with self.assertRaises(ValueError) as cm:
                ctx.merge_states(torch.zeros(2, 3, 16, device="meta"), torch.zeros(2, 3))
            self.assertIn("parts_out: expected host memory (numpy array or CPU tensor) for the "
                          "context's device cpu, got meta:0", str(cm.exception))


class TestTorchCPU(unittest.TestCase):
    def run_scenario(self, adapter, dtype, label):
        rng = seeded_rng("test_torch_cpu %s %s" % (label, dtype.name))
        with resa.Context("cpu", io_dtype=TORCH[dtype], **Scenario.PARAMS) as ctx:
            worst = Scenario(ctx, adapter, dtype, rng, ATOL[dtype], label).run()
        print("%s %s: max |error| %.3g (limit %.3g)" % (label, dtype.name, worst, ATOL[dtype]))

    def test_tensors(self):
        for dtype in (resa.DType.F32, resa.DType.BF16, resa.DType.F16):
            with self.subTest(dtype=dtype.name):
                self.run_scenario(TorchAdapter, dtype, "torch")

    def test_dlpack_producer(self):
        for dtype in (resa.DType.F32, resa.DType.BF16):
            with self.subTest(dtype=dtype.name):
                self.run_scenario(DLPackAdapter, dtype, "dlpack")

    def small_step(self, ctx, n=5):
        s = ctx.seq_create()
        ctx.step_begin([s], resa.Mode.APPEND, [n])
        return s

    def test_out_none_allocates_like_q(self):
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            with resa.Context("cpu", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=16,
                              io_dtype=dtype) as ctx:
                self.small_step(ctx)
                q = torch.randn(5, 4, 16, generator=g).to(dtype)
                k = torch.randn(5, 2, 16, generator=g).to(dtype)
                out = ctx.attend(0, q, k, k)
                self.assertIsInstance(out, torch.Tensor)
                self.assertEqual((out.shape, out.dtype, out.device), (q.shape, dtype, q.device))
                self.assertTrue(out.is_contiguous())
                mine = torch.full_like(q, float("nan"))
                self.assertIs(ctx.attend(0, q, k, k, mine), mine)  # written in place
                self.assertTrue(torch.equal(out, mine))
                # a DLPack q without out: a numpy array on the host
                got = ctx.attend(0, DLPackOnly(q), DLPackOnly(k), DLPackOnly(k))
                self.assertIsInstance(got, np.ndarray)
                self.assertTrue(np.array_equal(got.astype(np.float32), mine.float().numpy()))
                ctx.step_end()

    def test_views_with_offsets_are_read_in_place(self):
        """A contiguous slice is passed by its own address (storage offset)."""
        with resa.Context("cpu", num_layers=1, num_q_heads=2, num_kv_heads=1,
                          head_dim=8) as ctx:
            self.small_step(ctx, 3)
            big_q = torch.randn(10, 2, 8)
            big_kv = torch.randn(10, 1, 8)
            out_big = torch.full((10, 2, 8), float("nan"))
            ctx.attend(0, big_q[4:7], big_kv[2:5], big_kv[5:8], out_big[1:4])
            want = ctx.attend(0, big_q[4:7].clone(), big_kv[2:5].clone(), big_kv[5:8].clone())
            self.assertTrue(torch.equal(out_big[1:4], want))
            self.assertTrue(torch.isnan(out_big[:1]).all() and torch.isnan(out_big[4:]).all())
            ctx.step_end()

    def test_bad_tensors(self):
        with resa.Context("cpu", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=16,
                          io_dtype=torch.bfloat16) as ctx:
            self.small_step(ctx)
            q = torch.zeros(5, 4, 16, dtype=torch.bfloat16)
            k = torch.zeros(5, 2, 16, dtype=torch.bfloat16)
            cases = [
                (TypeError, "q: expected dtype bfloat16 (the context's IO_DTYPE), got float16",
                 dict(q=q.half())),
                (TypeError, "k: expected dtype bfloat16", dict(k=k.float())),
                (TypeError, "out: expected dtype bfloat16", dict(out=torch.zeros(5, 4, 16))),
                (TypeError, "v: expected dtype bfloat16", dict(v=DLPackOnly(k.double()))),
                (ValueError, "k: expected shape [5, 2, 16] ([T, Hkv, d] with T = 5 rows of the "
                 "open step), got [5, 16, 2]", dict(k=torch.zeros(5, 16, 2, dtype=torch.bfloat16))),
                (ValueError, "k: expected a C-contiguous buffer",
                 dict(k=torch.zeros(5, 16, 2, dtype=torch.bfloat16).transpose(1, 2))),
                (ValueError, "out: expected a C-contiguous buffer",
                 dict(out=torch.zeros(5, 4, 32, dtype=torch.bfloat16)[:, :, ::2])),
                (ValueError, "q: expected a C-contiguous buffer",
                 dict(q=DLPackOnly(torch.zeros(4, 5, 16, dtype=torch.bfloat16).transpose(0, 1)))),
                (ValueError, "q: expected a dense (strided) tensor",
                 dict(q=torch.zeros(5, 4, 16, dtype=torch.bfloat16).to_sparse())),
                (ValueError, "out: expected shape",
                 dict(out=torch.zeros(5, 4, 4, dtype=torch.bfloat16))),
            ]
            ro = np.zeros((5, 4, 16), np.float32)
            ro.flags.writeable = False
            for exc, text, replace in cases:
                args = dict(q=q, k=k, v=k, out=None)
                args.update(replace)
                with self.subTest(text=text):
                    with self.assertRaises(exc) as cm:
                        ctx.attend(0, args["q"], args["k"], args["v"], args["out"])
                    self.assertIn(text, str(cm.exception))
            ctx.step_cancel()
        with resa.Context("cpu", num_layers=1, num_q_heads=4, num_kv_heads=2,
                          head_dim=16) as ctx:
            self.small_step(ctx)
            q32, k32 = torch.zeros(5, 4, 16), torch.zeros(5, 2, 16)
            with self.assertRaises(ValueError) as cm:  # numpy >= 2 flags read-only DLPack
                ctx.attend(0, q32, k32, k32, DLPackOnly(ro))
            self.assertIn("out: not writable", str(cm.exception))
            ctx.step_cancel()


if __name__ == "__main__":
    unittest.main(verbosity=2)
