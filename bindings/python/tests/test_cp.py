#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The context-parallel API of the resa package (numpy, CPU backend) against
float64: resa.merge_states and Context.merge_states (rows whose every part is
-inf, NaN parts behind -inf never read), a context-parallel run over R = 2 and
3 contexts standing in for ranks next to one context (cp_reference.py, the
protocol of tests/check_cp.c in a smaller form), the log-sum-exp of dense
rows (APPEND, a dense DECODE, QUERY_DENSE, an empty sequence), the list and
threshold layout of a step with two entries, and every bad argument: the
binding's TypeError/ValueError before any C call, the library's error as its
exception.  Outputs are NaN-filled before each call; inputs are fresh random
values (RESA_TEST_SEED reproduces a run).

numpy and ml_dtypes are hard requirements (a missing one FAILS, never skips).

Merge tolerances are those of check_cp.c: per element 4 (P + 4) 2^-24 max|o_i|
(float32 weights and sums over P parts) plus half an ulp of the IO dtype of
the result; lse 4 (P + 2) 2^-24 (1 + |lse|)."""
import math
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bindings/python: the resa package
sys.path.insert(0, HERE)

try:
    import ml_dtypes  # noqa: F401 (bf16 arrays, resa_reference.io_numpy)
    import numpy as np
except ImportError as e:  # deliberately a failure, not a skip (exit 77)
    print("FAIL: test_cp needs numpy and ml_dtypes (pip install numpy ml_dtypes): %s" % e)
    sys.exit(1)

import resa  # noqa: E402
from cp_reference import CPWorld, U32, UNIT, attention64, kth_pair, lse64  # noqa: E402
from resa_reference import budget, io_numpy, seeded_rng  # noqa: E402

DTYPES = (resa.DType.F32, resa.DType.F16, resa.DType.BF16)


class NumpyCP:
    """cp_reference's adapter for numpy arrays."""

    @staticmethod
    def make(x, dtype):
        return x.astype(io_numpy(dtype))

    @staticmethod
    def full(shape, dtype, value):
        return np.full(shape, value, np.dtype(dtype) if isinstance(dtype, str) else io_numpy(dtype))

    stack = staticmethod(np.stack)

    @staticmethod
    def to64(a):
        return a.astype(np.float64)

    @staticmethod
    def ints(a):
        return a.astype(np.int64)


def merge64(parts, lses):
    """float64 merge of [P, rows, d] parts and [P, rows] lse: (out, lse,
    per-element bound without the result's rounding); NaN out and -inf lse
    for a row whose every part is -inf (parts behind -inf never read)."""
    P, rows, d = parts.shape
    out = np.full((rows, d), np.nan)
    lse = np.full(rows, -np.inf)
    amax = np.zeros(rows)
    for r in range(rows):
        live = [i for i in range(P) if lses[i, r] != -np.inf]
        if not live:
            continue
        x = lses[live, r]
        m = x.max()
        w = np.exp(x - m)
        out[r] = (w[:, None] * parts[live, r]).sum(axis=0) / w.sum()
        lse[r] = m + math.log(w.sum())
        amax[r] = np.abs(parts[live, r]).max()
    return out, lse, 4.0 * (P + 4) * U32 * amax


