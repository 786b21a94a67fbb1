#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bench/profile/timeline_account.py on a kernel_timeline-shaped CSV made here:
mangled and demangled names shortened, a cache-fill chain left out, warm-up
chains skipped, and the medians of durations, gaps (an overlap negative),
span and the gap between chains exact; a file with no sparse chain refused."""
import os
import subprocess
import sys
import tempfile

script = sys.argv[1]
head = ("start_ns,end_ns,queued_ns,submitted_ns,device,stream,grid_x,grid_y,grid_z,"
        "block_x,block_y,block_z,graph,graph_node,correlation,name\n")
names = {
    "write_rows": "_ZN12_GLOBAL__N_110write_rowsI13__nv_bfloat16Lb0EEEv20resa_cuda_layer_args",
    "summarize_touched": "void <unnamed>::summarize_touched<__nv_bfloat16, false>(resa_cuda_layer_args)",
    "write_decode": "_ZN12_GLOBAL__N_112write_decodeI13__nv_bfloat16Lb0EEEv20resa_cuda_layer_args",
    "score_select": "_ZN12_GLOBAL__N_112score_selectI13__nv_bfloat16hLi128ELi0ELb0ELb0EEEv20resa_cuda_layer_args",
    "attend_split": "_ZN12_GLOBAL__N_112attend_splitI13__nv_bfloat16Li128ELb0EEEv20resa_cuda_layer_argsPf",
    "combine": "(anonymous namespace)::combine<__nv_bfloat16, 128>(resa_cuda_layer_args, int, float const*)",
}
grids = {"write_rows": (1, 1, 1), "summarize_touched": (1, 1, 1), "write_decode": (1, 1, 1),
         "score_select": (16, 8, 1), "attend_split": (66, 8, 1), "combine": (32, 1, 1)}
rows, t, corr = [head], 1_000_000, 0


def kernel(name, gap, dur):
    global t, corr
    start = t + gap
    t = start + dur
    corr += 1
    gx, gy, gz = grids[name]
    q = f'"{names[name]}"' if "," in names[name] else names[name]
    rows.append(f"{start},{t},0,0,0,13,{gx},{gy},{gz},256,1,1,1,{corr},{corr},{q}\n")


kernel("write_rows", 0, 4000)           # the cache fill: no attend_split, left out
kernel("summarize_touched", 500, 3000)
for c in range(5):                      # chain 0 is the warm-up (--skip 1)
    kernel("write_decode", 3000 if c else 10_000, 2000)
    kernel("score_select", 1000, 9000 if c == 3 else 8000)
    kernel("attend_split", -500, 5000)  # a programmatic dependent launch: starts early
    kernel("combine", 700, 2100)
with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
    f.writelines(rows)
    path = f.name
try:
    out = subprocess.run([sys.executable, script, path, "--skip", "1"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == "== 4 chains of write_decode > score_select > attend_split > combine " \
                     "(of 5; first 1 skipped)", out[0]
    table = {l.split()[0]: l.split()[1:] for l in out[2:6]}
    assert table["write_decode"][:3] == ["1x1x1", "256", "2.00"], table["write_decode"]
    assert table["score_select"][2] == "8.00" and table["score_select"][5] == "1.00", table
    assert table["attend_split"][1:3] == ["256", "5.00"] and table["attend_split"][5] == "-0.50", table
    assert table["combine"][0] == "32x1x1" and table["combine"][5] == "0.70", table
    # span 2 + 1 + 8 - 0.5 + 5 + 0.7 + 2.1; kernels 2 + 8 + 5 + 2.1
    assert out[6].startswith("span, first start to last end: median 18.30 us"), out[6]
    assert out[6].endswith("sum of kernel times: median 17.10 us"), out[6]
    assert out[7].startswith("between chains, last end to next first start: median 3.00 us"), out[7]
    none = subprocess.run([sys.executable, script, path, "--skip", "5"], capture_output=True, text=True)
    assert none.returncode != 0 and "none left after skipping 5" in none.stderr, none
finally:
    os.unlink(path)
print("check_timeline_account: ok")
