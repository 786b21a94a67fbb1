#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Per-kernel account of one resa-e2e decode step from an ncu CSV.

    RESA_E2E_PROFILE_STEP=3 ncu --profile-from-start off --cache-control none \\
        --clock-control none --csv --print-units base \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \\
        resa-e2e --contexts 262144 --batch 8 --modes resa ... > step.csv
    bench/profile/ncu_step_account.py step.csv [N]

Sums time and DRAM bytes by kernel name (cuBLAS kernels keep their own
names) and prints ms per step and TB/s.  N > 1 splits the profiled kernels
into N equal consecutive steps (one per mode of a --modes a,b run).  Under
ncu kernels run one at a time (no programmatic-launch overlap), each with
~1-2 us of profiler overhead, so a step's sum exceeds its wall time.
Python standard library only (scripts/device-run.sh e2eprof runs it).
"""
import collections
import csv
import re
import sys


def load(path):
    rows = [line for line in open(path) if line.startswith('"')]
    kernels = collections.OrderedDict()
    for r in csv.DictReader(rows):
        k = kernels.setdefault(int(r["ID"]), {"name": r["Kernel Name"]})
        k[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    return list(kernels.values())


def short(name):
    name = name.replace("void ", "").replace("<unnamed>::", "")
    return re.sub(r"[<(].*$", "", name)


def account(kernels, label):
    total = sum(k["gpu__time_duration.sum"] for k in kernels) / 1e6
    groups = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for k in kernels:
        g = groups[short(k["name"])]
        g[0] += 1
        g[1] += k["gpu__time_duration.sum"] / 1e9  # s
        g[2] += k.get("dram__bytes_read.sum", 0) + k.get("dram__bytes_write.sum", 0)
    print(f"== {label}: {len(kernels)} kernels, sum of kernel times {total:.3f} ms")
    print(f"{'kernel':60s} {'count':>5s} {'ms':>9s} {'GB':>8s} {'TB/s':>6s}")
    for name, (n, sec, nbytes) in sorted(groups.items(), key=lambda t: -t[1][1]):
        rate = nbytes / sec / 1e12 if sec > 0 else 0.0
        print(f"{name[:60]:60s} {n:5d} {sec * 1e3:9.3f} {nbytes / 1e9:8.2f} {rate:6.2f}")


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    kernels = load(sys.argv[1])
    parts = int(sys.argv[2]) if len(sys.argv) == 3 else 1
    if parts < 1 or len(kernels) % parts:
        sys.exit(f"{len(kernels)} kernels do not split into {parts} equal steps")
    n = len(kernels) // parts
    for i in range(parts):
        account(kernels[i * n:(i + 1) * n], f"step {i + 1} of {parts}")


if __name__ == "__main__":
    main()
