#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Generate with a Hugging Face causal LM twice: with libresa's ReSA (block-sparse
decode + rectification, resa.hf.ResaLM) and with transformers' own dense attention,
and print both.

  # a tiny random-weight Llama (no download; token ids in, token ids out)
  python3 examples/hf_generate.py
  # a model directory (or hub id) with a tokenizer
  python3 examples/hf_generate.py /models/SmolLM2-360M --prompt "The capital of France"
  # a GGUF file: its path, or the directory plus --gguf-file (transformers dequantizes it)
  python3 examples/hf_generate.py /models/qwen2.5-0.5b-instruct-q8_0.gguf
  python3 examples/hf_generate.py /models/qwen --gguf-file qwen2.5-0.5b-instruct-q8_0.gguf

Environment: PYTHONPATH=bindings/python (the resa package) and, for an
uninstalled build, RESA_LIBRARY=build/lib/libresa.so.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings",
                                "python"))

import torch  # noqa: E402
import transformers  # noqa: E402

from resa.hf import ResaLM  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_model(seed):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=4096, initializer_range=0.2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def load(args):
    path, gguf = args.model, args.gguf_file
    if gguf is None and path.endswith(".gguf") and os.path.isfile(path):
        path, gguf = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = transformers.AutoTokenizer.from_pretrained(path, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[args.dtype], attn_implementation="sdpa", **kw)
    return tok, model.to(args.device).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="model directory, hub id or .gguf file "
                    "(default: a tiny random Llama)")
    ap.add_argument("--gguf-file", help="GGUF file name inside the model directory")
    ap.add_argument("--prompt", action="append",
                    help="prompt text (repeatable; needs a model with a tokenizer)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES),
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--select-fraction", type=float, default=0.1)
    ap.add_argument("--select-min-blocks", type=int, default=None)
    ap.add_argument("--rectify-interval", type=int, default=32)
    ap.add_argument("--cuda-graph", action="store_true", help="replay decode steps as CUDA graphs")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    if args.model is None:
        torch.set_num_threads(min(4, torch.get_num_threads()))
        model = tiny_model(args.seed).to(args.device, DTYPES[args.dtype])
        if args.device.startswith("cuda"):
            print("note: the tiny model has head_dim 32, which the CUDA backend does not take")
        tok = None
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (40, 23, 57)]
        # short contexts: small blocks so that decoding is really sparse
        block, n_min = args.block_size or 4, args.select_min_blocks or 2
        eos = None
    else:
        tok, model = load(args)
        texts = args.prompt or ["The history of the Roman Empire begins",
                                "def fibonacci(n):"]
        prompts = [tok(t).input_ids for t in texts]
        block, n_min = args.block_size or 16, args.select_min_blocks
        eos = model.generation_config.eos_token_id

    params = dict(block_size=block, select_fraction=args.select_fraction,
                  rectify_interval=args.rectify_interval,
                  max_tokens=max(4096, 2 * sum(len(p) + args.max_new_tokens for p in prompts)))
    if n_min is not None:
        params["select_min_blocks"] = n_min
    lm = ResaLM(model, cuda_graph=args.cuda_graph, **params)
    sampling = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p)

    t0 = time.perf_counter()
    gen = torch.Generator(device=args.device if args.sample else "cpu").manual_seed(args.seed)
    resa_out = lm.generate(prompts, args.max_new_tokens, eos_token_id=eos, generator=gen,
                           **sampling)
    t_resa = time.perf_counter() - t0

    # dense: transformers' own attention on the same model object (ResaLM switches the
    # model to its attention only while it runs), one prompt at a time (no padding)
    t0 = time.perf_counter()
    dense_out = []
    for p in prompts:
        kw = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p) if args.sample else dict(do_sample=False)
        if args.sample:
            torch.manual_seed(args.seed)
        with torch.no_grad():
            ids = model.generate(torch.tensor([p], device=model.device),
                                 max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=0 if tok is None else tok.pad_token_id or 0,
                                 **kw)
        dense_out.append(ids[0, len(p):].tolist())
    t_dense = time.perf_counter() - t0

    print(f"model: {args.model or 'tiny random Llama'} on {args.device} {args.dtype}; "
          f"libresa {lm.ctx.backend.name} backend, block {lm.ctx.get('block_size')}, "
          f"r {lm.ctx.get('select_fraction')}, n_min {lm.ctx.get('select_min_blocks')}, "
          f"rectify every {lm.ctx.get('rectify_interval')}")
    for i, (p, a, b) in enumerate(zip(prompts, resa_out, dense_out)):
        same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"\n--- prompt {i} ({len(p)} tokens); ReSA and dense agree on the first {same} "
              f"of {len(a)}/{len(b)} new tokens")
        if tok is not None:
            print("prompt: " + tok.decode(p))
            print("ReSA:   " + tok.decode(a))
            print("dense:  " + tok.decode(b))
        else:
            print(f"prompt: {p}")
            print(f"ReSA:   {a}")
            print(f"dense:  {b}")
    print(f"\nReSA {t_resa:.2f} s ({lm.stats}), dense {t_dense:.2f} s "
          "(tiny or short runs time Python, not attention)")
    lm.close()
    if tok is None and not args.sample:
        # random weights have no structure for the block selection to find, so sparse
        # decoding drifts at once; with r = 1 (every block) ReSA is dense attention
        with ResaLM(model, **dict(params, select_fraction=1.0)) as dense_lm:
            same = dense_lm.generate(prompts, args.max_new_tokens) == dense_out
        print(f"ReSA with select_fraction 1 gives the dense tokens: {same}")


if __name__ == "__main__":
    main()
