#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""FlashInfer's paged-KV batch decode on the shapes of resa-bench, as a peer.

Same CSV rows as peer_bench.py (peer,op,context,batch,ms), so compare.py
takes both.  Page size 16 (libresa's block), NHD layout, bf16, pages of each
sequence scattered over the pool.  Times: CUDA-event medians of CUDA-graph
replays (plan() outside the graph, as an engine does).

FlashInfer is not installed on the device machine and its wheel (101 MB,
flashinfer-python 0.7.4, plus about ten dependencies) is larger than what the
device tool carries in one call (64 MiB); without it this script says so and
exits 0, so the one-call device script keeps going.
"""
import argparse
import sys

try:
    import torch
    import flashinfer
    from peer_bench import timed  # CUDA-graph replays timed with events
except ImportError as e:
    print(f"# flashinfer_bench: FlashInfer not available here ({e}); no FlashInfer rows",
          file=sys.stderr)
    sys.exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,65536,262144")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    hq, hkv = (int(x) for x in a.heads.split("/"))
    d, page = a.dim, 16
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"# flashinfer_bench: flashinfer {flashinfer.__version__}, "
          f"{torch.cuda.get_device_name(0)}, heads {hq}/{hkv}, d {d}, page {page}")
    print("peer,op,context,batch,ms")
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
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
            for tc in (False, True):
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD",
                                                                  use_tensor_cores=tc)
                w.plan(indptr, indices, last, hq, hkv, d, page, data_type=dt)
                try:
                    ms = timed(lambda: w.run(q, cache), a.reps)
                except Exception as e:  # a configuration FlashInfer refuses
                    print(f"# flashinfer {'tc' if tc else 'cuda-core'} L={L} B={B}: {e}",
                          file=sys.stderr)
                    continue
                name = "flashinfer-tc" if tc else "flashinfer"
                print(f"{name},decode,{L},{B},{ms:.4f}")
                sys.stdout.flush()
            del cache
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
