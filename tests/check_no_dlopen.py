#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""-Dgpu=disabled: libresa (shared or static) never calls dlopen, and the
CUDA backend is RESA_ERR_NOT_SUPPORTED (tests/check_no_cuda.c).

usage: check_no_dlopen.py LIBRESA CHECK_NO_CUDA"""
import subprocess
import sys

lib, prog = sys.argv[1], sys.argv[2]
nm = ["nm", "-u", lib] if lib.endswith(".a") else ["nm", "-D", "--undefined-only", lib]
undef = subprocess.run(nm, capture_output=True, text=True, check=True).stdout.split()
bad = sorted({s.split("@")[0] for s in undef} & {"dlopen", "dlsym", "dladdr", "dlclose"})
assert not bad, f"{lib} references {bad}"
run = subprocess.run([prog], capture_output=True, text=True, check=False)
assert run.returncode == 0, run
print("check_no_dlopen: 2 passed, 0 failed")
