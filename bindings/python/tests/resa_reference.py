# SPDX-License-Identifier: MIT
"""An independent float64 model of a libresa context, and a scenario that
drives a real context and the model side by side.  Shared by the numpy, torch
and CUDA tests; not a test itself.

The model follows docs/API.md (the truth, with
/work/shared/spec/resa-algorithm.md): dense causal attention for APPEND and
RECTIFY rows; for DECODE the budget rule n = max(ceil(r M), min(M, n_min)),
forced sink/local blocks, block scores from per-block min/max key summaries
against the group's pooled (mean) query, the top n - forced free blocks, exact
softmax over the chosen blocks' stored positions; the pending-token
bookkeeping of step_end.  The library scores in float32 and the model in
float64, so near-equal scores may order differently: the model checks that
the library's recorded choice is a valid top set (every chosen free block
scores at least every unchosen one, up to float32 rounding) and then attends
exactly the blocks the library chose.
"""
import math
import os

import numpy as np

import resa

APPEND, DECODE, RECTIFY, APPEND_KV = (resa.Mode.APPEND, resa.Mode.DECODE, resa.Mode.RECTIFY,
                                      resa.Mode.APPEND_KV)


def io_numpy(io_dtype):
    """The numpy type that holds an IO dtype's values (BF16: ml_dtypes.bfloat16)."""
    import ml_dtypes
    return {resa.DType.F32: np.float32, resa.DType.F16: np.float16,
            resa.DType.BF16: ml_dtypes.bfloat16}[io_dtype]


