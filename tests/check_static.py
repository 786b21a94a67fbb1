#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""A program linked with libresa.a (-Ddefault_library=static|both) holds the
library itself: no NEEDED entry for libresa.so, and it runs.

usage: check_static.py PROGRAM"""
import subprocess
import sys

exe = sys.argv[1]
dyn = subprocess.run(["readelf", "-d", exe], capture_output=True, text=True, check=True).stdout
needed = [l for l in dyn.splitlines() if "(NEEDED)" in l]
assert not any("libresa" in l for l in needed), f"{exe} needs a shared libresa:\n{dyn}"
run = subprocess.run([exe], capture_output=True, text=True, check=False)
assert run.returncode == 0, run
print(run.stdout, end="")
print("check_static: 1 passed, 0 failed")
