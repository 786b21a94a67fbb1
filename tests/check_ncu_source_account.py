#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bench/profile/ncu_source_account.py on an ncu source-page-shaped CSV made
here: the regions split at each SETMAXNREG, their executed instructions and
samples summed exactly, the stall reasons in percent of the region's, and the
most sampled instruction first with its main reason."""
import subprocess
import sys
import tempfile

script = sys.argv[1]
hdr = ['"Address"', '"Source"', '"Warp Stall Sampling (All Samples)"',
       '"Warp Stall Sampling (Not-issued Samples)"', '"# Samples"', '"Instructions Executed"',
       '"stall_barrier"', '"stall_long_sb"', '"stall_wait"', '"stall_barrier (Not Issued)"']
ins = [  # source, samples, executed, barrier, long_sb, wait
    ("LDC R1, c[0x0][0x28]", 2, 10, 0, 0, 2),
    ("USETMAXREG.TRY_ALLOC.CTAPOOL 0xe0", 0, 10, 0, 0, 0),
    ("@!P1  BRA 0x10", 30, 100, 0, 30, 0),           # consumers: a wait on the producer
    ("HGMMA.64x128x16.F32.F16 R24, gdesc[UR8]", 10, 40, 0, 0, 10),
    ("USETMAXREG.DEALLOC 0x38", 0, 10, 0, 0, 0),
    ("F2FP.F16.E4M3.UNPACK_B R8, R12", 6, 300, 0, 0, 6),  # producer
    ("UMOV UR30, UR15", 12, 50, 12, 0, 0),
]
lines = ['"Kernel Name","void dense_wgmma_kernel<__nv_bfloat16, 128, 1>(dense_params)",\n',
         ",".join(hdr) + ",\n"]
for i, (src, s, x, b, l, w) in enumerate(ins):
    lines.append(f'"0x{0x1000 + 16 * i:x}","      {src}","{s}","{s}","{s}","{x}","{b}","{l}","{w}","{b}",\n')
with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
    f.writelines(lines)
out = subprocess.run([sys.executable, script, f.name, "--top", "1"], capture_output=True, text=True,
                     check=True).stdout
print(out)
expect = [
    "7 instructions, 520 warp instructions executed, 60 samples; regions start at instruction [0, 1, 4]",
    "region 0: executed 10 (1.9%), samples 2 (3.3%): wait 100%",
    "region 1: executed 150 (28.8%), samples 40 (66.7%): long_sb 75%, wait 25%",
    "(long_sb)  @!P1  BRA 0x10",
    "region 2: executed 360 (69.2%), samples 18 (30.0%): barrier 67%, wait 33%",
    "(barrier)  UMOV UR30, UR15",
]
missing = [e for e in expect if e not in out]
if missing:
    print("missing:", missing)
    sys.exit(1)
if "HGMMA" in out or "F2FP" in out:  # --top 1: only the most sampled of each region
    print("--top 1 printed more than one instruction a region")
    sys.exit(1)
