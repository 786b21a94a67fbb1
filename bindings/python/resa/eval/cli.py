# SPDX-License-Identifier: MIT
"""resa-eval: ReSA's quality on a real model (docs/quality.md).

    resa-eval                       # the full table: both texts, all variants (CPU fp32)
    resa-eval --quick               # a few hundred tokens, dense and ReSA
    resa-eval --device cuda --dtype bfloat16 --out gpu-bf16
    resa-eval --smoke               # is it the real model? greedy text + NLL, no libresa
    resa-eval --save-hf DIR         # the model as a transformers directory (bf16)
"""
import argparse
import json
import pathlib
import sys
import time


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def parser():
    p = argparse.ArgumentParser(prog="resa-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF file, or a directory with one, or a transformers "
                   "directory (default: $RESA_MODELS or ~/.cache/resa, see scripts/fetch-model.sh)")
    p.add_argument("--gguf-loader", choices=("auto", "transformers", "builtin"), default="auto",
                   help="GGUF weights through transformers (needs accelerate) or the built-in "
                   "dequantizer; auto: transformers, else built-in (default auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model and K/V dtype (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--texts", default=None,
                   help="comma-separated text names ($RESA_TEXTS/NAME.txt, see "
                   "scripts/fetch-texts.sh) or paths (default austen-persuasion,debian-reference)")
    p.add_argument("--window", type=int, default=None, help="decoded tokens per bucket (default 256)")
    p.add_argument("--buckets", type=_ints, default=None,
                   help="context lengths P of the dense prefill (default 512,1024,2048,4096,"
                   "MAX-W-1 with MAX the model's positions)")
    p.add_argument("--variants", default=None,
                   help="comma-separated presets (dense, sparse, resa, resa-r0.05, resa-r0.2, "
                   "resa-f8, resa-f128, resa-sink1, resa-fp8, floor; 'full'; 'quick') or "
                   "NAME:r=0.3;f=16 (default full)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="greedy tokens generated per variant and text (default 256; 0: none)")
    p.add_argument("--gen-bucket", type=int, default=None,
                   help="prompt length of the generation, one of the buckets (default 4096 if "
                   "it is one, else the largest)")
    p.add_argument("--gen-variants", default="dense,sparse,resa")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and libresa CPU threads (default: their defaults)")
    p.add_argument("--kv-dtype", choices=("model", "fp8"), default="model",
                   help="KV_DTYPE of every variant's context, dense included: the model's "
                   "dtype, or fp8 (RESA_DTYPE_FP8_E4M3, per-token scales; docs/API.md). The "
                   "bytes column still counts the model dtype's K/V (default model)")
    p.add_argument("--block-size", type=int, default=16,
                   help="BLOCK_SIZE b of every variant's context (a power of two; default 16)")
    p.add_argument("--no-record-selection", action="store_true",
                   help="blocks attended from the budget rule instead of RECORD_SELECTION")
    p.add_argument("--no-reference-check", action="store_true",
                   help="skip comparing the dense variant's NLL with a plain transformers forward")
    p.add_argument("--out", default="resa-eval-out", help="output directory (default resa-eval-out)")
    p.add_argument("--quick", action="store_true",
                   help="one text, P=384, W=64, dense and resa, 32 generated tokens")
    p.add_argument("--smoke", action="store_true",
                   help="no libresa: a greedy continuation of a short prompt and the NLL of "
                   "each text's first 1024 tokens through the plain model, then exit")
    p.add_argument("--save-hf", metavar="DIR",
                   help="write the loaded model as a transformers directory and exit")
    p.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    return p


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def smoke(model, tokenizer, text_names, device):
    import torch
    from . import data, metrics
    for prompt in ("The capital of France is", "Once upon a time, in a small village,"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)
        log(f"greedy: {tokenizer.decode(out[0])!r}")
    for name in text_names:
        toks = data.load_tokens(tokenizer, name, 1025)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([toks[:1024]], device=device)).logits[0]
        nll = metrics.nll(metrics.log_probs(logits), toks[1:1025]).mean().item()
        log(f"{name}: NLL of tokens 1..1024 = {nll:.4f} nats/token (perplexity {2.718281828 ** nll:.1f})")


