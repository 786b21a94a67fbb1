#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Where a kernel's warps spend their time, from ncu's source page (SASS) as
CSV (scripts/device-run.sh profile with RESA_PROFILE_SOURCE=1 writes it:
ncu-rectify-src-*-sass.csv): per region of the code, the warp instructions
executed, the PC samples and their stall reasons, and the most sampled
instructions.  Regions end at each USETMAXREG / SETMAXNREG instruction, which
in a warp-specialized kernel (cuda/attention_dense_sm90.cu) opens the
consumers' and the producer's code, so the producer's conversion and the
consumers' waits on it are told apart.

  python3 bench/profile/ncu_source_account.py SASS.csv [--top 12]
"""
import argparse
import collections
import csv


def load(path):
    rows = list(csv.reader(open(path, newline="")))
    # row 0 names the kernel; row 1 is the header
    kernel, hdr = rows[0][1] if len(rows[0]) > 1 else "?", rows[1]
    idx = {h: i for i, h in enumerate(hdr)}
    stall_cols = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for r in rows[2:]:
        try:
            samples = int(r[idx["Warp Stall Sampling (All Samples)"]] or 0)
            executed = int(r[idx["Instructions Executed"]] or 0)
        except (ValueError, IndexError):
            continue
        stalls = {c[6:]: int(r[idx[c]] or 0) for c in stall_cols if r[idx[c]].isdigit()}
        out.append((r[idx["Source"]].strip(), samples, executed, stalls))
    return kernel, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    kernel, ins = load(a.csv)
    print(f"kernel: {kernel}")
    region, bounds = 0, [0]
    regions = collections.defaultdict(lambda: [0, 0, collections.Counter(), []])
    for i, (src, samples, executed, stalls) in enumerate(ins):
        if "SETMAXNREG" in src or "SETMAXREG" in src:
            region += 1
            bounds.append(i)
        g = regions[region]
        g[0] += executed
        g[1] += samples
        g[2].update(stalls)
        g[3].append((samples, i, src, stalls))
    tot_x = sum(g[0] for g in regions.values()) or 1
    tot_s = sum(g[1] for g in regions.values()) or 1
    print(f"{len(ins)} instructions, {tot_x} warp instructions executed, {tot_s} samples; "
          f"regions start at instruction {bounds}")
    for r, (x, s, st, lst) in sorted(regions.items()):
        if s == 0 and x == 0:
            continue
        ss = sum(st.values()) or 1
        reasons = ", ".join(f"{k} {100 * v / ss:.0f}%" for k, v in st.most_common(7) if v > 0)
        print(f"\nregion {r}: executed {x} ({100 * x / tot_x:.1f}%), samples {s} ({100 * s / tot_s:.1f}%): {reasons}")
        for samples, i, src, stalls in sorted(lst, reverse=True)[: a.top]:
            if samples == 0:
                break
            why = max(stalls, key=stalls.get) if stalls else "-"
            print(f"  {i:5d} {samples:7d} ({why})  {src[:80]}")


if __name__ == "__main__":
    main()
