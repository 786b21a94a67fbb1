#!/usr/bin/env python3
"""Prints a version field of include/resa.h, the single source of truth.

usage: header_version.py HEADER [version|abi]
"""
import re
import sys


def field(text, name):
    m = re.search(r"#define\s+RESA_%s\s+(\d+)" % name, text)
    if not m:
        sys.exit("header_version.py: RESA_%s not found" % name)
    return m.group(1)


def main():
    text = open(sys.argv[1], encoding="utf-8").read()
    what = sys.argv[2] if len(sys.argv) > 2 else "version"
    if what == "abi":
        print(field(text, "ABI_VERSION"))
    else:
        print(".".join(field(text, "VERSION_" + p) for p in ("MAJOR", "MINOR", "PATCH")))


main()
