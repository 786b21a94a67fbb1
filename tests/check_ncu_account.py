#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bench/profile/ncu_step_account.py on a small ncu-shaped CSV made here: kernel
names shortened and grouped, times and bytes summed per group, the --modes
split into equal steps, and an unequal split refused."""
import os
import subprocess
import sys
import tempfile

script = sys.argv[1]
head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
        '"Block Size","Grid Size","Device","CC","Section Name","Metric Name",'
        '"Metric Unit","Metric Value"\n')
# (kernel name, ns, bytes read, bytes written); two steps of three kernels
kernels = [
    ("void <unnamed>::attend_split<__nv_bfloat16, 128>(resa_cuda_layer_args, float *)",
     3000, 12000000, 1000),
    ("<unnamed>::add_rmsnorm_k(float *, const __nv_bfloat16 *)", 4000, 10, 20),
    ("void <unnamed>::attend_split<__nv_bfloat16, 128>(resa_cuda_layer_args, float *)",
     1000, 4000000, 0),
    ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT", 2000, 2000000, 0),
    ("<unnamed>::add_rmsnorm_k(float *, const __nv_bfloat16 *)", 5000, 0, 0),
    ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT", 2000, 6000000, 0),
]
rows = [head, "==PROF== a line ncu prints that is not CSV\n"]
for i, (name, ns, rd, wr) in enumerate(kernels):
    for metric, unit, value in (("dram__bytes_read.sum", "byte", f"{rd:,}"),
                                ("dram__bytes_write.sum", "byte", str(wr)),
                                ("gpu__time_duration.sum", "ns", f"{ns:,}")):
        rows.append(f'"{i}","1","e2e","h","{name}","1","13","(256, 1, 1)","(8, 1, 1)","0",'
                    f'"9.0","Command line profiler metrics","{metric}","{unit}","{value}"\n')
with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
    f.writelines(rows)
    path = f.name
try:
    one = subprocess.run([sys.executable, script, path], capture_output=True, text=True, check=True)
    lines = one.stdout.splitlines()
    assert lines[0] == "== step 1 of 1: 6 kernels, sum of kernel times 0.017 ms", lines[0]
    table = {l.split()[0]: l.split()[1:] for l in lines[2:]}
    assert list(table) == ["add_rmsnorm_k", "attend_split", "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT"], table
    assert table["add_rmsnorm_k"] == ["2", "0.009", "0.00", "0.00"], table
    assert table["attend_split"][:3] == ["2", "0.004", "0.02"], table
    assert table["attend_split"][3] == "4.00", table  # 16.001 MB in 4 us
    two = subprocess.run([sys.executable, script, path, "2"], capture_output=True, text=True,
                         check=True).stdout
    assert "== step 1 of 2: 3 kernels, sum of kernel times 0.008 ms" in two, two
    assert "== step 2 of 2: 3 kernels, sum of kernel times 0.009 ms" in two, two
    bad = subprocess.run([sys.executable, script, path, "4"], capture_output=True, text=True)
    assert bad.returncode != 0 and "do not split" in bad.stderr, (bad.returncode, bad.stderr)
finally:
    os.unlink(path)
print("ncu_step_account: ok")
