#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Would QK^T on fp8 MMAs keep the fp8 rectification's accuracy?  A design
check for the next step of docs/performance.md (kernel v17's ablations: the
e4m3 -> f16 conversion of K and V is ~4 of the 13.8 ms at 8 x 256K).

wgmma takes fp8 operands only K-major, which the cache's K tiles are (d
contiguous), so S = q K^T could read K's e4m3 bytes as they land, unconverted,
if q were fp8 too.  One e4m3 q keeps 4 significant bits; two, q = s_hi q_hi +
s_lo q_lo with q_lo the e4m3 rounding of the remainder under its own scale,
keep about 8 (bf16 has 8), at two fp8 MMAs, the cost of one 16-bit MMA.

This compares, on one head of n keys (random K and V, each token's V scaled by
e^u, u uniform in [-spread, spread], both quantized with the cache's codec:
per-token scale amax / 448, e4m3), the output row's relative L2 error against
float64 attention over the dequantized cache with the bf16 q that every path
sees, of:
  f16    kernel v17: q exact in f16 (under a power of two), raw e4m3 K, S in
         fp32 times K's scales (the rest of the row exact here, so that only
         the QK^T operand differs between paths)
  split  q as two e4m3 parts (scales amax / 448 of q, then of the remainder),
         two products summed in fp32
  split3 three e4m3 parts (the remainder of split split again): three fp8
         MMAs, 1.5 16-bit MMAs' cost
  hi     q as one e4m3 part (what a single fp8 MMA would give)
  acc14  split, with each fp8 product's dot rounded to 14 significant bits
         (Hopper's fp8 MMA accumulates with fewer bits than fp32; 14 is the
         figure DeepSeek-V3's report gives; pessimistic for one k-step chain)
  sh2, sh3  what branch f8-qk-e4m3 (KF8) runs: two (bf16 q) or three (f16 q) e4m3
         parts under ONE power of two a row, 2^E with the row's largest |q|
         in [2^7, 2^8), so that every part accumulates into the same S (one
         accumulator, no per-part scale); each 32-wide k-step's sum (one
         wgmma m64nNk32) rounded to 14 significant bits before the fp32
         accumulator takes it (sh2-exact: without that rounding)
Prints mean and max over trials, per logit scale (q_mag: larger = peakier
softmax).  numpy only; ~5-10 s.

  python3 bench/quality/fp8_qsplit_numerics.py [--trials 8] [--n 4096]
"""
import argparse

import numpy as np

# the bf16 rounding and the e4m3 value grid of the sparse-decode check, its sibling
from fp8_sparse_numerics import GRID, bf16  # (this script's folder is on sys.path)


def to_e4m3(x):
    """round to nearest e4m3 value (ties to the lower grid index; rare)"""
    idx = np.clip(np.searchsorted(GRID, x), 1, len(GRID) - 1)
    lo, hi = GRID[idx - 1], GRID[idx]
    return np.where(np.abs(x - lo) <= np.abs(hi - x), lo, hi)


def quantize_rows(x):
    scale = (np.abs(x).max(-1, keepdims=True) / 448).astype(np.float32).astype(np.float64)
    scale = np.where(scale > 0, scale, 1.0)
    return to_e4m3(x / scale), scale


def f32(x):
    return np.asarray(x, np.float32).astype(np.float64)


def round_bits(x, bits):
    m, e = np.frexp(x)
    return np.ldexp(np.round(m * 2.0**bits) / 2.0**bits, e)


def attend(s, v):
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v


def trial(rng, n, d, spread, q_mag):
    k = rng.standard_normal((n, d))
    v = rng.standard_normal((n, d)) * np.exp(rng.uniform(-spread, spread, (n, 1)))
    q = bf16(rng.standard_normal(d) * q_mag)
    kr, ks = quantize_rows(k)
    vr, vs = quantize_rows(v)
    kd, vd = kr * ks, vr * vs
    scale = 1 / np.sqrt(d)
    ref = attend(scale * (kd @ q), vd)
    out = {}
    # f16: q exact (bf16 -> f16 under a power of two is exact), products of
    # exact values accumulated in fp32
    s_f16 = f32(kr @ q) * ks[:, 0]
    out["f16"] = attend(scale * s_f16, vd)
    # split into two e4m3 parts, each under its own per-row scale
    qh, sh = quantize_rows(q[None, :])
    rem = q - qh[0] * sh[0, 0]
    ql, sl = quantize_rows(rem[None, :])
    dot_h, dot_l = kr @ qh[0], kr @ ql[0]
    s_split = (f32(dot_h) * sh[0, 0] + f32(dot_l) * sl[0, 0]) * ks[:, 0]
    out["split"] = attend(scale * s_split, vd)
    # three parts: the remainder of the two split once more
    rem2 = rem - ql[0] * sl[0, 0]
    q3, s3 = quantize_rows(rem2[None, :])
    s_split3 = s_split + f32(kr @ q3[0]) * s3[0, 0] * ks[:, 0]
    out["split3"] = attend(scale * s_split3, vd)
    out["hi"] = attend(scale * f32(dot_h) * sh[0, 0] * ks[:, 0], vd)
    s_acc = (round_bits(dot_h, 14) * sh[0, 0] + round_bits(dot_l, 14) * sl[0, 0]) * ks[:, 0]
    out["acc14"] = attend(scale * s_acc, vd)
    # KF8: parts under one shared power of two, one accumulator
    e = np.floor(np.log2(np.abs(q).max())) - 7
    parts, r = [], q * 2.0**-e
    for _ in range(3):
        parts.append(to_e4m3(r))
        r = r - parts[-1]

    def shared(n_parts, bits):
        acc = np.zeros(n)
        for pt in parts[:n_parts]:
            for c in range(0, d, 32):  # one wgmma k-step
                step = kr[:, c:c + 32] @ pt[c:c + 32]
                acc = f32(acc + (round_bits(step, bits) if bits else step))
        return attend(scale * f32(acc * 2.0**e) * ks[:, 0], vd)

    out["sh2-exact"] = shared(2, 0)
    out["sh2"] = shared(2, 14)
    out["sh3"] = shared(3, 14)
    nr = np.linalg.norm(ref)
    return {key: np.linalg.norm(o - ref) / nr for key, o in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    paths = ["f16", "split", "split3", "hi", "acc14", "sh2-exact", "sh2", "sh3"]
    print(f"# relative L2 error of one output row vs float64 on the dequantized cache; "
          f"n {a.n}, d {a.d}, {a.trials} trials; mean / max")
    print("| q_mag | V spread | " + " | ".join(paths) + " |")
    print("|---|---|" + "---|" * len(paths))
    for q_mag in (1.0, 3.0, 8.0):
        for spread in (0.0, 2.0):
            errs = {p: [] for p in paths}
            for _ in range(a.trials):
                for p, e in trial(rng, a.n, a.d, spread, q_mag).items():
                    errs[p].append(e)
            cells = [f"{np.mean(errs[p]):.1e} / {np.max(errs[p]):.1e}" for p in paths]
            print(f"| {q_mag:g} | {spread:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