class TestMerge(unittest.TestCase):
    def random_parts(self, rng, dtype, P, rows, d):
        """check_cp.c's mix: a fifth of the rows with every part -inf, a
        fifth with some; NaN in every other column behind a -inf part."""
        lses = rng.uniform(-80, 80, (P, rows)).astype(np.float32)
        parts = rng.standard_normal((P, rows, d))
        for r in range(rows):
            kind = rng.integers(0, 5)
            for i in range(P):
                if kind == 0 or (kind == 1 and rng.integers(0, 2)):
                    lses[i, r] = -np.inf
                    parts[i, r, 1::2] = np.nan
        return parts.astype(io_numpy(dtype)), lses

    def check_merged(self, what, dtype, parts, lses, out, lse):
        P, d = parts.shape[0], parts.shape[-1]
        want, want_lse, tol = merge64(parts.astype(np.float64).reshape(P, -1, d),
                                      lses.astype(np.float64).reshape(P, -1))
        got = out.astype(np.float64).reshape(want.shape)
        got_lse = lse.astype(np.float64).reshape(want_lse.shape)
        dead = np.isnan(want[:, 0])
        self.assertTrue(np.isnan(got[dead]).all(), "%s: a row whose parts are all -inf is not "
                        "NaN" % what)
        self.assertTrue((got_lse[dead] == -np.inf).all(), "%s: lse of a dead row" % what)
        bound = tol[~dead, None] + UNIT[dtype] * np.abs(want[~dead])
        err = np.abs(got[~dead] - want[~dead])
        # (the messages are built only on failure: every row may be dead, and
        # max() of an empty array raises)
        if not (err <= bound).all():  # NaN fails too
            self.fail("%s: max |error| %.3g, bound there %.3g" % (
                what, np.nanmax(err), bound.flat[np.argmax(err - bound)]))
        lerr = np.abs(got_lse[~dead] - want_lse[~dead])
        lbound = 4.0 * (parts.shape[0] + 2) * U32 * (1 + np.abs(want_lse[~dead]))
        if not (lerr <= lbound).all():
            self.fail("%s: lse max |error| %.3g" % (what, np.nanmax(lerr)))
        return int(dead.sum())

    def test_against_float64(self):
        rng = seeded_rng("test_cp merge")
        for dtype in DTYPES:
            P, d, rows = int(rng.integers(1, 6)), int(rng.integers(1, 257)), int(
                rng.integers(1, 41))
            with self.subTest(dtype=dtype.name, P=P, d=d, rows=rows):
                parts, lses = self.random_parts(rng, dtype, P, rows, d)
                out = np.full((rows, d), np.nan, io_numpy(dtype))
                lse = np.full(rows, np.nan, np.float32)
                got = resa.merge_states(parts, lses, out, lse)
                self.assertIs(got[0], out)
                self.assertIs(got[1], lse)
                dead = self.check_merged("resa.merge_states %s" % dtype.name, dtype, parts, lses,
                                         out, lse)
                # the context's merge: same float64 answer, and (CPU) the same bits
                with resa.Context("cpu", num_layers=1, num_q_heads=1, num_kv_heads=1,
                                  head_dim=d, io_dtype=dtype) as ctx:
                    out2 = np.full((rows, d), np.nan, io_numpy(dtype))
                    lse2 = np.full(rows, np.nan, np.float32)
                    self.assertIs(ctx.merge_states(parts, lses, out2, lse_out=lse2)[0], out2)
                    self.check_merged("Context.merge_states %s" % dtype.name, dtype, parts, lses,
                                      out2, lse2)
                    self.assertEqual(out2.tobytes(), out.tobytes())
                    self.assertEqual(lse2.tobytes(), lse.tobytes())
                    # no lse asked for: out only, allocated like parts_out
                    out3 = ctx.merge_states(parts, lses)
                    self.assertEqual((type(out3), out3.dtype, out3.shape),
                                     (np.ndarray, parts.dtype, (rows, d)))
                    self.assertEqual(out3.tobytes(), out.tobytes())
                print("merge %s: P %d, d %d, %d rows (%d with every part -inf)"
                      % (dtype.name, P, d, rows, dead))

    def test_stacked_attend_shapes_and_edges(self):
        """[P, T, Hq, d] parts (attend outputs stacked), lse_out=True, no
        rows, one part, a NaN lse."""
        rng = seeded_rng("test_cp merge shapes")
        parts, lses = self.random_parts(rng, resa.DType.BF16, 3, 5 * 4, 24)
        parts, lses = parts.reshape(3, 5, 4, 24), lses.reshape(3, 5, 4)
        out, lse = resa.merge_states(parts, lses, lse_out=True)
        self.assertEqual((out.shape, out.dtype, lse.shape, lse.dtype),
                         ((5, 4, 24), parts.dtype, (5, 4), np.float32))
        self.check_merged("stacked", resa.DType.BF16, parts, lses, out, lse)
        flat = resa.merge_states(parts.reshape(3, 20, 24), lses.reshape(3, 20))
        self.assertEqual(flat.tobytes(), out.tobytes())
        empty = resa.merge_states(np.zeros((2, 0, 8), np.float32), np.zeros((2, 0), np.float32))
        self.assertEqual(empty.shape, (0, 8))
        one = rng.standard_normal((1, 3, 8)).astype(np.float32)
        got, got_lse = resa.merge_states(one, np.float32([[1.5, -2.0, -np.inf]]), lse_out=True)
        self.assertEqual(got[:2].tobytes(), one[0, :2].tobytes())  # weight exactly 1
        self.assertEqual(got_lse[:2].tolist(), [1.5, -2.0])
        self.assertTrue(np.isnan(got[2]).all() and got_lse[2] == -np.inf)
        nan_lse = np.float32([[np.nan, 0.0], [0.0, 0.0]])  # a NaN lse makes its row NaN
        got, got_lse = resa.merge_states(np.ones((2, 2, 4), np.float32), nan_lse, lse_out=True)
        self.assertTrue(np.isnan(got[0]).all() and np.isnan(got_lse[0]))
        self.assertTrue((got[1] == 1).all() and abs(got_lse[1] - math.log(2)) < 1e-6)


