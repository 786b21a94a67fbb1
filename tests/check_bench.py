#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Smoke test of resa-bench on the CPU backend: a tiny sweep runs, and its
CSV and JSON outputs parse with one row per point and sane values; values
that were not measured are empty CSV fields, '-' in the table and null in
JSON (never -1, nan or nanx); --help is the usage on stdout with exit 0,
an unknown option is named on stderr with exit 2.  No timing assertions
(speed is proven by benchmarks, never by tests)."""
import csv
import io
import json
import subprocess
import sys

bench = sys.argv[1]
args = [bench, "--backend", "cpu", "--contexts", "100,700", "--batch", "1,2",
        "--shapes", "8/2x64,4/4x32", "--reps", "2", "--threads", "1"]
fields = ("dense_ms", "sparse_ms", "rectify_ms", "resa_ms")

out = subprocess.run(args + ["--csv"], check=True, capture_output=True, text=True).stdout
rows = list(csv.DictReader(io.StringIO(out)))
assert len(rows) == 8, f"expected 8 CSV rows, got {len(rows)}:\n{out}"
for r in rows:
    for f in fields:
        if f == "rectify_ms" and int(r["context"]) < 256:
            # every block is attended below n_min * b = 256 tokens: nothing becomes
            # pending, so there is no rectification to time (an empty field)
            assert r[f] == "", f"{f} = {r[f]!r} with nothing pending in {r}"
            continue
        v = float(r[f])
        assert v > 0 and v == v, f"{f} = {r[f]} in {r}"
    # no GPU: the shares of the device's copy bandwidth are not measured
    assert r["dense_pct_copy_bw"] == "" and r["sparse_pct_copy_bw"] == "", r
    assert r["backend"] == "cpu" and r["dtype"] == "f32", r
assert {(r["context"], r["batch"], r["hq"], r["hkv"], r["d"]) for r in rows} == {
    (c, b, hq, hkv, d) for c in ("100", "700") for b in ("1", "2")
    for hq, hkv, d in (("8", "2", "64"), ("4", "4", "32"))}, rows

# fp8 summaries: the column says so and the bytes to read shrink
fp8 = list(csv.DictReader(io.StringIO(subprocess.run(
    args + ["--csv", "--summary", "fp8", "--modes", "sparse"], check=True,
    capture_output=True, text=True).stdout)))
assert len(fp8) == 8 and all(r["summary"] == "fp8" for r in fp8), fp8
assert all(r["summary"] == "kv" for r in rows), rows
# only sparse measured: dense, rectify, resa and the speedup are empty fields
for r in fp8:
    assert float(r["sparse_ms"]) > 0, r
    assert all(r[f] == "" for f in ("dense_ms", "rectify_ms", "resa_ms", "speedup",
                                    "dense_GBps")), r
kv_bytes = {(r["context"], r["batch"], r["hq"], r["d"]): float(r["sparse_bytes"]) for r in rows}
for r in fp8:
    assert float(r["sparse_bytes"]) < kv_bytes[(r["context"], r["batch"], r["hq"], r["d"])], r

# an fp8 KV cache: the column says so, I/O stays f32, and a dense step reads
# d + 4 bytes per token and head for K and for V instead of 4 d
kv8 = list(csv.DictReader(io.StringIO(subprocess.run(
    args + ["--csv", "--kv-dtype", "fp8", "--modes", "dense"], check=True,
    capture_output=True, text=True).stdout)))
assert len(kv8) == 8 and all(r["kv_dtype"] == "fp8" and r["dtype"] == "f32" for r in kv8), kv8
assert all(r["kv_dtype"] == "f32" for r in rows), rows
dense_bytes = {(r["context"], r["batch"], r["hq"], r["d"]): float(r["dense_bytes"]) for r in rows}
for r in kv8:
    assert float(r["dense_ms"]) > 0, r
    d = int(r["d"])
    want = dense_bytes[(r["context"], r["batch"], r["hq"], r["d"])] * (d + 4) / (4 * d)
    assert abs(float(r["dense_bytes"]) - want) <= 1, (r, want)

doc = json.loads(subprocess.run(args + ["--json"], check=True, capture_output=True,
                                text=True).stdout)
assert len(doc["points"]) == 8 and all(p["resa_ms"] > 0 for p in doc["points"]), doc

assert all(p["rectify_ms"] is None for p in doc["points"] if p["context"] < 256), doc

table = subprocess.run(args, check=True, capture_output=True, text=True).stdout
assert table.count("\n") >= 8 + 4, table
for text in (out, table, json.dumps(doc)):
    for token in ("nan", "-1.0", "inf"):
        assert token not in text.lower(), f"{token!r} in:\n{text}"
rows_100 = [line.split() for line in table.splitlines()
            if not line.startswith("#") and line.split()[:1] == ["100"]]
assert len(rows_100) == 4 and all(cols[6] == "-" for cols in rows_100), table  # rectify_ms

for flag in ("--help", "-h"):
    h = subprocess.run([bench, flag], capture_output=True, text=True)
    assert h.returncode == 0 and h.stdout.startswith("usage: resa-bench") and h.stderr == "", h
    assert "--batch B,B,...            sequences per step, 1 to 256 (default 1)" in h.stdout, h
    for opt in ("--backend", "--contexts", "--heads", "--dim", "--shapes", "--dtype", "--kv-dtype",
                "--fraction", "--interval", "--summary", "--sink", "--width", "--reps",
                "--threads", "--modes", "--csv", "--json", "--plot"):
        assert f"  {opt} " in h.stdout, (opt, h.stdout)
unknown = subprocess.run([bench, "--frobnicate"], capture_output=True, text=True)
assert (unknown.returncode == 2 and unknown.stdout == ""
        and "--frobnicate" in unknown.stderr and "usage" in unknown.stderr), unknown
bad = subprocess.run([bench, "--batch", "0"], capture_output=True, text=True)
assert bad.returncode == 2 and "usage" in bad.stderr and bad.stdout == "", bad
print("check_bench: 1 passed, 0 failed")
