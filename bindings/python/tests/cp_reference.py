# SPDX-License-Identifier: MIT
"""Context parallelism through the resa package, next to one context and a
float64 model: tests/check_cp.c's protocol in a smaller form.  Shared by
test_cp.py (numpy) and test_torch_cpu.py (torch); not a test itself.

One sequence, its prefill length not a multiple of the block size, is cut at
block boundaries over R contexts standing in for ranks; rank r holds
[bound[r], bound[r + 1]) and the last one (the owner) the tail.  Each step of
the whole sequence runs on one context holding all of it and on the ranks
(docs/integration.md, "Multi-GPU"): the owner APPENDs, DECODEs or RECTIFYs,
every other rank answers the same rows' queries (QUERY_DENSE, or QUERY_SPARSE
for a decode); per layer of a decode every rank lists its candidates
(block_scores), the lists are stacked as an all-gather leaves them and every
rank computes the thresholds; each rank attends with lse and the thresholds,
and the parts are merged (Context.merge_states, checked against
resa.merge_states).  Checked after every step:

- every rank computes the same thresholds, which are the K-th best (score,
  block) of the stacked lists in the documented order (score descending, then
  the lower block index), and every listed candidate lies in its rank's span
  and is no forced block;
- the ranks' selections (Context.selected_blocks, global indices) joined are
  exactly the single context's, which has the budget's size and holds the
  forced blocks;
- the single and the merged outputs and log-sum-exps equal float64 attention
  over the single context's blocks (dense causal for APPEND and RECTIFY) within
  the float32 rounding bound of check_cp.c: scores are float32 dot products
  of d terms, exp and sums over n_keys terms in float32, the outputs rounded
  to the IO dtype (the merged ones twice);
- lengths, pending counts and the due signal: the single context's follow
  the documented rule, the owner reports them, the other ranks hold their
  spans and nothing pending.

Outputs, log-sum-exps, lists and thresholds are poisoned before each call
(NaN, or -12345 for integers); inputs are fresh random values per layer and
step, layers run in a shuffled order.
"""
import math

import numpy as np

import resa
from resa_reference import after_step, budget

APPEND, DECODE, RECTIFY = resa.Mode.APPEND, resa.Mode.DECODE, resa.Mode.RECTIFY
QUERY_DENSE, QUERY_SPARSE = resa.Mode.QUERY_DENSE, resa.Mode.QUERY_SPARSE
U32 = 2.0 ** -24
UNIT = {resa.DType.F32: 2.0 ** -24, resa.DType.F16: 2.0 ** -11, resa.DType.BF16: 2.0 ** -8}
POISON_INT = -12345


def lse64(s):
    """float64 log-sum-exp of a score vector (-inf when empty)."""
    if s.size == 0:
        return -math.inf
    m = s.max()
    return m + math.log(np.exp(s - m).sum())


def attention64(q, keys, values, scale):
    """(out, lse) of one query row over the given keys, float64."""
    s = keys @ q * scale
    m = s.max()
    w = np.exp(s - m)
    return (w / w.sum()) @ values, m + math.log(w.sum())


def row_bounds(q, keys, values, scale, R, io):
    """check_cp.c's rounding bounds (output, lse) of one row over its keys."""
    smag = (np.abs(keys * q).sum(axis=1) * scale).max()
    vmax = np.abs(values).max()
    n_keys = keys.shape[0]
    tol = ((2.0 * (q.size + 2) * U32 * smag + 4.0 * (n_keys + 2 * R + 8) * U32) * vmax
           + 3.0 * UNIT[io] * vmax)
    return tol, smag, n_keys


def kth_pair(scores, blocks, counts, K):
    """The K-th best (score, block) of the stacked lists of one (entry,
    head), in the documented order; (+inf, -1) for K = 0, the worst pair
    when fewer than K are listed."""
    pairs = []
    for r in range(scores.shape[0]):
        for j in range(int(counts[r])):
            pairs.append((float(scores[r, j]), int(blocks[r, j])))
    if K == 0 or not pairs:
        return math.inf, -1
    pairs.sort(key=lambda p: (-p[0], p[1]))
    return pairs[min(K, len(pairs)) - 1]


