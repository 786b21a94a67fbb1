#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Joins resa-bench CSV files and peer_bench.py's CSV (same card, same run)
into the ratios that docs/performance.md reports:

  resa/best   ReSA step (sparse + rectify/f) against the fastest dense decode
              of all (ours with r = 1, each SDPA backend)
  dense/peer  our dense decode against the fastest peer decode (SDPA backends, FlashInfer)
  rect/sdpa   our rectification against the fastest SDPA rectification
              (explicit mask or bottom-right causal bias; the unmasked
              variant is shown separately as an optimistic bound)

usage: compare.py peers.csv resa-bench-*.csv
"""
import csv
import sys


def num(field):
    """A resa-bench CSV value; an empty field (not measured) is NaN."""
    return float(field) if field not in ("", None) else float("nan")


def main():
    peers, ours = {}, []
    with open(sys.argv[1]) as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            key = (int(row["context"]), int(row["batch"]), row["op"])
            peers.setdefault(key, []).append((float(row["ms"]), row["peer"]))
    for path in sys.argv[2:]:
        with open(path) as f:
            ours += list(csv.DictReader(line for line in f if not line.startswith("#")))

    def best(L, B, *ops):
        c = [p for op in ops for p in peers.get((L, B, op), [])]
        return min(c) if c else (float("nan"), "-")

    print(f"{'context':>8} {'batch':>5} {'summary':>7} {'resa_ms':>9} {'best_dense_ms':>14} {'resa/best':>9} "
          f"{'dense/peer':>10} {'rect/sdpa':>9} {'rect/nomask':>11} {'sparse_%bw':>10}")
    for r in ours:
        L, B = int(r["context"]), int(r["batch"])
        dense, resa, rect = num(r["dense_ms"]), num(r["resa_ms"]), num(r["rectify_ms"])
        sd, sd_name = best(L, B, "decode")
        sr, _ = best(L, B, "rectify", "rectify-lr")
        sn, _ = best(L, B, "rectify-nomask")
        best_dense = min(dense, sd)
        print(f"{L:>8} {B:>5} {r.get('summary', 'kv'):>7} {resa:>9.4f} {best_dense:>9.4f} ({'ours' if dense <= sd else sd_name}) "
              f"{best_dense / resa:>8.2f}x {dense / sd:>9.2f}x {rect / sr:>8.2f}x {rect / sn:>10.2f}x "
              f"{num(r['sparse_pct_copy_bw']):>9.1f}%")
    print("(x > 1 in dense/peer and rect/sdpa means ours is slower; resa/best is the speedup)")


if __name__ == "__main__":
    main()
