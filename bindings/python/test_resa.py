#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The ctypes bindings against an independent pure-Python reference: a
prompt (dense causal attention) and sparse decode steps with the budget rule,
on the CPU backend; errors surface as ResaError with the context's message."""
import array
import math
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resa  # noqa: E402

L, HQ, HKV, D, B = 2, 4, 2, 16, 4
G = HQ // HKV
rng = random.Random(int.from_bytes(os.urandom(4), "little"))


def rand(n):
    return array.array("f", (rng.gauss(0, 1) for _ in range(n)))


def attend(q, keys, values):
    scale = 1 / math.sqrt(D)
    s = [sum(a * b for a, b in zip(q, k)) * scale for k in keys]
    m = max(s)
    w = [math.exp(x - m) for x in s]
    z = sum(w)
    return [sum(w[j] * values[j][i] for j in range(len(w))) / z for i in range(D)]


def row(buf, r, h, heads):
    at = (r * heads + h) * D
    return list(buf[at:at + D])


def main():
    assert resa.__version__.count(".") == 2
    with resa.Context(resa.Backend.CPU, num_layers=L, num_q_heads=HQ, num_kv_heads=HKV,
                      head_dim=D) as ctx:
        for p, v in ((resa.Param.BLOCK_SIZE, B), (resa.Param.MAX_TOKENS, 1024),
                     (resa.Param.SELECT_MIN_BLOCKS, 3), (resa.Param.RECORD_SELECTION, 1),
                     (resa.Param.SELECT_FRACTION, 0.25)):
            ctx.set(p, v)
        assert abs(ctx.get(resa.Param.SOFTMAX_SCALE) - 1 / math.sqrt(D)) < 1e-12
        seq = ctx.seq_create()
        try:
            ctx.set(resa.Param.HEAD_DIM, 32)
            raise AssertionError("a locked parameter was accepted")
        except resa.BadStateError as e:
            assert "HEAD_DIM" in str(e), e
        cache = [([], []) for _ in range(L)]
        worst = 0.0
        # prompt of 37 tokens, then 3 sparse decode steps
        for mode, n in [(resa.Mode.APPEND, 37)] + [(resa.Mode.DECODE, 1)] * 3:
            ctx.step_begin([seq], [mode], [n])
            qs, outs = [], []
            for layer in range(L):
                q, k, v = rand(n * HQ * D), rand(n * HKV * D), rand(n * HKV * D)
                out = np.full((n, HQ, D), np.nan, np.float32)
                ctx.attend(layer, np.asarray(q).reshape(n, HQ, D), np.asarray(k).reshape(n, HKV, D),
                           np.asarray(v).reshape(n, HKV, D), out)
                out = out.reshape(-1)
                for t in range(n):
                    cache[layer][0].append([row(k, t, h, HKV) for h in range(HKV)])
                    cache[layer][1].append([row(v, t, h, HKV) for h in range(HKV)])
                qs.append(q)
                outs.append(out)
            ctx.step_end()
            length = ctx.seq_length(seq)
            for layer in range(L):
                K, V = cache[layer]
                for t in range(n):
                    pos = length - n + t
                    for h in range(HQ):
                        kvh = h // G
                        visible = range(pos + 1)
                        if mode == resa.Mode.DECODE:
                            chosen = ctx.selected_blocks(seq, layer, kvh)
                            assert (length - 1) // B in chosen  # the local block
                            visible = [p for b in chosen for p in range(b * B, min(length, b * B + B))]
                        ref = attend(row(qs[layer], t, h, HQ), [K[p][kvh] for p in visible],
                                     [V[p][kvh] for p in visible])
                        got = row(outs[layer], t, h, HQ)
                        worst = max(worst, max(abs(a - b) for a, b in zip(ref, got)))
        assert worst < 1e-4, worst
        assert ctx.seq_pending(seq) == 3, ctx.seq_pending(seq)  # 41 tokens: 11 blocks > 3
        try:
            ctx.seq_length(seq + 1)
            raise AssertionError("an unknown sequence was accepted")
        except resa.InvalidArgumentError as e:
            assert "seq" in str(e), e
    print("test_resa.py: 1 passed, 0 failed (max abs error %.2g)" % worst)


main()