class CPWorld:
    """One sequence over R rank contexts and one whole context, with the
    float64 model of the whole sequence.

    adapter: make(x64, dtype) -> an input buffer of the IO dtype; full(shape,
    dtype, value) -> a buffer of a DType, "float32" or "int32" filled with
    value; stack(buffers) -> them stacked on a new first axis; to64(buf) -> a
    float64 numpy array; ints(buf) -> an int64 numpy array."""

    def __init__(self, adapter, R, io, rng, name, d=24, decodes=18, ties=False):
        self.ad, self.R, self.io, self.rng, self.name = adapter, R, io, rng, name
        b = 4 << int(rng.integers(0, 2))  # 4 or 8
        self.params = dict(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=d,
                           io_dtype=io, block_size=b, select_fraction=0.25,
                           select_min_blocks=3, local_blocks=1 + int(rng.integers(0, 2)),
                           sink_blocks=int(rng.integers(0, 2)), rectify_interval=5,
                           record_selection=1, max_tokens=1024, max_sequences=2, num_threads=1)
        self.L, self.hq, self.hkv, self.d, self.b = 2, 4, 2, d, b
        self.decodes = decodes
        # ties: the key of position x is the table's x mod 3 b, so blocks 3 apart
        # have equal summaries and scores, on any rank
        self.ktable = rng.standard_normal((self.L, 3 * b, self.hkv, d)) if ties else None
        # prefill: about 6 blocks a rank, never a whole number of blocks
        P = b * (6 * R + int(rng.integers(0, 4))) + int(rng.integers(1, b))
        cuts = sorted(rng.choice(np.arange(1, P // b), size=R - 1, replace=False).tolist())
        self.bound = [0] + [b * c for c in cuts] + [P]  # bound[R] grows with the owner
        self.one = resa.Context("cpu", **self.params)
        self.one_seq = self.one.seq_create()
        self.ranks, self.seqs = [], []
        for r in range(R):
            ctx = resa.Context("cpu", **self.params)
            self.ranks.append(ctx)
            self.seqs.append(ctx.seq_create())
            ctx.seq_set_span(self.seqs[r], self.bound[r], -1)
        self.scale = self.one.get("softmax_scale")
        self.k64 = [np.zeros((0, self.hkv, d)) for _ in range(self.L)]
        self.v64 = [np.zeros((0, self.hkv, d)) for _ in range(self.L)]
        self.length = self.pending = 0
        self.owner = 0
        self.steps = self.sparse_steps = self.rect_steps = self.rows_checked = 0
        self.worst = 0.0  # the largest error over its bound

    def close(self):
        self.one.close()
        for ctx in self.ranks:
            ctx.close()

    def _input(self, shape, scale=1.0):
        buf = self.ad.make(self.rng.standard_normal(shape) * scale, self.io)
        return buf, self.ad.to64(buf)

    def _write(self, layer, start, k64, v64):
        end = start + k64.shape[0]
        for store, rows in ((self.k64, k64), (self.v64, v64)):
            if end > store[layer].shape[0]:
                grown = np.zeros((end, self.hkv, self.d))
                grown[:store[layer].shape[0]] = store[layer]
                store[layer] = grown
            store[layer][start:end] = rows

    def step(self, mode, n):
        ad, R, o, b = self.ad, self.R, self.owner, self.b
        G, pend = self.length, self.pending
        start = G - pend if mode == RECTIFY else G
        sparse = mode == DECODE
        M = nsel = K = 0
        forced = set()
        if sparse:
            M = -(-(G + 1) // b)
            nsel, forced = budget(M, self.one.get("select_fraction"),
                                  self.one.get("select_min_blocks"),
                                  self.one.get("local_blocks"), self.one.get("sink_blocks"))
            K = nsel - len(forced) if nsel < M else 0
        for r in range(R):  # the owner holds the tail; the others answer queries at G
            self.ranks[r].seq_set_span(self.seqs[r], self.bound[r], G if r < o else -1)
        query = QUERY_SPARSE if sparse else QUERY_DENSE
        one = self.one.step([self.one_seq], mode, n)
        steps = [self.ranks[r].step([self.seqs[r]], mode if r == o else query, n)
                 for r in range(R)]
        layers = []
        for layer in self.rng.permutation(self.L).tolist():
            q, q64 = self._input((n, self.hq, self.d), 1.5)
            if self.ktable is None:
                k, k64 = self._input((n, self.hkv, self.d))
            else:
                period = self.ktable.shape[1]
                at = (start + np.arange(n)) % period
                k = ad.make(self.ktable[layer][at], self.io)
                k64 = ad.to64(k)
            v, v64 = self._input((n, self.hkv, self.d))
            self._write(layer, start, k64, v64)
            out1 = ad.full((n, self.hq, self.d), self.io, math.nan)
            lse1 = ad.full((n, self.hq), "float32", math.nan)
            got = one.attend(layer, q, k, v, out1, lse=lse1)
            assert got[0] is out1 and got[1] is lse1
            thr = [None] * R
            if sparse:
                cap = K + int(self.rng.integers(0, 3))  # K itself, or a little more
                lists = []
                for r in range(R):
                    bufs = (ad.full((1, self.hkv, cap), "float32", math.nan),
                            ad.full((1, self.hkv, cap), "int32", POISON_INT),
                            ad.full((1, self.hkv), "int32", POISON_INT))
                    got = steps[r].block_scores(layer, q, cap, scores=bufs[0], blocks=bufs[1],
                                                counts=bufs[2])
                    assert all(x is y for x, y in zip(got, bufs))
                    self._check_lists(r, bufs, K, forced, G)
                    lists.append(bufs)
                gathered = [ad.stack([x[i] for x in lists]) for i in range(3)]
                for r in range(R):
                    ts = ad.full((1, self.hkv), "float32", math.nan)
                    tb = ad.full((1, self.hkv), "int32", POISON_INT)
                    got = steps[r].thresholds(*gathered, threshold_scores=ts, threshold_blocks=tb)
                    assert got[0] is ts and got[1] is tb
                    thr[r] = (ts, tb)
                    assert np.array_equal(ad.to64(ts), ad.to64(thr[0][0])) and np.array_equal(
                        ad.ints(tb), ad.ints(thr[0][1])), \
                        "%s: rank %d computed other thresholds than rank 0" % (self.name, r)
                self._check_thresholds(gathered, thr[0], K)
            outs, lses = [], []
            for r in range(R):
                out_r = ad.full((n, self.hq, self.d), self.io, math.nan)
                lse_r = ad.full((n, self.hq), "float32", math.nan)
                # ranks that only answer queries take no k and v
                got = steps[r].attend(layer, q, k if r == o else None, v if r == o else None,
                                      out_r, lse=lse_r, thresholds=thr[r])
                assert got[0] is out_r and got[1] is lse_r
                outs.append(out_r)
                lses.append(lse_r)
            parts, parts_lse = ad.stack(outs), ad.stack(lses)
            outm = ad.full((n, self.hq, self.d), self.io, math.nan)
            lsem = ad.full((n, self.hq), "float32", math.nan)
            got = self.ranks[0].merge_states(parts, parts_lse, outm, lse_out=lsem)
            assert got[0] is outm and got[1] is lsem
            host_out, host_lse = resa.merge_states(
                ad.stack(outs), ad.stack(lses), lse_out=ad.full((n, self.hq), "float32", 0))
            assert np.array_equal(ad.to64(host_out), ad.to64(outm), equal_nan=True) and \
                np.array_equal(ad.to64(host_lse), ad.to64(lsem), equal_nan=True), \
                "%s: Context.merge_states and resa.merge_states differ" % self.name
            layers.append((layer, q64, out1, lse1, outm, lsem))
        one.end()
        for s in steps:
            s.end()
        self._commit(mode, n, sparse and nsel < M)
        self.steps += 1
        self.sparse_steps += sparse and nsel < M
        self.rect_steps += mode == RECTIFY
        if mode != RECTIFY:
            self.bound[R] = max(self.bound[R], self.length)
        self._check_lengths(G)
        for layer, q64, out1, lse1, outm, lsem in sorted(layers, key=lambda x: x[0]):
            sel = self._check_selection(layer, nsel, forced, M) if sparse else None
            self._check_rows(layer, start, n, q64, sel, out1, lse1, outm, lsem, mode)

    def _check_lists(self, r, bufs, K, forced, G):
        sc, bl, cn = self.ad.to64(bufs[0]), self.ad.ints(bufs[1]), self.ad.ints(bufs[2])
        lo = self.bound[r] // self.b
        end = G + 1 if r == self.R - 1 else self.bound[r + 1]
        for h in range(self.hkv):
            c = int(cn[0, h])
            assert 0 <= c <= K, "%s: rank %d listed %d candidates, K = %d" % (self.name, r, c, K)
            for j in range(c):
                blk = int(bl[0, h, j])
                assert lo <= blk and blk * self.b < end and blk not in forced, (
                    "%s: rank %d listed block %d (its span [%d, %d), forced %s)"
                    % (self.name, r, blk, self.bound[r], end, sorted(forced)))
                assert not math.isnan(sc[0, h, j]), "%s: a NaN score listed" % self.name

    def _check_thresholds(self, gathered, thr, K):
        sc, bl, cn = (self.ad.to64(gathered[0]), self.ad.ints(gathered[1]),
                      self.ad.ints(gathered[2]))
        ts, tb = self.ad.to64(thr[0]), self.ad.ints(thr[1])
        for h in range(self.hkv):
            want = kth_pair(sc[:, 0, h], bl[:, 0, h], cn[:, 0, h], K)
            assert (ts[0, h], tb[0, h]) == want, "%s: head %d: threshold (%r, %d), expected %r" % (
                self.name, h, ts[0, h], tb[0, h], want)

    def _commit(self, mode, n, sparse):
        """step_end's length and pending rule (docs/API.md, pending tokens)."""
        self.length, self.pending = after_step(mode, n, sparse, self.length, self.pending)

    def _check_lengths(self, G):
        one, s1, o = self.one, self.one_seq, self.owner
        assert (one.seq_length(s1), one.seq_pending(s1)) == (self.length, self.pending), (
            self.name, one.seq_length(s1), one.seq_pending(s1), self.length, self.pending)
        due = one.seq_rectify_due(s1)
        assert due == (self.pending >= self.one.get("rectify_interval"))
        for r, ctx in enumerate(self.ranks):
            want = (self.bound[r + 1] - self.bound[r] if r < o
                    else self.length - self.bound[r] if r == o else 0)
            got = (ctx.seq_length(self.seqs[r]), ctx.seq_pending(self.seqs[r]),
                   ctx.seq_rectify_due(self.seqs[r]))
            assert got == (want, self.pending if r == o else 0, due if r == o else False), (
                "%s: rank %d (owner %d): length, pending, due %s; expected %s"
                % (self.name, r, o, got, (want, self.pending if r == o else 0, due)))

    def _check_selection(self, layer, nsel, forced, M):
        sel = {}
        for h in range(self.hkv):
            one = self.one.selected_blocks(self.one_seq, layer, h)
            assert len(one) == nsel and forced <= set(one) and max(one) < M, (
                "%s: the single context chose %s (budget %d of M %d, forced %s)"
                % (self.name, one, nsel, M, sorted(forced)))
            joined = []
            for r, ctx in enumerate(self.ranks):
                mine = ctx.selected_blocks(self.seqs[r], layer, h)
                for blk in mine:
                    assert self.bound[r] <= blk * self.b < self.bound[r + 1], (
                        "%s: rank %d selected block %d outside its span" % (self.name, r, blk))
                joined += mine
            assert sorted(joined) == one, (
                "%s: step %d layer %d head %d (M %d, n %d, R %d): one context chose %s, the "
                "ranks together %s" % (self.name, self.steps, layer, h, M, nsel, self.R, one,
                                       sorted(joined)))
            sel[h] = one
        return sel

    def _check_rows(self, layer, start, n, q64, sel, out1, lse1, outm, lsem, mode):
        ad, b, g = self.ad, self.b, self.hq // self.hkv
        o1, om = ad.to64(out1), ad.to64(outm)
        l1, lm = ad.to64(lse1), ad.to64(lsem)
        for t in range(n):
            pos = start + t
            for hh in range(self.hq):
                h = hh // g
                keys = np.arange(pos + 1)
                if sel is not None:
                    keys = keys[np.isin(keys // b, sel[h])]
                kk, vv = self.k64[layer][keys, h], self.v64[layer][keys, h]
                want, want_lse = attention64(q64[t, hh], kk, vv, self.scale)
                tol, smag, n_keys = row_bounds(q64[t, hh], kk, vv, self.scale, self.R, self.io)
                tol_lse = (4.0 * (self.d + 2) * U32 * smag
                           + 4.0 * (n_keys + self.R + 4) * U32 * (1.0 + abs(want_lse)))
                e1 = np.abs(o1[t, hh] - want).max()
                em = np.abs(om[t, hh] - want).max()
                e1m = np.abs(o1[t, hh] - om[t, hh]).max()
                where = "%s: step %d (%s, R %d) layer %d row %d head %d" % (
                    self.name, self.steps, resa.Mode(mode).name, self.R, layer, t, hh)
                assert e1 <= tol and em <= tol and e1m <= 2 * tol, (
                    "%s: |one - ref| %.3g, |merged - ref| %.3g, |one - merged| %.3g, bound %.3g"
                    % (where, e1, em, e1m, tol))  # NaN fails every comparison
                el1, elm = abs(l1[t, hh] - want_lse), abs(lm[t, hh] - want_lse)
                assert el1 <= tol_lse and elm <= tol_lse, (
                    "%s: lse one %.9g merged %.9g, float64 %.9g, bound %.3g"
                    % (where, l1[t, hh], lm[t, hh], want_lse, tol_lse))
                self.worst = max(self.worst, e1 / tol, em / tol, el1 / tol_lse, elm / tol_lse)
                self.rows_checked += 1

    def run(self):
        """Prefill rank by rank in chunks that never cross a rank boundary,
        then decode, rectifying when due (sometimes only the oldest part)."""
        rng = self.rng
        for r in range(self.R):
            self.owner = r
            while self.length < self.bound[r + 1]:
                left = self.bound[r + 1] - self.length
                self.step(APPEND, min(int(rng.integers(1, 3 * self.b + 1)), left))
        interval = self.one.get("rectify_interval")
        for _ in range(self.decodes):
            if self.pending >= interval:
                n = (self.pending + 1) // 2 if rng.integers(0, 4) == 0 else self.pending
                self.step(RECTIFY, n)
            else:
                self.step(DECODE, 1)
        assert self.sparse_steps >= self.decodes // 2 and self.rect_steps >= 2, (
            "%s: the run did not exercise sparse decoding (%d) or rectification (%d)"
            % (self.name, self.sparse_steps, self.rect_steps))
        return ("%s: R %d, b %d, spans %s: %d steps, %d sparse, %d rectifications, %d rows "
                "checked, worst error %.2f of its bound"
                % (self.name, self.R, self.b, self.bound, self.steps, self.sparse_steps,
                   self.rect_steps, self.rows_checked, self.worst))