def seeded_rng(name):
    """A fresh generator per run (RESA_TEST_SEED reproduces one); the seed is
    printed so that a failure can be replayed."""
    seed = int(os.environ.get("RESA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print("%s: seed %d (RESA_TEST_SEED=%d reproduces it)" % (name, seed, seed))
    return np.random.default_rng(seed)


def after_step(mode, n, sparse, length, pending):
    """(length, pending) after step_end for one entry of n tokens (docs/API.md,
    pending tokens): RECTIFY settles n pending tokens; a sparse DECODE starts
    or extends the pending run, a dense one extends it only; other stores
    extend a pending run."""
    if mode == RECTIFY:
        return length, pending - n
    if mode == DECODE:
        pending = 1 if sparse and pending == 0 else pending + 1 if pending else 0
    elif pending:
        pending += n
    return length + n, pending


def budget(M, r, n_min, local, sink):
    """docs/API.md, 'Block selection: the budget rule': (n, forced block set)."""
    r_ppm = int(math.floor(r * 1e6 + 0.5))
    n = -(-r_ppm * M // 1000000)
    n = max(n, min(M, n_min))
    n = min(max(n, min(local + sink, M)), M)
    forced = set(range(min(sink, M))) | set(range(max(M - local, 0), M))
    return n, forced


def attention(q, keys, values, scale):
    """softmax(scale q k^T) v for one query row over the given keys (float64)."""
    s = keys @ q * scale
    w = np.exp(s - s.max())
    return (w / w.sum()) @ values


def fp8_kv(rows, io_dtype):
    """The fp8 KV cache (docs/API.md, "fp8 KV cache") from its definition, with
    ml_dtypes' e4m3 as the codec: each (token, head) vector x of the IO values
    reads back as IO(float32(e4m3(float32(x / scale)) * scale)), scale =
    float32(max |x| / 448).  rows: float64 [n, hkv, d] of IO values."""
    import ml_dtypes
    x = rows.astype(np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = amax / np.float32(448.0)  # float32 division
    scale = np.where((scale == 0) & (amax > 0), np.float32(2.0 ** -149), scale)
    y = np.where(scale == 0, x, x / np.where(scale == 0, np.float32(1), scale))
    e4m3 = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)  # round to nearest even
    return (e4m3 * scale).astype(io_numpy(io_dtype)).astype(np.float64)


class Sequence:
    def __init__(self, layers, hkv, d):
        self.length = 0
        self.pending = 0
        self.k = [np.zeros((0, hkv, d)) for _ in range(layers)]
        self.v = [np.zeros((0, hkv, d)) for _ in range(layers)]

    def copy(self):
        c = Sequence(0, 0, 0)
        c.length, c.pending = self.length, self.pending
        c.k = [a.copy() for a in self.k]
        c.v = [a.copy() for a in self.v]
        return c


class Reference:
    """The float64 model of one context."""

    def __init__(self, layers, hq, hkv, d, block, r, n_min, local, sink, scale=None, width=1.0,
                 group_score=0, kv_fp8_io=None):
        self.layers, self.hq, self.hkv, self.d, self.b = layers, hq, hkv, d, block
        self.kv_fp8_io = kv_fp8_io  # the IO dtype of an fp8 KV cache, else None
        self.r, self.n_min, self.local, self.sink = r, n_min, local, sink
        self.width = width  # SCORE_WIDTH: 1 is the paper's upper bound
        self.group_score = int(group_score)  # GROUP_SCORE: 0 pooled query, 1 per-head shares
        self.scale = 1 / math.sqrt(d) if scale is None else scale
        self.seqs = {}
        self.decodes = self.sparse_decodes = 0

    def create(self, seq):
        self.seqs[seq] = Sequence(self.layers, self.hkv, self.d)

    def fork(self, parent, child):
        self.seqs[child] = self.seqs[parent].copy()

    def release(self, seq):
        del self.seqs[seq]

    def _positions(self, seq, mode, n):
        s = self.seqs[seq]
        if mode == RECTIFY:
            return s.length - s.pending, s.length - s.pending + n
        return s.length, s.length + n

    def _write(self, layer, seq, mode, n, k_rows, v_rows):
        s = self.seqs[seq]
        lo, hi = self._positions(seq, mode, n)
        for store, rows in ((s.k, k_rows), (s.v, v_rows)):
            if self.kv_fp8_io is not None:
                rows = fp8_kv(rows, self.kv_fp8_io)
            if hi > store[layer].shape[0]:
                grown = np.zeros((hi, self.hkv, self.d))
                grown[:store[layer].shape[0]] = store[layer]
                store[layer] = grown
            store[layer][lo:hi] = rows

    def _check_selection(self, chosen, scores, mags, forced, n, M, where):
        chosen = set(chosen)
        assert len(chosen) == n, "%s: %d blocks chosen, the budget is %d (M %d)" % (
            where, len(chosen), n, M)
        assert forced <= chosen, "%s: forced blocks %s not all in %s" % (
            where, sorted(forced), sorted(chosen))
        free_in = np.array(sorted(chosen - forced), dtype=np.int64)
        free_out = np.array(sorted(set(range(M)) - chosen), dtype=np.int64)
        if free_in.size and free_out.size:
            # float32 scoring in the library: allow its rounding, relative to
            # the magnitudes summed (as tests/harness.c does)
            slack = 1e-4 * (mags[free_in][:, None] + mags[free_out][None, :])
            if self.group_score == 1:  # fp32 sums of M exponentials (the normalisers)
                slack = slack + 2.4e-7 * M
            bad = scores[free_in][:, None] < scores[free_out][None, :] - slack
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise AssertionError("%s: block %d scored %.6g chosen over block %d scored %.6g"
                                     % (where, free_in[i], scores[free_in[i]], free_out[j],
                                        scores[free_out[j]]))

    def _block_scores(self, keys, query, M):
        scores, mags = np.empty(M), np.empty(M)
        for i in range(M):
            blk = keys[i * self.b:(i + 1) * self.b]
            hi, lo = query * blk.max(axis=0), query * blk.min(axis=0)
            # the box centre plus `width` times its half-width seen from
            # the query; at width 1 that is max(hi, lo), the paper's bound
            scores[i] = (0.5 * (hi + lo) + self.width * 0.5 * np.abs(hi - lo)).sum()
            mags[i] = np.maximum(np.abs(hi), np.abs(lo)).sum()
        return scores, mags

    def _head_share_scores(self, keys, queries, M):
        """GROUP_SCORE HEAD_SHARE: log sum_h exp(s_h - logsumexp(s_h)), s_h = head h's
        block scores in logits.  The magnitudes add the largest over all blocks,
        which the per-head normalisers carry (tests/ref.c says the same)."""
        per_head = [self._block_scores(keys, qh, M) for qh in queries]
        s = np.stack([sc for sc, _ in per_head]) * self.scale
        mg = np.stack([mag for _, mag in per_head]) * self.scale
        top = s.max(axis=1, keepdims=True)
        lse = top + np.log(np.exp(s - top).sum(axis=1, keepdims=True))
        t = s - lse
        tmax = t.max(axis=0)
        return tmax + np.log(np.exp(t - tmax).sum(axis=0)), mg.max(axis=0) + mg.max()

    def _decode(self, layer, seq, q_row, selection):
        """One DECODE row of `seq` (its K/V already written), all query heads."""
        s = self.seqs[seq]
        visible = s.length + 1
        M = -(-visible // self.b)
        n, forced = budget(M, self.r, self.n_min, self.local, self.sink)
        g = self.hq // self.hkv
        out = np.empty((self.hq, self.d))
        for kvh in range(self.hkv):
            keys, values = s.k[layer][:visible, kvh], s.v[layer][:visible, kvh]
            if n == M:
                blocks = list(range(M))
            else:
                if self.group_score == 1:
                    scores, mags = self._head_share_scores(keys, q_row[kvh * g:(kvh + 1) * g], M)
                else:
                    scores, mags = self._block_scores(keys, q_row[kvh * g:(kvh + 1) * g].mean(axis=0), M)
                blocks = selection(seq, layer, kvh)
                self._check_selection(blocks, scores, mags, forced, n, M,
                                      "seq %d layer %d kv head %d" % (seq, layer, kvh))
            pos = np.array([p for i in sorted(blocks) for p in range(i * self.b, (i + 1) * self.b)
                            if p < visible])
            for h in range(kvh * g, (kvh + 1) * g):
                out[h] = attention(q_row[h], keys[pos], values[pos], self.scale)
        return out, n < M

    def step(self, entries, q, k, v, selection):
        """entries: [(seq, mode, n)]; q/k/v: per layer float64 [T, H, d] (q[l]
        may be None); selection(seq, layer, kv_head) -> the library's blocks.
        Returns per layer [T, Hq, d] outputs with NaN in APPEND_KV rows, and
        commits lengths and pending counts as step_end does."""
        outs = []
        sparse = {}
        for layer in range(self.layers):
            row = 0
            for seq, mode, n in entries:  # every write of the layer comes before any read
                self._write(layer, seq, mode, n, k[layer][row:row + n], v[layer][row:row + n])
                row += n
            out = np.full((row, self.hq, self.d), np.nan)
            row = 0
            for seq, mode, n in entries:
                s = self.seqs[seq]
                lo, _ = self._positions(seq, mode, n)
                if mode == DECODE:
                    out[row], sparse[seq] = self._decode(layer, seq, q[layer][row], selection)
                elif mode in (APPEND, RECTIFY):
                    for t in range(n):
                        pos = lo + t
                        for h in range(self.hq):
                            kvh = h // (self.hq // self.hkv)
                            out[row + t, h] = attention(
                                q[layer][row + t, h], s.k[layer][:pos + 1, kvh],
                                s.v[layer][:pos + 1, kvh], self.scale)
                row += n
            outs.append(out)
        for seq, mode, n in entries:  # step_end: docs/API.md, pending tokens
            s = self.seqs[seq]
            if mode == DECODE:
                self.decodes += 1
                self.sparse_decodes += sparse[seq]
            s.length, s.pending = after_step(mode, n, sparse.get(seq, False), s.length, s.pending)
        return outs


class Scenario:
    """Drives a context and the Reference through prefill, APPEND_KV, sparse
    decode, fork, partial and full rectification and a release, in batches
    that mix sequences and modes, with fresh random inputs each step.

    adapter: make(x64, dtype) -> input object; empty(shape, dtype) -> an
    output object filled with NaN; to64(obj) -> float64 numpy array."""

    # The shape and parameters the scenario runs with (sizes deliberately not
    # multiples of the block size).
    PARAMS = dict(num_layers=2, num_q_heads=6, num_kv_heads=2, head_dim=20, block_size=4,
                  select_fraction=0.25, select_min_blocks=3, local_blocks=2, sink_blocks=1,
                  rectify_interval=4, record_selection=1, max_tokens=2048, max_sequences=8,
                  num_threads=2, summary_format="kv_dtype")  # the model scores exact summaries

    def __init__(self, ctx, adapter, dtype, rng, atol, name):
        self.ctx, self.adapter, self.dtype, self.rng, self.atol, self.name = (
            ctx, adapter, dtype, rng, atol, name)
        L, hq, hkv, d = (ctx.get(p) for p in (resa.Param.NUM_LAYERS, resa.Param.NUM_Q_HEADS,
                                               resa.Param.NUM_KV_HEADS, resa.Param.HEAD_DIM))
        self.ref = Reference(L, hq, hkv, d, ctx.get("block_size"), ctx.get("select_fraction"),
                             ctx.get("select_min_blocks"), ctx.get("local_blocks"),
                             ctx.get("sink_blocks"), ctx.get("softmax_scale"),
                             ctx.get("score_width"), ctx.get("group_score"),
                             dtype if ctx.get("kv_dtype") == resa.DType.FP8_E4M3 else None)
        self.worst = 0.0

    def _input(self, shape):
        obj = self.adapter.make(self.rng.standard_normal(shape), self.dtype)
        return obj, self.adapter.to64(obj)  # the model sees the rounded values

    def step(self, entries):
        ctx, ref, ad = self.ctx, self.ref, self.adapter
        T = sum(n for _, _, n in entries)
        all_kv = all(m == APPEND_KV for _, m, _ in entries)
        seqs = [s for s, _, _ in entries]
        q64, k64, v64, outs = [], [], [], []
        with ctx.step(seqs, [m for _, m, _ in entries], [n for _, _, n in entries]) as st:
            assert st.rows == T
            for layer in range(ref.layers):
                q, qd = self._input((T, ref.hq, ref.d)) if not all_kv else (None, None)
                k, kd = self._input((T, ref.hkv, ref.d))
                v, vd = self._input((T, ref.hkv, ref.d))
                out = None if all_kv else ad.empty((T, ref.hq, ref.d), self.dtype)
                got = st.attend(layer, q, k, v, out)
                assert got is out
                q64.append(qd), k64.append(kd), v64.append(vd), outs.append(out)
        expected = ref.step(entries, q64, k64, v64, ctx.selected_blocks)
        if all_kv:
            return
        for layer in range(ref.layers):
            got = ad.to64(outs[layer])
            want = expected[layer]
            untouched = np.isnan(want)  # APPEND_KV rows: the library must leave them alone
            assert np.isnan(got[untouched]).all(), "%s: an APPEND_KV row of out was written" % (
                self.name)
            assert not np.isnan(got[~untouched]).any(), "%s: out rows left unwritten" % self.name
            err = np.abs(got[~untouched] - want[~untouched]).max()
            self.worst = max(self.worst, err)
            assert err <= self.atol, "%s: layer %d, %s: max |error| %.3g > %.3g" % (
                self.name, layer, [(s, m.name, n) for s, m, n in entries], err, self.atol)
        self.check_bookkeeping()

    def check_bookkeeping(self):
        interval = self.ctx.get("rectify_interval")
        for seq, s in self.ref.seqs.items():
            assert self.ctx.seq_length(seq) == s.length, (seq, self.ctx.seq_length(seq), s.length)
            assert self.ctx.seq_pending(seq) == s.pending, (seq, self.ctx.seq_pending(seq),
                                                            s.pending)
            assert self.ctx.seq_rectify_due(seq) == (interval > 0 and s.pending >= interval)

    def run(self):
        ctx, ref = self.ctx, self.ref
        a, b = ctx.seq_create(), ctx.seq_create()
        ref.create(a), ref.create(b)
        self.step([(a, APPEND, 37), (b, APPEND, 13)])           # prefill, two prompts
        self.step([(b, APPEND_KV, 6)])                          # K/V only: q and out None
        self.step([(a, APPEND_KV, 3), (b, APPEND, 2)])          # a's rows of out untouched
        for _ in range(5):                                      # sparse decode, batched
            self.step([(a, DECODE, 1), (b, DECODE, 1)])
        assert ctx.seq_pending(a) > 0, "no decode was sparse: the test lost its point"
        c = ctx.seq_fork(a)
        ref.fork(a, c)
        self.step([(a, RECTIFY, 2), (c, DECODE, 1), (b, DECODE, 1)])  # oldest 2 of a's span
        self.step([(c, DECODE, 1), (a, RECTIFY, ctx.seq_pending(a)),
                   (b, RECTIFY, ctx.seq_pending(b))])
        self.step([(c, RECTIFY, ctx.seq_pending(c))])
        for _ in range(3):
            self.step([(a, DECODE, 1), (c, DECODE, 1), (b, DECODE, 1)])
        free = ctx.free_tokens()
        ctx.seq_release(b)
        ref.release(b)
        assert ctx.free_tokens() > free
        d = ctx.seq_create()                                    # reuses b's slot
        ref.create(d)
        self.step([(c, APPEND, 9), (d, APPEND, 5), (a, DECODE, 1)])  # a chunk after decoding
        self.step([(d, DECODE, 1), (a, DECODE, 1)])             # d: M = 2 blocks, dense
        assert 0 < ref.sparse_decodes < ref.decodes
        return self.worst