class TestContextParallel(unittest.TestCase):
    def run_world(self, R, io, decodes, ties=False):
        label = "numpy cp R %d %s%s" % (R, io.name, " ties" if ties else "")
        world = CPWorld(NumpyCP, R, io, seeded_rng(label), label, decodes=decodes, ties=ties)
        try:
            print(world.run())
        finally:
            world.close()

    def test_two_ranks(self):
        self.run_world(2, resa.DType.F32, 18)

    def test_three_ranks(self):
        self.run_world(3, resa.DType.F32, 18)

    def test_three_ranks_tied_scores(self):
        """Keys periodic over three blocks: many blocks score exactly alike
        on every rank, and the tie rule (the lower global index) decides."""
        self.run_world(3, resa.DType.F32, 18, ties=True)

    def test_three_ranks_bf16(self):
        self.run_world(3, resa.DType.BF16, 12)


def small(**extra):
    params = dict(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=20, block_size=4,
                  select_fraction=0.25, select_min_blocks=3, local_blocks=1, sink_blocks=1,
                  record_selection=1, num_threads=1, max_tokens=512)
    params.update(extra)
    return resa.Context("cpu", **params)


class TestLse(unittest.TestCase):
    def test_dense_rows_against_float64(self):
        """APPEND (dense causal), a dense DECODE (n = M), QUERY_DENSE (every
        stored key, no mask) and QUERY_DENSE of an empty sequence (0, -inf)."""
        rng = seeded_rng("test_cp lse")
        for io in (resa.DType.F32, resa.DType.BF16):
            with self.subTest(io=io.name), small(io_dtype=io) as ctx:
                scale = ctx.get("softmax_scale")
                a, empty = ctx.seq_create(), ctx.seq_create()
                keys = np.zeros((0, 2, 20))
                values = np.zeros((0, 2, 20))
                worst = 0.0
                for mode, n in ((resa.Mode.APPEND, 7), (resa.Mode.DECODE, 1),
                                (resa.Mode.QUERY_DENSE, 3), (resa.Mode.APPEND, 2)):
                    q = rng.standard_normal((n, 4, 20)).astype(io_numpy(io))
                    k = rng.standard_normal((n, 2, 20)).astype(io_numpy(io))
                    v = rng.standard_normal((n, 2, 20)).astype(io_numpy(io))
                    out = np.full((n, 4, 20), np.nan, io_numpy(io))
                    lse = np.full((n, 4), np.nan, np.float32)
                    stores = mode != resa.Mode.QUERY_DENSE
                    with ctx.step([a], mode, n) as st:
                        got = st.attend(0, q, k if stores else None, v if stores else None, out,
                                        lse=lse)
                        self.assertTrue(got[0] is out and got[1] is lse)
                    start = keys.shape[0]
                    if stores:
                        keys = np.concatenate([keys, k.astype(np.float64)])
                        values = np.concatenate([values, v.astype(np.float64)])
                    if mode == resa.Mode.DECODE:
                        self.assertEqual(ctx.selected_blocks(a, 0, 0), [0, 1])  # M = 2: dense
                    for t in range(n):
                        visible = start + t + 1 if stores else keys.shape[0]
                        for hh in range(4):
                            qd = q[t, hh].astype(np.float64)
                            kk, vv = keys[:visible, hh // 2], values[:visible, hh // 2]
                            want, want_lse = attention64(qd, kk, vv, scale)
                            self.assertAlmostEqual(want_lse, lse64(kk @ qd * scale), places=9)
                            smag = (np.abs(kk * qd).sum(axis=1) * scale).max()
                            tol_lse = 4 * 22 * U32 * smag + 4 * (visible + 4) * U32 * (
                                1 + abs(want_lse))
                            tol = ((2 * 22 * U32 * smag + 4 * (visible + 8) * U32)
                                   + 3 * UNIT[io]) * np.abs(vv).max()
                            e = abs(float(lse[t, hh]) - want_lse)
                            eo = np.abs(out[t, hh].astype(np.float64) - want).max()
                            self.assertLessEqual(e, tol_lse, "%s row %d head %d: lse %.9g, "
                                                 "float64 %.9g" % (mode.name, t, hh, lse[t, hh],
                                                                   want_lse))
                            self.assertLessEqual(eo, tol, "%s row %d head %d" % (mode.name, t, hh))
                            worst = max(worst, e / tol_lse, eo / tol)
                # a sequence holding nothing: every row attends no key
                out = np.full((2, 4, 20), np.nan, io_numpy(io))
                with ctx.step([empty], resa.Mode.QUERY_DENSE, 2) as st:
                    out, lse = st.attend(0, np.ones((2, 4, 20), io_numpy(io)), None, None, out,
                                         lse=True)
                self.assertTrue((out.astype(np.float32) == 0).all())
                self.assertTrue((lse == -np.inf).all())
                self.assertEqual(ctx.seq_length(a), 10)  # QUERY rows store nothing
                print("lse %s: worst error %.2f of its bound" % (io.name, worst))

    def test_allocations_and_plain_attend(self):
        """lse=True allocates float32 [T, Hq] like q; without lse= and
        thresholds= attend returns out alone, the same bits as attend_ex."""
        rng = np.random.default_rng(7)
        with small() as ctx:
            s = ctx.seq_create()
            q = rng.standard_normal((5, 4, 20)).astype(np.float32)
            k = rng.standard_normal((5, 2, 20)).astype(np.float32)
            with ctx.step([s], resa.Mode.APPEND, 5) as st:
                plain = st.attend(0, q, k, k)
                self.assertIsInstance(plain, np.ndarray)
                out, lse = st.attend(0, q, k, k, lse=True)
                self.assertEqual((lse.shape, lse.dtype), ((5, 4), np.float32))
                self.assertEqual(out.tobytes(), plain.tobytes())
                self.assertIsInstance(st.attend(0, q, k, k, lse=False), np.ndarray)
            ctx.seq_set_span(s, 0, 40)  # now the sequence's front part: QUERY entries only
            with ctx.step([s], resa.Mode.QUERY_SPARSE, 1) as st:
                sc, bl, cn = st.block_scores(0, q[:1], 8)
                self.assertEqual([(x.shape, x.dtype) for x in (sc, bl, cn)],
                                 [((1, 2, 8), np.float32), ((1, 2, 8), np.int32),
                                  ((1, 2), np.int32)])
                ts, tb = st.thresholds(sc[None], bl[None], cn[None])
                self.assertEqual([(x.shape, x.dtype) for x in (ts, tb)],
                                 [((1, 2), np.float32), ((1, 2), np.int32)])
                out = st.attend(0, q[:1], None, None, thresholds=(ts, tb))
                self.assertEqual(out.shape, (1, 4, 20))


class TestListsOfTwoEntries(unittest.TestCase):
    def test_layout(self):
        """Two sequences in one step: lists [2, Hkv, capacity], counts [2,
        Hkv], the thresholds of the right entry; one rank's thresholds take
        exactly its own listed candidates."""
        rng = seeded_rng("test_cp two entries")
        with small(num_layers=2) as ctx:
            b = 4
            seqs = [ctx.seq_create(), ctx.seq_create()]
            firsts, lens, globals_ = [8, 0], [37, 22], [101, 30]
            for s, f, n in zip(seqs, firsts, lens):
                ctx.seq_set_span(s, f, -1)
                kv = rng.standard_normal((n, 2, 20)).astype(np.float32)
                with ctx.step([s], resa.Mode.APPEND_KV, n) as st:
                    for layer in range(2):
                        st.attend(layer, None, kv, kv)
            for s, f, G in zip(seqs, firsts, globals_):
                ctx.seq_set_span(s, f, G)
            Ks = []
            for G in globals_:
                M = -(-(G + 1) // b)
                n, forced = budget(M, 0.25, 3, 1, 1)
                Ks.append(n - len(forced) if n < M else 0)
            cap = max(Ks)
            q = rng.standard_normal((2, 4, 20)).astype(np.float32)
            with ctx.step(seqs, resa.Mode.QUERY_SPARSE, 1) as st:
                for layer in range(2):
                    sc = np.full((2, 2, cap), np.nan, np.float32)
                    bl = np.full((2, 2, cap), -12345, np.int32)
                    cn = np.full((2, 2), -12345, np.int32)
                    st.block_scores(layer, q, cap, scores=sc, blocks=bl, counts=cn)
                    for i, (f, n) in enumerate(zip(firsts, lens)):
                        here = set(range(f // b, -(-(f + n) // b))) - {0}  # block 0: the sink
                        for h in range(2):
                            listed = bl[i, h, :cn[i, h]].tolist()
                            self.assertEqual(len(listed), min(Ks[i], len(here)))
                            self.assertLessEqual(set(listed), here)
                            self.assertFalse(np.isnan(sc[i, h, :cn[i, h]]).any())
                    ts, tb = st.thresholds(sc[None], bl[None], cn[None])
                    for i in range(2):
                        for h in range(2):
                            want = kth_pair(sc[None, i, h], bl[None, i, h], cn[None, i, h],
                                            Ks[i])
                            self.assertEqual((float(ts[i, h]), int(tb[i, h])), want)
                    out, lse = st.attend(layer, q, None, None, lse=True, thresholds=(ts, tb))
                    self.assertFalse(np.isnan(out).any() or np.isnan(lse).any())
            for i, s in enumerate(seqs):
                for h in range(2):
                    got = ctx.selected_blocks(s, 1, h)
                    listed = set(bl[i, h, :cn[i, h]].tolist())
                    forced_here = {x for x in budget(-(-(globals_[i] + 1) // b), 0.25, 3, 1, 1)[1]
                                   if firsts[i] // b <= x < -(-(firsts[i] + lens[i]) // b)}
                    # every listed candidate ranks at or above the K-th: all taken
                    self.assertEqual(set(got), listed | forced_here)


class TestArguments(unittest.TestCase):
    """Bad arguments: the binding's TypeError/ValueError before any C call
    (the poisoned outputs stay NaN), or the library's error as its class."""

    def setUp(self):
        self.ctx = small()
        self.seq = self.ctx.seq_create()
        kv = np.zeros((20, 2, 20), np.float32)
        self.ctx.seq_set_span(self.seq, 32, -1)
        with self.ctx.step([self.seq], resa.Mode.APPEND_KV, 20) as st:
            st.attend(0, None, kv, kv)
        self.ctx.seq_set_span(self.seq, 32, 200)  # M = ceil(201 / 4) = 51, n = 13, K = 11
        self.K = 11
        self.q = np.ones((1, 4, 20), np.float32)

    def tearDown(self):
        self.ctx.close()

    def expect(self, exc, text, call):
        with self.assertRaises(exc) as cm:
            call()
        self.assertIn(text, str(cm.exception))
        if issubclass(exc, resa.ResaError):
            self.assertEqual(cm.exception.message, self.ctx.last_error)
        else:
            self.assertNotIsInstance(cm.exception, resa.ResaError)
        return cm.exception

    def test_no_step(self):
        self.expect(ValueError, "block_scores: no step is open",
                    lambda: self.ctx.block_scores(0, self.q, self.K))
        self.expect(ValueError, "thresholds: no step is open",
                    lambda: self.ctx.thresholds(None, None, None))

    def test_block_scores(self):
        ctx, K = self.ctx, self.K
        with ctx.step([self.seq], resa.Mode.QUERY_SPARSE, 1) as st:
            e = self.expect(resa.InvalidArgumentError, "capacity",
                            lambda: st.block_scores(0, self.q, K - 1))
            self.assertEqual(e.status, resa.Status.ERR_INVALID_ARGUMENT)
            self.expect(ValueError, "capacity: -1 is out of range",
                        lambda: st.block_scores(0, self.q, -1))
            self.expect(TypeError, "capacity: expected an integer",
                        lambda: st.block_scores(0, self.q, "11"))
            self.expect(resa.InvalidArgumentError, "layer",
                        lambda: st.block_scores(1, self.q, K))
            self.expect(ValueError, "q: required", lambda: st.block_scores(0, None, K))
            self.expect(TypeError, "q: expected dtype float32 (the context's IO_DTYPE), got "
                        "float64", lambda: st.block_scores(0, self.q.astype(np.float64), K))
            self.expect(ValueError, "q: expected shape [1, 4, 20]",
                        lambda: st.block_scores(0, np.ones((1, 2, 20), np.float32), K))
            poisoned = np.full((1, 2, K), np.nan, np.float32)
            cases = [
                (TypeError, "scores: expected dtype float32, got float64",
                 dict(scores=np.zeros((1, 2, K)))),
                (ValueError, "scores: expected shape [1, 2, 11] ([n_entries, Hkv, capacity] "
                 "with 1 entries in the open step), got [1, 2, 10]",
                 dict(scores=np.zeros((1, 2, K - 1), np.float32))),
                (TypeError, "blocks: expected dtype int32, got int64",
                 dict(scores=poisoned, blocks=np.zeros((1, 2, K), np.int64))),
                (ValueError, "counts: expected shape [1, 2] ([n_entries, Hkv] with 1 entries "
                 "in the open step), got [2]",
                 dict(scores=poisoned, counts=np.zeros(2, np.int32))),
                (ValueError, "blocks: expected a C-contiguous buffer",
                 dict(scores=poisoned, blocks=np.zeros((1, 2, 2 * K), np.int32)[:, :, ::2])),
            ]
            ro = np.zeros((1, 2), np.int32)
            ro.flags.writeable = False
            cases.append((ValueError, "counts: not writable", dict(scores=poisoned, counts=ro)))
            for exc, text, kw in cases:
                with self.subTest(text=text):
                    self.expect(exc, text, lambda: st.block_scores(0, self.q, K, **kw))
            self.assertTrue(np.isnan(poisoned).all(), "a refused call wrote scores")
            sc, bl, cn = st.block_scores(0, self.q, K)  # the step is intact
            self.assertEqual(cn.tolist(), [[5, 5]])  # blocks 8 .. 12: none forced here

            # thresholds
            S, B, C = sc[None], bl[None], cn[None]
            self.expect(ValueError, "scores: expected shape [n_ranks, 1, 2, capacity] "
                        "([n_ranks, n_entries, Hkv, capacity] with n_ranks >= 1 and 1 entries in "
                        "the open step), got [1, 2, 11]", lambda: st.thresholds(sc, B, C))
            self.expect(ValueError, "scores: expected shape [n_ranks, 1, 2, capacity]",
                        lambda: st.thresholds(np.zeros((0, 1, 2, K), np.float32), B, C))
            self.expect(TypeError, "scores: expected dtype float32, got float64",
                        lambda: st.thresholds(S.astype(np.float64), B, C))
            self.expect(TypeError, "scores: expected dtype float32, got float64",
                        lambda: st.thresholds(sc.astype(np.float64), B, C))
            self.expect(ValueError, "blocks: expected shape [1, 1, 2, 11] ([n_ranks, n_entries, "
                        "Hkv, capacity] as scores), got [2, 1, 2, 11]",
                        lambda: st.thresholds(S, np.concatenate([B, B]), C))
            self.expect(TypeError, "counts: expected dtype int32, got float32",
                        lambda: st.thresholds(S, B, C.astype(np.float32)))
            self.expect(ValueError, "counts: expected shape [1, 1, 2]",
                        lambda: st.thresholds(S, B, cn))
            self.expect(ValueError, "threshold_blocks: expected shape [1, 2]",
                        lambda: st.thresholds(S, B, C, threshold_blocks=np.zeros(2, np.int32)))
            # lists narrower than K: the library's capacity error
            self.expect(resa.InvalidArgumentError, "capacity",
                        lambda: st.thresholds(S[..., :K - 1].copy(), B[..., :K - 1].copy(), C))
            ts, tb = st.thresholds(S, B, C)

            # attend
            out = np.full((1, 4, 20), np.nan, np.float32)
            for exc, text, kw in [
                    (TypeError, "lse: expected dtype float32, got float64",
                     dict(lse=np.zeros((1, 4)))),
                    (ValueError, "lse: expected shape [1, 4] ([T, Hq] with T = 1 rows of the open "
                     "step), got [1, 4, 1]", dict(lse=np.zeros((1, 4, 1), np.float32))),
                    (TypeError, "thresholds: expected a pair (threshold_scores, "
                     "threshold_blocks), got ndarray", dict(thresholds=ts)),
                    (TypeError, "thresholds: expected a pair", dict(thresholds=(ts, tb, tb))),
                    (TypeError, "threshold_blocks: expected dtype int32, got float32",
                     dict(thresholds=(ts, ts))),
                    (ValueError, "threshold_scores: expected shape [1, 2] ([n_entries, Hkv] with "
                     "1 entries in the open step), got [2]", dict(thresholds=(ts[0], tb))),
                    (TypeError, "lse: expected a numpy array, a torch tensor or a DLPack "
                     "producer, got list", dict(lse=[[0.0] * 4])),
            ]:
                with self.subTest(text=text):
                    self.expect(exc, text, lambda: st.attend(0, self.q, None, None, out, **kw))
            ro = np.zeros((1, 4), np.float32)
            ro.flags.writeable = False
            self.expect(ValueError, "lse: not writable",
                        lambda: st.attend(0, self.q, None, None, out, lse=ro))
            self.assertTrue(np.isnan(out).all(), "a refused attend wrote out")
            out, lse = st.attend(0, self.q, None, None, out, lse=True, thresholds=[ts, tb])
            self.assertFalse(np.isnan(out).any())
        self.assertEqual(ctx.selected_blocks(self.seq, 0, 0), list(range(8, 13)))

    def test_state_errors(self):
        ctx, seq = self.ctx, self.seq
        self.expect(resa.InvalidArgumentError, "first_token",
                    lambda: ctx.seq_set_span(seq, 36, -1))  # it holds tokens
        other = ctx.seq_create()
        self.expect(resa.InvalidArgumentError, "first_token",
                    lambda: ctx.seq_set_span(other, 6, -1))  # not a multiple of the block size
        self.expect(resa.InvalidArgumentError, "global_length",
                    lambda: ctx.seq_set_span(seq, 32, 51))  # before its end, 52
        self.expect(resa.InvalidArgumentError, "global_length",
                    lambda: ctx.seq_set_span(seq, 32, -2))
        self.expect(resa.InvalidArgumentError, "seq", lambda: ctx.seq_set_span(12345, 0, -1))
        self.expect(ValueError, "first_token: 1180591620717411303424 is out of range",
                    lambda: ctx.seq_set_span(seq, 2 ** 70, -1))
        self.expect(TypeError, "global_length: expected an integer",
                    lambda: ctx.seq_set_span(seq, 32, 1.5))
        # not the tail: stores are refused; a DECODE there is the library's error
        self.expect(resa.InvalidArgumentError, "tail",
                    lambda: ctx.step_begin([seq], resa.Mode.DECODE, 1))
        with ctx.step([seq], resa.Mode.QUERY_DENSE, 2) as st:
            self.expect(resa.BadStateError, "step", lambda: ctx.seq_set_span(seq, 32, -1))
            # an all-QUERY step takes no k and v, an APPEND step needs them
            st.attend(0, np.ones((2, 4, 20), np.float32), None, None)
        with ctx.step([other], resa.Mode.APPEND, 2) as st:
            x = np.ones((2, 4, 20), np.float32)
            self.expect(ValueError, "k: required (None only when every entry is "
                        "Mode.QUERY_DENSE or Mode.QUERY_SPARSE)",
                        lambda: st.attend(0, x, None, np.ones((2, 2, 20), np.float32)))
            self.expect(ValueError, "v: required",
                        lambda: st.attend(0, x, np.ones((2, 2, 20), np.float32), None))
            st.attend(0, x, x[:, :2].copy(), x[:, :2].copy())
        # HEAD_SHARE cannot rank a split sequence
        ctx.set("group_score", "head_share")
        self.expect(resa.NotSupportedError, "HEAD_SHARE",
                    lambda: ctx.step_begin([seq], resa.Mode.QUERY_SPARSE, 1))
        ctx.set("group_score", "pooled")
        # a context that answers queries must have nothing pending
        ctx.set("select_min_blocks", 0)
        kv = np.ones((40, 2, 20), np.float32)
        with ctx.step([other], resa.Mode.APPEND_KV, 40) as st:
            st.attend(0, None, kv, kv)
        with ctx.step([other], resa.Mode.DECODE, 1) as st:
            st.attend(0, kv[:1, :1].repeat(4, 1), kv[:1], kv[:1])
        self.assertEqual(ctx.seq_pending(other), 1)
        self.expect(resa.BadStateError, "pending",
                    lambda: ctx.step_begin([other], resa.Mode.QUERY_DENSE, 1))
        ctx.close()
        for call in (lambda: ctx.seq_set_span(seq, 0, -1),
                     lambda: ctx.merge_states(np.zeros((1, 1, 20), np.float32),
                                              np.zeros((1, 1), np.float32))):
            with self.assertRaises(resa.ContextClosedError):
                call()

    def test_merge(self):
        parts = np.zeros((2, 3, 20), np.float32)
        lses = np.zeros((2, 3), np.float32)
        M = resa.merge_states
        for exc, text, call in [
                (ValueError, "parts_out: expected shape [n_parts, rows, d] or [n_parts, T, Hq, d] "
                 "with n_parts >= 1, got [3, 20]", lambda: M(parts[0], lses)),
                (ValueError, "parts_out: expected shape", lambda: M(parts[:0], lses[:0])),
                (TypeError, "parts_out: expected dtype float32, float16 or bfloat16, got int32",
                 lambda: M(parts.astype(np.int32), lses)),
                (TypeError, "parts_lse: expected dtype float32, got float16",
                 lambda: M(parts, lses.astype(np.float16))),
                (ValueError, "parts_lse: expected shape [2, 3] (parts_out's shape without d), "
                 "got [3, 2]", lambda: M(parts, lses.T.copy())),
                (TypeError, "out: expected dtype float32 (parts_out's dtype), got float16",
                 lambda: M(parts, lses, np.zeros((3, 20), np.float16))),
                (ValueError, "out: expected shape [3, 20] (parts_out's shape without n_parts), "
                 "got [2, 3, 20]", lambda: M(parts, lses, np.zeros((2, 3, 20), np.float32))),
                (ValueError, "lse_out: expected shape [3] (parts_out's shape without n_parts and "
                 "d), got [2, 3]", lambda: M(parts, lses, None, np.zeros((2, 3), np.float32))),
                (TypeError, "lse_out: expected dtype float32, got float64",
                 lambda: M(parts, lses, None, np.zeros(3))),
                (ValueError, "out: must not overlap parts_out", lambda: M(parts, lses, parts[1])),
                (ValueError, "lse_out: must not overlap parts_lse",
                 lambda: M(parts, lses, None, lses[1])),
                (ValueError, "parts_lse: expected a C-contiguous buffer",
                 lambda: M(parts, np.zeros((3, 2), np.float32).T)),
                (resa.InvalidArgumentError, "merge_states: refused dtype F32, n_parts 2, n_rows 3, "
                 "head_dim 300 (head_dim must be in [1, 256])",
                 lambda: M(np.zeros((2, 3, 300), np.float32), lses)),
        ]:
            with self.subTest(text=text):
                with self.assertRaises(exc) as cm:
                    call()
                self.assertIn(text, str(cm.exception))
        # the context's merge: its IO_DTYPE and HEAD_DIM
        ctx = self.ctx
        for exc, text, call in [
                (TypeError, "parts_out: expected dtype float32 (the context's IO_DTYPE), got "
                 "float16", lambda: ctx.merge_states(parts.astype(np.float16), lses)),
                (ValueError, "parts_out: expected shape [2, 3, 20] ([n_parts, rows..., d] with "
                 "d = 20, the context's HEAD_DIM), got [2, 3, 8]",
                 lambda: ctx.merge_states(parts[..., :8].copy(), lses)),
        ]:
            with self.subTest(text=text):
                self.expect(exc, text, call)
        self.assertEqual(ctx.merge_states(parts, lses).shape, (3, 20))


if __name__ == "__main__":
    unittest.main(verbosity=2)
