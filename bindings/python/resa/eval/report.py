# SPDX-License-Identifier: MIT
"""Summaries of a protocol run (protocol.run) as rows, CSV, JSON and markdown."""
import csv
import io
import json
import math

from . import metrics

ROW_FIELDS = ("variant", "text", "bucket", "tokens", "nll", "nll_dense", "dnll_pct",
              "dnll_se", "kl", "top1", "share", "share_rule", "kv_rel")


def _flat(steps, metric, rows):
    return [x for i in rows for x in steps[metric][i]]


def summarize(result):
    """Rows (dicts of ROW_FIELDS): per variant x (each text, "all") x (each bucket, "all").
    Means are over every scored token of the rows' sequences (W per sequence).
    dnll_se: standard error of the mean per-token NLL difference to dense (nats; tokens
    treated as independent, so it understates the real uncertainty)."""
    keys = result["keys"]
    ref = result["steps"][result["reference"]]
    texts = list(dict.fromkeys(t for t, _ in keys))
    buckets = list(dict.fromkeys(P for _, P in keys))
    out = []
    for v in result["variants"]:
        st = result["steps"][v.name]
        for text in texts + ["all"]:
            for bucket in buckets + ["all"]:
                rows = [i for i, (t, P) in enumerate(keys)
                        if text in ("all", t) and bucket in ("all", P)]
                nll = _flat(st, "nll", rows)
                nll_d = _flat(ref, "nll", rows)
                diff = [a - b for a, b in zip(nll, nll_d)]
                md = metrics.mean(diff)
                var = metrics.mean((x - md) ** 2 for x in diff) if len(diff) > 1 else 0.0
                share = _flat(st, "share", rows)
                mean_nll_d = metrics.mean(nll_d)
                out.append({
                    "variant": v.name, "text": text, "bucket": bucket, "tokens": len(nll),
                    "nll": metrics.mean(nll), "nll_dense": mean_nll_d,
                    "dnll_pct": 100.0 * md / mean_nll_d,
                    "dnll_se": math.sqrt(var / max(1, len(diff) - 1)),
                    "kl": metrics.mean(_flat(st, "kl", rows)),
                    "top1": metrics.mean(_flat(st, "agree", rows)),
                    "share": metrics.mean(share) if not any(math.isnan(x) for x in share) else float("nan"),
                    "share_rule": metrics.mean(_flat(st, "share_rule", rows)),
                    "kv_rel": metrics.mean(_flat(st, "kv_rel", rows)),
                })
    return out


def generation_rows(result):
    ref = result["reference"]
    gen = result["generation"]
    rows = []
    for name, per_text in gen.items():
        for text, toks in per_text.items():
            frac, first = metrics.greedy_agreement(gen[ref][text], toks)
            rows.append({"variant": name, "text": text, "tokens": len(toks),
                         "same_fraction": frac, "first_divergence": first})
    return rows


def to_csv(rows, fields=ROW_FIELDS):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields})
    return buf.getvalue()


def _get(rows, variant, text, bucket):
    for r in rows:
        if r["variant"] == variant and r["text"] == text and r["bucket"] == bucket:
            return r
    raise KeyError((variant, text, bucket))


def _table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def markdown(result, rows, gen_rows=None, meta=None):
    """The report: per-metric tables (texts pooled; columns = context buckets), a per-text
    table, the greedy-generation agreement, and the run's settings and timings."""
    variants = [v.name for v in result["variants"]]
    descr = {v.name: v.description for v in result["variants"]}
    ref = result["reference"]
    keys = result["keys"]
    texts = list(dict.fromkeys(t for t, _ in keys))
    buckets = list(dict.fromkeys(P for _, P in keys))
    W = result["window"]
    cols = [f"P={P}" for P in buckets] + ["all"]
    bvals = buckets + ["all"]
    parts = []
    if meta:
        parts.append("Settings: " + ", ".join(f"{k} {v}" for k, v in meta.items()) + ".")

    def metric_table(title, fmt, note=""):
        body = []
        for v in variants:
            body.append([v] + [fmt(_get(rows, v, "all", b)) for b in bvals])
        parts.append(f"**{title}** ({', '.join(texts)} pooled; {W} decoded tokens after a "
                     f"dense prefill of P tokens){note}\n\n" + _table(["variant"] + cols, body))

    metric_table("NLL of the true next token, nats (change vs dense)",
                 lambda r: f"{r['nll']:.4f}" if r["variant"] == ref
                 else f"{r['nll']:.4f} ({r['dnll_pct']:+.2f}%)")
    metric_table("KL(dense || variant), nats per token, mean", lambda r: f"{r['kl']:.5f}")
    metric_table("Top-1 agreement with dense", lambda r: f"{100 * r['top1']:.2f}%")
    metric_table("Blocks attended per decode step",
                 lambda r: f"{100 * (r['share'] if not math.isnan(r['share']) else r['share_rule']):.1f}%",
                 "; measured with RECORD_SELECTION" if result.get("record_selection") else
                 "; from the budget rule")
    metric_table("K/V bytes read per decode step, relative to dense",
                 lambda r: f"{r['kv_rel']:.3f}",
                 f"; formula in resa/eval/metrics.py, {result['kv_bytes']}-byte K/V, "
                 f"head_dim {result['head_dim']}, b={result['block_size']}")

    body = []
    for v in variants:
        row = [v, descr[v]]
        for t in texts:
            r = _get(rows, v, t, "all")
            rl = _get(rows, v, t, buckets[-1])
            row += [f"{r['dnll_pct']:+.2f}%", f"{rl['dnll_pct']:+.2f}%", f"{r['kl']:.4f}",
                    f"{100 * r['top1']:.1f}%"]
        body.append(row)
    header = ["variant", "what"]
    for t in texts:
        header += [f"{t}: ΔNLL all P", f"ΔNLL P={buckets[-1]}", "KL", "top-1"]
    parts.append("**Per text** (dense NLL: " + ", ".join(
        f"{t} {_get(rows, ref, t, 'all')['nll']:.4f}" for t in texts) + ")\n\n" +
        _table(header, body))

    if gen_rows:
        body = [[g["variant"], g["text"], g["tokens"], f"{100 * g['same_fraction']:.1f}%",
                 "none" if g["first_divergence"] is None else g["first_divergence"]]
                for g in gen_rows if g["variant"] != ref]
        parts.append(f"**Greedy generation vs dense** ({result['gen_prompt_len']}-token prompt "
                     f"from each text)\n\n" + _table(
                         ["variant", "text", "tokens", "same token at same position",
                          "first divergence (0-based)"], body))
    return "\n\n".join(parts) + "\n"


def to_json(result, rows, gen_rows, meta):
    doc = {"meta": meta, "reference": result["reference"], "window": result["window"],
           "keys": [list(k) for k in result["keys"]],
           "variants": [vars(v) for v in result["variants"]],
           "summary": rows, "generation": gen_rows,
           "generated_tokens": result["generation"], "timings": result["timings"]}
    return json.dumps(doc, indent=1, default=str)