def main(argv=None):
    args = parser().parse_args(argv)
    import torch
    from . import data, protocol, report

    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tokenizer = data.load_model(args.model, dtype=dtype, device=args.device,
                                       loader=args.gguf_loader, log=log)
    log(f"model: {data.find_model(args.model)[1]} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters, {dtype}, {args.device}), loaded in {time.perf_counter() - t_start:.1f} s")

    if args.save_hf:
        sizes = data.save_hf(model, tokenizer, args.save_hf, dtype=args.save_dtype)
        for name, size in sizes.items():
            log(f"{args.save_hf}/{name}: {size} bytes")
        log(f"total {sum(sizes.values())} bytes ({sum(sizes.values()) / 2**20:.1f} MiB)")
        return 0

    text_names = args.texts.split(",") if args.texts else list(data.DEFAULT_TEXTS)
    if args.smoke:
        smoke(model, tokenizer, text_names, args.device)
        return 0

    max_pos = int(getattr(model.config, "max_position_embeddings", 8192))
    if args.quick:
        text_names = text_names[:1]
        window = args.window or 64
        buckets = args.buckets or [384]
        variants = protocol.parse_variants(args.variants or "quick")
        gen_tokens = 32 if args.gen_tokens is None else args.gen_tokens
    else:
        window = args.window or 256
        buckets = args.buckets or [512, 1024, 2048, 4096, max_pos - window - 1]
        variants = protocol.parse_variants(args.variants or "full")
        gen_tokens = 256 if args.gen_tokens is None else args.gen_tokens
    if max(buckets) + window > max_pos:
        raise SystemExit(f"bucket {max(buckets)} + window {window} exceeds the model's {max_pos} positions")
    gen_bucket = args.gen_bucket or (4096 if 4096 in buckets else max(buckets))

    need = max(buckets) + window + 1
    texts = {data.text_name(n): data.load_tokens(tokenizer, n, need) for n in text_names}
    log(f"texts: {', '.join(texts)} ({need} tokens each); buckets {buckets}; window {window}; "
        f"variants {', '.join(v.name for v in variants)}")

    resa_params = {}
    if args.kv_dtype == "fp8":
        resa_params["kv_dtype"] = "fp8_e4m3"
    if args.threads and args.device == "cpu":
        resa_params["num_threads"] = args.threads
    result = protocol.run(model, texts, buckets, window, variants, gen_tokens=gen_tokens,
                          gen_bucket=gen_bucket,
                          gen_variants=[s for s in args.gen_variants.split(",") if s],
                          record_selection=not args.no_record_selection,
                          block_size=args.block_size, resa_params=resa_params, log=log)

    checks = []
    if not args.no_reference_check:
        ref = result["steps"][result["reference"]]["nll"]
        P0 = min(buckets)
        for i, (t, P) in enumerate(result["keys"]):
            if P != P0:
                continue
            plain = protocol.reference_nll(model, texts[t], P, window)
            diff = max(abs(a - b) for a, b in zip(plain, ref[i]))
            mean_plain = sum(plain) / len(plain)
            checks.append({"text": t, "bucket": P, "plain_nll": mean_plain,
                           "libresa_dense_nll": sum(ref[i]) / len(ref[i]), "max_abs_diff": diff})
            log(f"reference check {t} P={P}: plain transformers NLL {mean_plain:.5f}, dense "
                f"through libresa {sum(ref[i]) / len(ref[i]):.5f}, max per-token |diff| {diff:.2e}")

    rows = report.summarize(result)
    gen_rows = report.generation_rows(result) if result["generation"] else []
    elapsed = time.perf_counter() - t_start
    meta = {"model": data.find_model(args.model)[1].name, "device": args.device, "dtype": dtype,
            "texts": ",".join(texts), "window": window, "buckets": ",".join(map(str, buckets)),
            "block size": args.block_size, "kv dtype": args.kv_dtype,
            "threads": args.threads or torch.get_num_threads(),
            "wall time": f"{elapsed / 60:.1f} min"}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report.markdown(result, rows, gen_rows, meta)
    if checks:
        md += "\nDense through libresa vs a plain transformers forward (P=%d): %s\n" % (
            min(buckets), "; ".join(f"{c['text']} {c['libresa_dense_nll']:.5f} vs {c['plain_nll']:.5f} "
                                     f"(max per-token |diff| {c['max_abs_diff']:.1e})" for c in checks))
    t = result["timings"]
    md += ("\nTimings: prefill " + ", ".join(f"{k} {v:.0f} s" for k, v in t["prefill"].items()) +
           "; decode+rectify per variant " + ", ".join(
               f"{k} {t['decode'][k] + t['rectify'][k]:.0f} s" for k in t["decode"]) +
           f"; generation {t['generation']:.0f} s; total {elapsed:.0f} s.\n")
    (out / "results.md").write_text(md)
    (out / "results.csv").write_text(report.to_csv(rows))
    doc = report.to_json(result, rows, gen_rows, meta)
    doc = json.loads(doc)
    doc["reference_check"] = checks
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    try:
        import numpy as np
        arrays = {f"{v}.{m}": np.array(a, dtype=np.float64)
                  for v, per in result["steps"].items() for m, a in per.items()}
        np.savez_compressed(out / "steps.npz", **arrays)
    except ImportError:
        pass
    print(md)
    log(f"wrote {out}/results.md, results.csv, results.json, steps.npz ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
