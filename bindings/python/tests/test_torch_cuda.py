#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The CUDA backend through the resa package with torch CUDA tensors: against
the float64 model of resa_reference.py (F16 and BF16), following torch's
current stream (steps hopping between streams), an explicit stream, and a
StepGraph capture + replay against eager steps.

Exit status 77 (meson: skipped) with the reason printed where torch is
missing, there is no CUDA device, or libresa has no CUDA module; but when
RESA_CUDA_MODULE names a module (meson sets it when the module was built) and
a GPU is there, an unavailable backend FAILS.

Tolerances: the CUDA kernels round softmax probabilities to the IO dtype for
the tensor-core products, on top of the output rounding, so the error is
larger than on the CPU: 1e-2 (F16) and 5e-2 (BF16) max |error| on outputs of
magnitude <~ 3 (tests/check_cuda.c asks 1e-2 relative L2)."""
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

try:
    import torch
except ImportError as e:
    print("SKIP: test_torch_cuda needs torch: %s" % e)
    sys.exit(77)
if not torch.cuda.is_available():
    print("SKIP: test_torch_cuda: no CUDA device (torch.cuda.is_available() is false)")
    sys.exit(77)

import resa  # noqa: E402
from resa_reference import Scenario, seeded_rng  # noqa: E402

if not resa.backend_available("cuda"):
    if os.environ.get("RESA_CUDA_MODULE"):
        print("FAIL: a GPU is there and RESA_CUDA_MODULE=%s, but libresa's CUDA backend is not "
              "available" % os.environ["RESA_CUDA_MODULE"])
        sys.exit(1)
    print("SKIP: test_torch_cuda: libresa has no CUDA module here (build with -Dgpu=enabled)")
    sys.exit(77)

from test_torch_cpu import TORCH, TorchAdapter  # noqa: E402

ATOL = {resa.DType.F16: 1e-2, resa.DType.BF16: 5e-2}
# The scenario's shape within what the CUDA backend takes (head dim 64, 128
# or 256, block 8 to 64).
PARAMS = dict(Scenario.PARAMS, head_dim=64, block_size=8)


class CudaAdapter(TorchAdapter):
    device = "cuda"


class StreamHopping(Scenario):
    """Each step on the next of a few streams (the default one included):
    inputs, the step and the read-back all on the stream current then."""

    def __init__(self, *args):
        super().__init__(*args)
        self.streams = [torch.cuda.default_stream(), torch.cuda.Stream(), torch.cuda.Stream()]
        self.turn = 0

    def step(self, entries):
        stream = self.streams[self.turn % len(self.streams)]
        self.turn += 1
        with torch.cuda.stream(stream):
            super().step(entries)
            assert self.ctx._stream == stream.cuda_stream, "the context did not follow torch"


class TestTorchCUDA(unittest.TestCase):
    def context(self, dtype, **extra):
        return resa.Context("cuda", io_dtype=TORCH[dtype], **dict(PARAMS, **extra))

    def test_against_float64(self):
        for dtype in (resa.DType.BF16, resa.DType.F16):
            with self.subTest(dtype=dtype.name), self.context(dtype) as ctx:
                self.assertEqual(ctx.backend, resa.Backend.CUDA)
                self.assertEqual(ctx.device, "cuda:%d" % torch.cuda.current_device())
                rng = seeded_rng("test_torch_cuda %s" % dtype.name)
                worst = Scenario(ctx, CudaAdapter, dtype, rng, ATOL[dtype],
                                 "cuda %s" % dtype.name).run()
                print("cuda %s: max |error| %.3g (limit %.3g)" % (dtype.name, worst, ATOL[dtype]))

    def test_follows_the_current_stream(self):
        dtype = resa.DType.BF16
        with self.context(dtype) as ctx:
            rng = seeded_rng("test_torch_cuda streams")
            StreamHopping(ctx, CudaAdapter, dtype, rng, ATOL[dtype], "cuda streams").run()

    def test_wrong_device_and_host_tensors(self):
        with self.context(resa.DType.BF16) as ctx:
            s = ctx.seq_create()
            ctx.step_begin([s], resa.Mode.APPEND, [3])
            q = torch.zeros(3, 6, 64, dtype=torch.bfloat16)
            k = torch.zeros(3, 2, 64, dtype=torch.bfloat16)
            with self.assertRaises(ValueError) as cm:
                ctx.attend(0, q, k.cuda(), k.cuda())
            self.assertIn("q: expected a CUDA tensor on %s (the context's device), got cpu"
                          % ctx.device, str(cm.exception))
            host_v = np.zeros((3, 2, 64), ml_dtypes.bfloat16)  # right dtype and shape, host
            with self.assertRaises(ValueError) as cm:
                ctx.attend(0, q.cuda(), k.cuda(), host_v)
            self.assertIn("v: expected a CUDA tensor on %s" % ctx.device, str(cm.exception))
            ctx.step_cancel()

    def test_explicit_stream(self):
        """set_stream: the context stays on that stream whatever torch's
        current one is; ordering is the caller's (here: synchronize)."""
        dtype = resa.DType.BF16
        g = torch.Generator(device="cpu").manual_seed(1)
        with self.context(dtype) as gpu, resa.Context("cpu", io_dtype=TORCH[dtype],
                                                      **PARAMS) as cpu:
            mine = torch.cuda.Stream()
            gpu.set_stream(mine)
            sg, sc = gpu.seq_create(), cpu.seq_create()
            for n in (19, 1, 1):
                mode = resa.Mode.APPEND if n > 1 else resa.Mode.DECODE
                host = [(torch.randn(n, 6, 64, generator=g).to(torch.bfloat16),
                         torch.randn(n, 2, 64, generator=g).to(torch.bfloat16),
                         torch.randn(n, 2, 64, generator=g).to(torch.bfloat16))
                        for _ in range(PARAMS["num_layers"])]
                dev = [tuple(t.cuda() for t in layer) for layer in host]
                torch.cuda.synchronize()
                with gpu.step([sg], mode, n) as st:
                    outs = [st.attend(l, *dev[l]) for l in range(len(dev))]
                self.assertEqual(gpu._stream, mine.cuda_stream)
                gpu.synchronize()
                with cpu.step([sc], mode, n) as st:
                    want = [st.attend(l, *host[l]) for l in range(len(host))]
                for got, ref in zip(outs, want):
                    err = (got.cpu().double() - ref.double()).abs().max().item()
                    self.assertLessEqual(err, ATOL[dtype])

    def test_step_graph_matches_eager(self):
        dtype, B, L = resa.DType.BF16, 3, PARAMS["num_layers"]
        g = torch.Generator(device="cpu").manual_seed(2)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(torch.bfloat16).cuda()

        with self.context(dtype) as eager, self.context(dtype) as graphed:
            graph = resa.graphs.StepGraph(graphed)
            with self.assertRaises(resa.BadStateError):
                graph.replay()  # nothing captured
            se = [eager.seq_create() for _ in range(B)]
            sg = [graphed.seq_create() for _ in range(B)]
            prompt = [(rand(3 * 40, 6, 64), rand(3 * 40, 2, 64), rand(3 * 40, 2, 64))
                      for _ in range(L)]
            for ctx, seqs in ((eager, se), (graphed, sg)):  # the same 40-token prompts
                with ctx.step(seqs, resa.Mode.APPEND, 40) as st:
                    for l in range(L):
                        st.attend(l, *prompt[l])
            # fixed buffers, as a graph needs
            qb = [torch.empty(B, 6, 64, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
            kb = [torch.empty(B, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
            vb = [torch.empty_like(k) for k in kb]
            ob = [torch.full_like(q, float("nan")) for q in qb]
            for step in range(5):
                inputs = [(rand(B, 6, 64), rand(B, 2, 64), rand(B, 2, 64)) for _ in range(L)]
                for l in range(L):
                    qb[l].copy_(inputs[l][0]), kb[l].copy_(inputs[l][1]), vb[l].copy_(inputs[l][2])
                    ob[l].fill_(float("nan"))
                if step == 3:  # an eager step of another shape between replays
                    for ctx, seqs in ((eager, se), (graphed, sg)):
                        with ctx.step(seqs, resa.Mode.APPEND, 1) as st:
                            for l in range(L):
                                st.attend(l, *inputs[l])
                with eager.step(se, resa.Mode.DECODE, 1) as st:
                    want = [st.attend(l, *inputs[l]) for l in range(L)]
                replay = step > 0
                with graphed.step(sg, resa.Mode.DECODE, 1, replay=replay) as st:
                    if replay:
                        graph.replay()
                    else:
                        with self.assertRaises(resa.BadStateError):
                            graph.replay()  # this step is not a replay step
                        graph.capture(lambda: [st.attend(l, qb[l], kb[l], vb[l], ob[l])
                                               for l in range(L)])
                for l in range(L):
                    err = (ob[l].double() - want[l].double()).abs().max().item()
                    self.assertFalse(torch.isnan(ob[l]).any().item(), "step %d layer %d" % (step, l))
                    self.assertLessEqual(err, 1e-2, "step %d layer %d: graph vs eager" % (step, l))
                    if err:
                        print("step %d layer %d: graph and eager differ by %.3g" % (step, l, err))
            for a, b in zip(se, sg):
                self.assertEqual(eager.seq_length(a), graphed.seq_length(b))
                self.assertEqual(eager.seq_pending(a), graphed.seq_pending(b))


if __name__ == "__main__":
    unittest.main(verbosity=2)
