#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""How far apart a real model's per-token V scales lie: the fp8 cache's scale
of a (token, KV head) is its V vector's amax / 448, and the CUDA sparse
decode of 0.3.0 loses accuracy when an earlier token's scale is 2^16 or more
above a later one's (docs/performance.md, v14 "Numerics").  Runs the model
(float32, CPU) over the first --tokens tokens of each text, takes every
layer's v_proj output, and prints the largest log2 of (an earlier token's V
amax / a later token's) per (text, layer), over the KV heads, worst first.

  RESA_LIBRARY=build/lib/libresa.so python3 bench/quality/v_scale_spread.py \\
      [--model .model/SmolLM2-135M-Instruct.Q4_1.gguf] [--tokens 4096]
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bindings", "python"))
from resa.eval import data  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--text", action="append",
                    default=None, help="text name (default: the three of resa-eval)")
    a = ap.parse_args()
    model, tokenizer = data.load_model(a.model, dtype="float32", device="cpu")
    cfg = model.config
    hkv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    caps = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.v_proj.register_forward_hook(
            lambda mod, inp, out, i=i: caps.__setitem__(i, out.detach()))
    rows = []
    for name in a.text or ["austen-persuasion", "debian-reference", "austen-emma"]:
        ids = data.load_tokens(tokenizer, name, a.tokens)
        with torch.no_grad():
            model(torch.as_tensor(ids[:a.tokens])[None])
        for i, v in caps.items():
            amax = v[0].view(v.shape[1], hkv, d).abs().amax(-1)  # [T, hkv]
            later_min = torch.flip(torch.cummin(torch.flip(amax, [0]), 0).values, [0])
            ratio = (amax[:-1] / later_min[1:]).max().item()
            rows.append((math.log2(ratio), name, i, (amax.max() / amax.min()).item()))
    rows.sort(reverse=True)
    print("| log2(earlier V amax / later V amax), largest | text | layer | max / min amax |")
    print("|---|---|---|---|")
    for r in rows[:8]:
        print(f"| {r[0]:.1f} | {r[1]} | {r[2]} | {r[3]:.1f} |")
    print(f"\nmedian over (text, layer): {sorted(r[0] for r in rows)[len(rows) // 2]:.1f}; "
          f"{len(rows)} (text, layer) pairs, {a.tokens} tokens each")


if __name__ == "__main__":
    main()
