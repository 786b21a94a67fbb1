#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""FlashInfer's paged-KV batch decode on the shapes of resa-bench, as a peer.

Same CSV rows as peer_bench.py (peer,op,context,batch,ms), so compare.py
takes both.  Page size 16 (libresa's block), NHD layout, bf16 queries and
output, pages of each sequence scattered over the pool.  Rows: "flashinfer"
(the CUDA-core decode kernel) and "flashinfer-tc" (use_tensor_cores=True, the
fa2 prefill kernel) on a bf16 KV cache (--kv-dtype bf16, the default), or
"flashinfer-fp8" and "flashinfer-tc-fp8" on an fp8 e4m3 one (--kv-dtype fp8:
the random bf16 cache quantized to torch.float8_e4m3fn with one scale per
tensor for K and one for V, amax / 448, passed to run() as k_scale / v_scale).
Times: CUDA-event medians of CUDA-graph replays (plan() outside the graph, as
an engine does; with fp8 they include FlashInfer's `out *= v_scale` after the
kernel).  Each configuration is first checked against a float32 reference on
one sequence (with fp8, on the dequantized cache, e4m3 * scale); a
configuration off by more than bf16 allows (1e-2 relative) gets no row.

FlashInfer is not on the device machine (no network there).  It travels as one
pruned archive in .whl/ (scripts/flashinfer-setup.sh makes it here and unpacks
it there to /tmp/fi-site, with ahead-of-time sm_90a builds of the modules this
runs, bf16 and fp8 KV cache, for head_dim 64/128/256; others are JIT-compiled
with nvcc, offline, into /tmp/fi-ws).  This script looks in /tmp/fi-site (or
$FI_SITE) itself when flashinfer is not importable.  Without FlashInfer it
says why (on stdout, as a '#' line, and on stderr) and exits 0, so the
one-call device script keeps going.
"""
import argparse
import os
import sys
import time


def _say(msg):
    """A '#' line on stdout (kept by whoever reads the CSV) and on stderr."""
    print(f"# flashinfer_bench: {msg}", flush=True)
    print(f"# flashinfer_bench: {msg}", file=sys.stderr, flush=True)


def _import_flashinfer():
    """Import flashinfer, from /tmp/fi-site when it is not installed.  Before
    the import (FlashInfer reads these once): the JIT cache under /tmp and the
    arch list of this card only, so a JIT compile builds one target."""
    import torch
    site = os.environ.get("FI_SITE", "/tmp/fi-site")
    if os.path.isdir(os.path.join(site, "flashinfer")) and site not in sys.path:
        try:
            import importlib.util
            found = importlib.util.find_spec("flashinfer") is not None
        except Exception:
            found = False
        if not found:
            sys.path.insert(0, site)
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/fi-ws")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", f"{major}.{minor}")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    # the JIT runs `ninja` and nvcc: this Python's bin (pip's ninja) and CUDA's
    path = os.environ.get("PATH", "")
    cuda = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for d in (os.path.dirname(sys.executable), os.path.join(cuda, "bin")):
        if d not in path.split(os.pathsep) and os.path.isdir(d):
            path += os.pathsep + d
    os.environ["PATH"] = path
    import flashinfer
    return torch, flashinfer


try:
    torch, flashinfer = _import_flashinfer()
    from peer_bench import timed  # CUDA-graph replays timed with events
except Exception as e:  # ImportError, or a broken install's own error
    _say(f"FlashInfer not available here ({type(e).__name__}: {e}); no FlashInfer rows"
         " (carry .whl and `source scripts/flashinfer-setup.sh` first)")
    sys.exit(0)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(cache, chunk=4096):
    """cache [pages, 2, page, hkv, d] (bf16) as float8_e4m3fn, with one float32
    scale per tensor for K and for V (amax / 448): returns (fp8 cache,
    scales [2] float32 on cache's device).  In chunks of pages, so that the
    float32 temporaries stay small next to a many-GB cache."""
    amax = torch.zeros(2, dtype=torch.float32, device=cache.device)
    for i in range(0, cache.shape[0], chunk):
        amax = torch.maximum(amax, cache[i:i + chunk].abs().amax(dim=(0, 2, 3, 4)).float())
    scales = amax.clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX
    out = torch.empty(cache.shape, dtype=torch.float8_e4m3fn, device=cache.device)
    inv = scales.view(1, 2, 1, 1, 1)
    for i in range(0, cache.shape[0], chunk):
        # clamp: amax / scale can round just past 448; not left to what the
        # cast does beyond the largest finite e4m3
        out[i:i + chunk] = (cache[i:i + chunk].float() / inv).clamp(-FP8_MAX, FP8_MAX).to(
            torch.float8_e4m3fn)
    return out, scales


def reference(q, cache, indices, pages_per_seq, L, b, hq, hkv, d, scales=None):
    """float32 decode attention of sequence b, from the gathered pages; with
    scales ([2], K and V), of the dequantized fp8 cache, e4m3 * scale."""
    pages = indices[b * pages_per_seq:(b + 1) * pages_per_seq].long()
    kv = cache[pages].float()                           # [p, 2, page, hkv, d]
    if scales is not None:
        kv = kv * scales.to(kv.device).view(1, 2, 1, 1, 1)
    k = kv[:, 0].reshape(-1, hkv, d)[:L]                # [L, hkv, d]
    v = kv[:, 1].reshape(-1, hkv, d)[:L]
    g = hq // hkv
    qb = q[b].float().view(hkv, g, d)                   # [hkv, g, d]
    s = torch.einsum("hgd,lhd->hgl", qb, k) / d ** 0.5
    return torch.einsum("hgl,lhd->hgd", s.softmax(-1), v).reshape(hq, d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,65536,262144")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16",
                    help="KV cache: bf16, or fp8 e4m3 with per-tensor K and V scales")
    a = ap.parse_args()
    fp8 = a.kv_dtype == "fp8"
    hq, hkv = (int(x) for x in a.heads.split("/"))
    d, page = a.dim, 16
    if not torch.cuda.is_available():
        _say("no CUDA device; no FlashInfer rows")
        return
    dev, dt = torch.device("cuda"), torch.bfloat16
    kv_dt = torch.float8_e4m3fn if fp8 else dt
    print(f"# flashinfer_bench: flashinfer {flashinfer.__version__} "
          f"({os.path.dirname(flashinfer.__file__)}), torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(0)}, heads {hq}/{hkv}, d {d}, page {page}, "
          f"KV cache {a.kv_dtype}{' (e4m3, per-tensor K/V scales)' if fp8 else ''}, "
          f"JIT cache {os.environ.get('FLASHINFER_WORKSPACE_BASE')}, "
          f"arch {os.environ.get('FLASHINFER_CUDA_ARCH_LIST')}", flush=True)
    print("peer,op,context,batch,ms", flush=True)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    first_plan = {}
    for B in (int(x) for x in a.batch.split(",")):
        for L in (int(x) for x in a.contexts.split(",")):
            pages_per_seq = (L + page - 1) // page
            n_pages = B * pages_per_seq
            cache = torch.randn(n_pages, 2, page, hkv, d, device=dev, dtype=dt)
            indices = torch.randperm(n_pages, device=dev, dtype=torch.int32)
            indptr = torch.arange(0, n_pages + 1, pages_per_seq, device=dev, dtype=torch.int32)
            last = torch.full((B,), L - (pages_per_seq - 1) * page, device=dev,
                              dtype=torch.int32)
            q = torch.randn(B, hq, d, device=dev, dtype=dt)
            scales, kw = None, {}
            if fp8:
                cache, scales = quantize_fp8(cache)  # the bf16 cache goes
                torch.cuda.empty_cache()
                kw = {"k_scale": float(scales[0]), "v_scale": float(scales[1])}
            ref = reference(q, cache, indices, pages_per_seq, L, B - 1, hq, hkv, d, scales)
            for tc in (False, True):
                name = ("flashinfer-tc" if tc else "flashinfer") + ("-fp8" if fp8 else "")
                try:
                    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                        ws, "NHD", use_tensor_cores=tc)
                    t = time.time()
                    # q_data_type too: data_type= alone leaves q at float16 in 0.6.x
                    w.plan(indptr, indices, last, hq, hkv, d, page,
                           q_data_type=dt, kv_data_type=kv_dt)
                    if tc not in first_plan:  # loads (AOT) or JIT-compiles the module
                        first_plan[tc] = time.time() - t
                        print(f"# {name}: first plan() {first_plan[tc]:.1f} s "
                              "(module load or JIT compile)", flush=True)
                    out = w.run(q, cache, **kw)
                    torch.cuda.synchronize()
                    err = ((out[B - 1].float() - ref).norm() / ref.norm()).item()
                    # bf16 operands: 1e-3..1e-2 (fp8: against the dequantized
                    # cache, so the same bound); NaN fails
                    if not err < 1e-2:
                        _say(f"{name} L={L} B={B}: rel. error {err:.2e} vs float32; no row")
                        continue
                    ms = timed(lambda: w.run(q, cache, **kw), a.reps)
                except Exception as e:  # a configuration FlashInfer refuses, a failed JIT
                    msg = str(e).strip().splitlines()
                    _say(f"{name} L={L} B={B}: {type(e).__name__}: "
                         + " | ".join(msg[-12:]))
                    continue
                print(f"# {name} L={L} B={B}: rel. error {err:.1e}", flush=True)
                print(f"{name},decode,{L},{B},{ms:.4f}", flush=True)
            del cache
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
