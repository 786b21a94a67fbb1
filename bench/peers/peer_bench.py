#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Dense decode peers on the same shapes as resa-bench, in the same run.

PyTorch's scaled_dot_product_attention for one decode query per sequence
(q [B, Hq, 1, d], k/v [B, Hkv, L, d], enable_gqa) on each SDPA backend that
accepts the shape, and a rectification-shaped call (f queries, causal among
themselves, against the whole cache).  Times are CUDA-event medians of graph
replays; the caches measured (>= 134 MB at 32K, batch 1) are larger than the
H200's 60 MB L2, so replays do not run from cache.
Prints a table and, with --csv, CSV rows.
"""
import argparse
import sys
import warnings

try:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
except ImportError as e:  # no torch: nothing to compare against
    print(f"peer_bench: PyTorch not available ({e})", file=sys.stderr)
    sys.exit(0)

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def timed(fn, reps):
    """Median milliseconds of graph replays of fn()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def causal_tail_mask(f, L, device):
    # query i (position L - f + i) sees keys [0, L - f + i]
    q_pos = torch.arange(L - f, L, device=device)[:, None]
    k_pos = torch.arange(L, device=device)[None, :]
    return k_pos <= q_pos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,262144")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--csv", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")  # SDPA explains every backend it skips
    hq, hkv = (int(x) for x in a.heads.split("/"))
    d, f = a.dim, a.interval
    dev = torch.device("cuda")
    dt = torch.bfloat16
    print(f"# peer_bench on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"heads {hq}/{hkv}, d {d}, bf16")
    if a.csv:
        print("peer,op,context,batch,ms")
    else:
        print(f"{'peer':>16} {'op':>8} {'context':>9} {'batch':>6} {'ms':>10}")
    for B in (int(x) for x in a.batch.split(",")):
        for L in (int(x) for x in a.contexts.split(",")):
            k = torch.randn(B, hkv, L, d, device=dev, dtype=dt)
            v = torch.randn(B, hkv, L, d, device=dev, dtype=dt)
            q1 = torch.randn(B, hq, 1, d, device=dev, dtype=dt)
            qf = torch.randn(B, hq, f, d, device=dev, dtype=dt)
            mask = causal_tail_mask(f, L, dev)
            for name, be in BACKENDS.items():
                if name == "math" and L * B > 65536:
                    continue  # materializes the score matrix: not a peer at this size
                # rectify: f queries at the end of the cache, causal among themselves
                # (an explicit boolean mask, and PyTorch's bottom-right causal bias);
                # rectify-nomask drops the mask: the same work minus a triangle of
                # f*f/2 keys, an optimistic bound for the peer
                for op in ("decode", "rectify", "rectify-lr", "rectify-nomask"):
                    def call(op=op, be=be):
                        with sdpa_kernel([be]):
                            if op == "decode":
                                return F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)
                            if op == "rectify-nomask":
                                return F.scaled_dot_product_attention(qf, k, v, enable_gqa=True)
                            m = mask if op == "rectify" else causal_lower_right(f, L)
                            return F.scaled_dot_product_attention(qf, k, v, attn_mask=m,
                                                                  enable_gqa=True)
                    try:
                        ms = timed(call, a.reps)
                    except Exception as e:  # backend refuses this shape
                        print(f"# {name} {op} L={L} B={B}: not available ({type(e).__name__})",
                              file=sys.stderr)
                        continue
                    if a.csv:
                        print(f"sdpa-{name},{op},{L},{B},{ms:.4f}")
                    else:
                        print(f"{'sdpa-' + name:>16} {op:>8} {L:>9} {B:>6} {ms:>10.4f}")
                    sys.stdout.flush()
            del k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
