#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Where a decode step's time goes, kernel by kernel and gap by gap, from a
kernel_timeline.so CSV (bench/profile/kernel_timeline.c).

    bench/profile/timeline_account.py t.csv [--skip N] [--first NAME,...]

A chain is one layer's step as the GPU ran it: it starts at a kernel named in
--first (default write_decode,write_rows: the K/V write that opens every
layer of a step) and runs up to the next such kernel.  Chains without
attend_split (the cache fills of resa-bench's set-up) are left out, and the
first --skip of the rest (default 3: resa-bench's warm-up replays).  Chains
are grouped by their kernel sequence and grids; for each group the medians
(and 10th / 90th percentiles) over its chains of:
  - each kernel's duration (GPU start to end);
  - the gap before it: its start minus the previous kernel's end (negative
    where a programmatic dependent launch let it start early);
  - the span, first start to last end, against the sum of the durations;
  - the gap between chains (one chain's last end to the next one's start),
    which in resa-bench is the graph launch of the next replay.
Python standard library only (tests/check_timeline_account.py checks it).
"""
import argparse
import collections
import csv
import re
import statistics


def base_name(name):
    """The kernel's own name: the last component of an Itanium-mangled
    (possibly nested, possibly anonymous-namespace) name, or of a demangled one."""
    m = re.match(r"_Z(N[rVK]*)?", name)
    if not m:
        plain = name.replace("void ", "").replace("<unnamed>::", "")
        plain = re.sub(r"[<(].*$", "", plain.replace("(anonymous namespace)::", ""))
        return plain.split("::")[-1] or name
    i, last = m.end(), name
    while i < len(name) and name[i].isdigit():
        j = i
        while j < len(name) and name[j].isdigit():
            j += 1
        n = int(name[i:j])
        last, i = name[j:j + n], j + n
        if not m.group(1):  # not nested: one component
            break
    return last


def load(path):
    kernels = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            kernels.append({
                "name": base_name(r["name"]),
                "start": int(r["start_ns"]),
                "end": int(r["end_ns"]),
                "grid": (int(r["grid_x"]), int(r["grid_y"]), int(r["grid_z"])),
                "block": int(r["block_x"]) * int(r["block_y"]) * int(r["block_z"]),
            })
    kernels.sort(key=lambda k: k["start"])
    return kernels


def chains_of(kernels, first):
    chains, cur = [], None
    for k in kernels:
        if k["name"] in first:
            cur = [k]
            chains.append(cur)
        elif cur is not None:
            cur.append(k)
    return [c for c in chains if any(k["name"] == "attend_split" for k in c)]


def stats(xs):
    """median, 10th and 90th percentile of ns values, in us."""
    xs = sorted(x / 1e3 for x in xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[0], q[-1]


def account(chains, skip):
    kept = chains[skip:]
    groups = collections.OrderedDict()
    for i, c in enumerate(kept):
        sig = tuple((k["name"], k["grid"], k["block"]) for k in c)
        groups.setdefault(sig, []).append(i)
    for sig, idx in groups.items():
        names = " > ".join(s[0] for s in sig)
        print(f"== {len(idx)} chains of {names} (of {len(chains)}; first {skip} skipped)")
        print(f"{'kernel':16s} {'grid':>16s} {'threads':>7s} {'us':>8s} {'p10':>8s} {'p90':>8s}"
              f" {'gap before':>10s}")
        sums = []
        for pos, (name, grid, block) in enumerate(sig):
            dur = stats([kept[i][pos]["end"] - kept[i][pos]["start"] for i in idx])
            gap = ""
            if pos > 0:
                g = stats([kept[i][pos]["start"] - kept[i][pos - 1]["end"] for i in idx])
                gap = f"{g[0]:10.2f}"
            grid_s = "x".join(str(x) for x in grid)
            print(f"{name:16s} {grid_s:>16s} {block:7d} {dur[0]:8.2f} {dur[1]:8.2f} {dur[2]:8.2f} {gap}")
        for i in idx:
            sums.append(sum(k["end"] - k["start"] for k in kept[i]))
        span = stats([kept[i][-1]["end"] - kept[i][0]["start"] for i in idx])
        print(f"span, first start to last end: median {span[0]:.2f} us (p10 {span[1]:.2f}, "
              f"p90 {span[2]:.2f}); sum of kernel times: median {stats(sums)[0]:.2f} us")
        between = [kept[i + 1][0]["start"] - kept[i][-1]["end"] for i in idx if i + 1 < len(kept)]
        if between:
            b = stats(between)
            print(f"between chains, last end to next first start: median {b[0]:.2f} us "
                  f"(p10 {b[1]:.2f}, p90 {b[2]:.2f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--first", default="write_decode,write_rows")
    a = ap.parse_args()
    chains = chains_of(load(a.csv), set(a.first.split(",")))
    if len(chains) <= a.skip:
        raise SystemExit(f"{a.csv}: {len(chains)} chains with attend_split, none left after "
                         f"skipping {a.skip}")
    account(chains, a.skip)


if __name__ == "__main__":
    main()
