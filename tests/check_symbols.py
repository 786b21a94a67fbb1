#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Checks the ABI surface of the built libresa.so.

usage: check_symbols.py LIBRESA_SO RESA_H

- the dynamic symbols it defines are exactly the functions declared RESA_API
  in resa.h (nothing more, nothing less), all named resa_*;
- its SONAME is libresa.so.<RESA_ABI_VERSION from the header>.
"""
import re
import subprocess
import sys


def header_api(text):
    # drop comments, then join declarations
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    # drop preprocessor lines (the RESA_API definition itself)
    text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    names = set()
    for decl in re.finditer(r"\bRESA_API\b([^;{]*)\(", text):
        m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", decl.group(1))
        if m:
            names.add(m.group(1))
    return names


def abi_version(text):
    m = re.search(r"#define\s+RESA_ABI_VERSION\s+(\d+)", text)
    if not m:
        sys.exit("RESA_ABI_VERSION not found in the header")
    return m.group(1)


def run(cmd):
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit("%s failed: %s" % (" ".join(cmd), e))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    lib, header = sys.argv[1], sys.argv[2]
    text = open(header, encoding="utf-8").read()
    declared = header_api(text)
    errors = []
    if len(declared) < 10:
        errors.append("parsed only %d RESA_API functions from %s" % (len(declared), header))

    exported = set()
    for line in run(["nm", "-D", "--defined-only", lib]).splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name = parts[-1].split("@")[0]
        kind = parts[-2] if len(parts) >= 3 else parts[0]
        if kind == "A":  # version node definitions (RESA_0)
            continue
        exported.add(name)

    for n in sorted(exported - declared):
        errors.append("exported but not declared RESA_API: %s" % n)
    for n in sorted(declared - exported):
        errors.append("declared RESA_API but not exported: %s" % n)
    for n in sorted(exported | declared):
        if not n.startswith("resa_"):
            errors.append("symbol without the resa_ prefix: %s" % n)

    want = "libresa.so.%s" % abi_version(text)
    dyn = run(["readelf", "-d", lib])
    m = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", dyn)
    soname = m.group(1) if m else None
    if soname != want:
        errors.append("SONAME is %s, expected %s" % (soname, want))

    for e in errors:
        print("check_symbols:", e)
    print("check_symbols: %d declared, %d exported, SONAME %s" % (len(declared), len(exported), soname))
    return 1 if errors else 0


sys.exit(main())
