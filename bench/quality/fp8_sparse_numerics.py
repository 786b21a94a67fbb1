#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The fp8 cache's sparse decode arithmetic (cuda/attention_sparse.cu,
attend_unit_f8) against float64, next to the path it replaced (values rounded
to bf16, P rounded to bf16), on one head: n keys of a random K and V, each
token's V scaled by e^u with u uniform in [-spread, spread], quantized with the
cache's codec (per-token scale amax / 448, e4m3).  The new path: q in f16
under 2^-e, raw e4m3 operands, k_scale on S in fp32, P v_scale / c rounded to
f16 with c the largest scale so far ("running", what the kernel does), or per
unit of 16 keys: its largest scale ("unit"), or 2^-15 times it ("unit15", so
that P v_scale / c < 2^15; branch fp8-sparse-unit-c), or per tile of 128 keys:
2^(exponent of its largest scale - 14), a power of two ("tile128", the
Hopper rectification kernel of branch fp8-rect-f16, which also runs f16 MMAs
on the raw values with the scales in fp32).  "running" loses a key
once P v_scale / c falls below f16's range (~2^-24), "unit" the keys of one
unit far below its largest.  The second table puts one early token with a V
2^k times the others' at a score k ln 2 below theirs (its P v comparable to
theirs): where the rules part.  The reference attends the dequantized values
with the bf16 q that both paths see.  Prints the relative L2 error of the
output row, mean and max over trials.  numpy only; about a minute.

  python3 bench/quality/fp8_sparse_numerics.py [--trials 6]
"""
import argparse

import numpy as np


def bf16(x):
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def e4m3_grid():
    normals = [s * (1 + m / 8) * 2.0**e for s in (1, -1) for e in range(-6, 9) for m in range(8)]
    subnormals = [s * k / 8 * 2.0**-6 for s in (1, -1) for k in range(8)]
    g = np.array(sorted(set(normals + subnormals)))
    return g[np.abs(g) <= 448]


GRID = e4m3_grid()


def quantize(x):
    scale = (np.abs(x).max(1, keepdims=True) / 448).astype(np.float32).astype(np.float64)
    raw = GRID[np.abs((x / scale)[..., None] - GRID).argmin(-1)]
    return raw, scale[:, 0]


def trial(rng, n, d, spread, q_mag, rule, outlier=0):
    k = rng.standard_normal((n, d))
    v = rng.standard_normal((n, d)) * np.exp(rng.uniform(-spread, spread, (n, 1)))
    q = bf16(rng.standard_normal(d) * q_mag)
    if outlier:
        # an early token whose V is 2^outlier times the others' and whose weight is
        # about 2^-outlier of theirs: its P v stays comparable to the rest
        v[0] *= 2.0**outlier
        k[0] = -q * (outlier * np.log(2) * np.sqrt(d) / (q @ q))
    kr, ks = quantize(k)
    vr, vs = quantize(v)
    kd, vd = kr * ks[:, None], vr * vs[:, None]
    sc = 1 / np.sqrt(d)
    s = kd @ q * sc
    p = np.exp(s - s.max())
    ref = p @ vd / p.sum()
    # the replaced path: K, V read back as bf16, P rounded to bf16
    so = bf16(kd) @ q * sc
    po = np.exp(so - so.max())
    old = bf16(po) @ bf16(vd) / po.sum()
    # attend_unit_f8
    e = int(np.floor(np.log2(np.abs(q).max()))) - 14
    qf = (q * 2.0**-e).astype(np.float16).astype(np.float64)
    sn = (kr @ qf).astype(np.float32).astype(np.float64) * (2.0**e * sc) * ks
    m, l, acc, kc, kmax = -np.inf, 0.0, np.zeros(d), 0.0, 0.0
    w = 128 if rule == "tile128" else 16
    for u in range(0, n, w):
        su = sn[u:u + w]
        mn = max(m, su.max())
        corr = np.exp(m - mn) if m > -np.inf else 0.0
        pu = np.exp(su - mn)
        l = l * corr + pu.sum()
        cu = vs[u:u + w].max()
        kmax = max(kmax, cu)
        if rule == "running":
            c = max(cu, 2.0**-126, kc)
        elif rule == "tile128":
            c = max(2.0**(np.floor(np.log2(cu)) - 14) if cu > 0 else 0.0, 2.0**-126, kmax * 2.0**-64)
        else:
            c = max(cu * (2.0**-15 if rule == "unit15" else 1.0), 2.0**-126, kmax * 2.0**-64)
        rescale, kc = (kc / c if c > 0 else 0.0), c
        pp = (pu * (vs[u:u + w] / c)).astype(np.float16).astype(np.float64)
        acc = acc * corr * rescale + pp @ vr[u:u + w]
        m = mn
    new = acc * kc / l

    def err(o):
        return np.linalg.norm(o - ref) / np.linalg.norm(ref)
    return err(old), err(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--keys", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    print("| V scale spread | max |q| ~ | rule | old path: mean / max | new path: mean / max |")
    print("|---|---|---|---|---|")
    for spread in (0, 6, 12):
        for q_mag in (1, 30):
            for rule in ("running", "unit", "unit15", "tile128"):
                rng = np.random.default_rng(a.seed)
                r = np.array([trial(rng, a.keys, 128, spread, q_mag, rule) for _ in range(a.trials)])
                print(f"| e^+-{spread} | {q_mag} | {rule} | {r[:, 0].mean():.2e} / {r[:, 0].max():.2e} "
                      f"| {r[:, 1].mean():.2e} / {r[:, 1].max():.2e} |")
    print()
    print("| first token's V x | rule | old path: mean / max | new path: mean / max |")
    print("|---|---|---|---|")
    for outlier in (8, 16, 24, 32, 40):
        for rule in ("running", "unit", "unit15", "tile128"):
            rng = np.random.default_rng(a.seed)
            r = np.array([trial(rng, a.keys, 128, 0, 1, rule, outlier) for _ in range(a.trials)])
            print(f"| 2^{outlier} | {rule} | {r[:, 0].mean():.2e} / {r[:, 0].max():.2e} "
                  f"| {r[:, 1].mean():.2e} / {r[:, 1].max():.2e} |")


if __name__ == "__main__":
    main()
