# SPDX-License-Identifier: MIT
"""The teacher-forced evaluation protocol of resa-eval (docs/quality.md).

For every text and context bucket P, one sequence: the first P tokens of the text are
prefilled densely (APPEND) through :class:`resa.hf.ResaLM`, then the next W tokens are fed
one DECODE step at a time (teacher forcing), every sequence of every text in the same
step, with ResaLM's automatic rectification.  Each variant (a set of ReSA parameters)
decodes its own copy of those sequences, forked from the prefilled ones after the
prefill (copy-on-write pages: the prefill runs once per context, not once per variant),
and all variants advance in lockstep, the dense reference (select_fraction 1.0: every
decode step attends every block) first, so per-step KL(dense || variant) and top-1
agreement need no stored logits.  Variants that differ only in parameters that may change
between steps share one libresa context (their parameters are set before their step);
fp8 summaries (SUMMARY_FORMAT locks at the first sequence) get a context of their own,
with its own dense prefill.

Greedy generation: from the prefill of one bucket (a real-text prompt), each generation
variant picks argmax tokens for N steps; its tokens are compared with the dense variant's.
"""
import dataclasses
import math
import time

from . import metrics

__all__ = ["Variant", "PRESETS", "FULL", "QUICK", "parse_variants", "fork_sequence",
           "run", "reference_nll"]


@dataclasses.dataclass
class Variant:
    name: str
    select_fraction: float = 0.1
    rectify_interval: int = 32
    sink_blocks: int = 0
    score_width: float = 1.0
    group_score: int = 0
    local_blocks: int = 1
    select_min_blocks: int = 16
    fp8_summaries: bool = False
    description: str = ""

    @property
    def dense(self):
        return self.select_fraction >= 1.0

    @property
    def group(self):
        """Variants of one group share a libresa context (and its prefill)."""
        return "fp8" if self.fp8_summaries else "kv"

    def step_params(self):
        return {"select_fraction": float(self.select_fraction),
                "rectify_interval": int(self.rectify_interval),
                "sink_blocks": int(self.sink_blocks),
                "score_width": float(self.score_width),
                "group_score": int(self.group_score),
                "local_blocks": int(self.local_blocks),
                "select_min_blocks": int(self.select_min_blocks)}

    def budget_kwargs(self, block_size):
        return {"block_size": block_size, "fraction": self.select_fraction,
                "min_blocks": self.select_min_blocks, "local_blocks": self.local_blocks,
                "sink_blocks": self.sink_blocks}


def _preset(name, description, **kw):
    return name, Variant(name, description=description, **kw)


PRESETS = dict([
    _preset("dense", "every decode step attends all blocks (the reference)",
            select_fraction=1.0, rectify_interval=0),
    _preset("sparse", "block-sparse, no rectification (the paper's 'sparse'): r=0.1, f=0",
            rectify_interval=0),
    _preset("resa", "ReSA, the paper's defaults: r=0.1, f=32"),
    _preset("resa-r0.05", "ReSA r=0.05, f=32", select_fraction=0.05),
    _preset("resa-r0.2", "ReSA r=0.2, f=32", select_fraction=0.2),
    _preset("resa-f8", "ReSA r=0.1, f=8", rectify_interval=8),
    _preset("resa-f128", "ReSA r=0.1, f=128", rectify_interval=128),
    _preset("resa-sink1", "ReSA r=0.1, f=32, the first block always attended",
            sink_blocks=1),
    _preset("resa-fp8", "ReSA r=0.1, f=32, fp8 e4m3 block summaries",
            fp8_summaries=True),
    _preset("floor", "r=0.1, rectified after every token (f=1): the error of one sparse "
            "step on an exact cache, no drift", rectify_interval=1),
    _preset("resa-defaults", "libresa's defaults since 0.3.0: r=0.15, f=128, fp8 summaries, "
            "the first block always attended, score width 0.5",
            select_fraction=0.15, rectify_interval=128, fp8_summaries=True, sink_blocks=1,
            score_width=0.5),
])
FULL = tuple(PRESETS)
QUICK = ("dense", "resa")

_FIELDS = {"select_fraction": float, "r": float, "rectify_interval": int, "f": int,
           "sink_blocks": int, "sink": int, "local_blocks": int,
           "score_width": float, "w": float, "group_score": int, "gs": int,
           "select_min_blocks": int, "n_min": int, "fp8_summaries": int, "fp8": int}
_ALIASES = {"r": "select_fraction", "f": "rectify_interval", "sink": "sink_blocks", "w": "score_width",
            "gs": "group_score",
            "n_min": "select_min_blocks", "fp8": "fp8_summaries"}


def parse_variants(spec):
    """Variants from a comma-separated list of preset names ("full" and "quick" expand),
    or custom ones as NAME:key=value;key=value on top of the "resa" preset, e.g.
    "r0.3:r=0.3;f=16" (keys: r/select_fraction, f/rectify_interval, sink/sink_blocks, w/score_width,
    gs/group_score (0 pooled, 1 per-head shares),
    local_blocks, n_min/select_min_blocks, fp8/fp8_summaries)."""
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    out = []
    for item in items:
        if item == "full":
            out += [PRESETS[n] for n in FULL]
        elif item == "quick":
            out += [PRESETS[n] for n in QUICK]
        elif ":" in item:
            name, _, body = item.partition(":")
            kw = {}
            for pair in filter(None, body.split(";")):
                key, _, value = pair.partition("=")
                key = key.strip()
                if key not in _FIELDS:
                    raise ValueError(f"variant {name!r}: unknown key {key!r} (known: {sorted(_FIELDS)})")
                kw[_ALIASES.get(key, key)] = _FIELDS[key](value)
            if "fp8_summaries" in kw:
                kw["fp8_summaries"] = bool(kw["fp8_summaries"])
            out.append(dataclasses.replace(PRESETS["resa"], name=name, description=item, **kw))
        elif item in PRESETS:
            out.append(PRESETS[item])
        else:
            raise ValueError(f"unknown variant {item!r} (presets: {', '.join(PRESETS)}, "
                             f"full, quick, or NAME:key=value;...)")
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    return out


def fork_sequence(lm, seq):
    """A copy of a ResaLM sequence (same cache, length, pending count and token
    history).  Uses lm.fork when ResaLM has it; else the context's seq_fork and
    ResaLM's per-sequence token history (a private attribute of resa.hf, named here
    only until ResaLM offers fork)."""
    if hasattr(lm, "fork"):
        return lm.fork(seq)
    child = lm.ctx.seq_fork(seq)
    lm._history[child] = list(lm._history[seq])
    return child


def _apply(lm, variant):
    for key, value in variant.step_params().items():
        lm.ctx.set(key, value)


def reference_nll(model, tokens, start, window):
    """NLL of tokens[start+1 .. start+window] from one plain forward of the model (its own
    attention implementation, no libresa) over tokens[:start+window]: the numbers the
    dense variant's decode steps must reproduce."""
    import torch
    device = next(model.parameters()).device
    ids = torch.tensor([tokens[:start + window]], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=window).logits[0]
    logp = metrics.log_probs(logits)
    return metrics.nll(logp, tokens[start + 1:start + window + 1]).cpu().tolist()


def run(model, texts, buckets, window, variants, *, gen_tokens=0, gen_bucket=None,
        gen_variants=("dense", "sparse", "resa"), record_selection=True, block_size=16,
        resa_params=None, log=print):
    """Runs the protocol.  texts: {name: token ids (at least max(buckets) + window + 1)}.
    Returns a dict (see cli.py for how it is reported):
      keys: [(text, bucket)] in sequence order;
      steps: {variant: {"nll", "kl", "agree", "share", "share_rule", "kv_rel": [S][W]}};
      generation: {variant: {text: tokens}} and gen_prompt_len;
      timings (seconds): prefill per group, decode per variant, generation."""
    import torch
    from ..hf import ResaLM

    resa_params = dict(resa_params or {})
    variants = list(variants)
    if not any(v.dense for v in variants):
        variants.insert(0, PRESETS["dense"])
    # The dense reference steps first in every lockstep round.
    variants.sort(key=lambda v: not v.dense)
    ref_name = next(v.name for v in variants if v.dense)
    gen_names = [n for n in gen_variants if any(v.name == n for v in variants)] if gen_tokens else []
    if gen_tokens and ref_name not in gen_names:
        gen_names.insert(0, ref_name)
    if gen_tokens:
        gen_bucket = gen_bucket if gen_bucket is not None else max(buckets)
        if gen_bucket not in buckets:
            raise ValueError(f"generation bucket {gen_bucket} is not one of the buckets {buckets}")

    keys = [(t, P) for t in texts for P in buckets]
    need = max(buckets) + window + 1
    for t, ids in texts.items():
        if len(ids) < need:
            raise ValueError(f"text {t!r}: {len(ids)} tokens, need {need}")
    S, W = len(keys), int(window)
    groups = {}
    for v in variants:
        groups.setdefault(v.group, []).append(v)

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes = next(model.parameters()).element_size()
    timings = {"prefill": {}, "decode": {v.name: 0.0 for v in variants},
               "rectify": {v.name: 0.0 for v in variants}, "generation": 0.0,
               "rectify_seqs": {v.name: 0 for v in variants}}
    lms, seqs, gen_seqs, gen_tokens_out, gen_first = {}, {}, {}, {}, {}
    try:
        for group, members in groups.items():
            n_prefill = sum(P for _, P in keys)
            n_forks = S * len(members)
            n_gen = sum(1 for v in members if v.name in gen_names) * len(texts)
            pages = lambda n: (n + block_size - 1) // block_size + 1  # noqa: E731
            max_tokens = block_size * (sum(pages(P) for _, P in keys)
                                       + n_forks * pages(W + block_size)
                                       + n_gen * pages(gen_tokens + block_size)) + 64 * block_size
            params = dict(resa_params, block_size=block_size,
                          record_selection=1 if record_selection else 0)
            if group == "fp8":
                import resa
                params["summary_format"] = int(resa.SummaryFormat.FP8_E4M3)
            lm = ResaLM(model, max_tokens=max_tokens, max_sequences=S + n_forks + n_gen + 8,
                        **params)
            lms[group] = lm
            t0 = time.perf_counter()
            parents, logits = lm.prefill([texts[t][:P] for t, P in keys])
            timings["prefill"][group] = time.perf_counter() - t0
            log(f"prefill [{group} summaries]: {S} sequences, {n_prefill} tokens, "
                f"{timings['prefill'][group]:.1f} s")
            for v in members:
                seqs[v.name] = [fork_sequence(lm, p) for p in parents]
                if v.name in gen_names:
                    rows = [i for i, (_, P) in enumerate(keys) if P == gen_bucket]
                    gen_seqs[v.name] = [fork_sequence(lm, parents[i]) for i in rows]
                    gen_first[v.name] = logits[rows].argmax(dim=-1).tolist()
            lm.release(parents)

        by_name = {v.name: v for v in variants}
        steps = {v.name: {k: [[math.nan] * W for _ in range(S)]
                          for k in ("nll", "kl", "agree", "share", "share_rule", "kv_rel")}
                 for v in variants}
        t_loop = time.perf_counter()
        for j in range(W):
            tokens = [texts[t][P + j] for t, P in keys]
            targets = [texts[t][P + j + 1] for t, P in keys]
            lengths = [P + j + 1 for _, P in keys]
            ref_logp = ref_logits = None
            for v in variants:
                lm = lms[v.group]
                _apply(lm, v)
                t0 = time.perf_counter()
                logits = lm.decode(seqs[v.name], tokens, auto_rectify=False)
                t1 = time.perf_counter()
                due = [s for s in seqs[v.name] if lm.ctx.seq_rectify_due(s)]
                if due:
                    lm.rectify(due)
                    timings["rectify_seqs"][v.name] += len(due)
                t2 = time.perf_counter()
                timings["decode"][v.name] += t1 - t0
                timings["rectify"][v.name] += t2 - t1
                logp = metrics.log_probs(logits)
                if ref_logp is None:
                    ref_logp, ref_logits = logp, logits
                rec = steps[v.name]
                nll = metrics.nll(logp, targets).cpu().tolist()
                kl = metrics.kl(ref_logp, logp).cpu().tolist()
                agree = metrics.top1_agree(ref_logits, logits).cpu().tolist()
                for i, s in enumerate(seqs[v.name]):
                    L = lengths[i]
                    M = metrics.blocks_for(L, block_size)
                    n_rule = metrics.select_budget(M, v.select_fraction, v.select_min_blocks,
                                                   v.local_blocks, v.sink_blocks)
                    rec["nll"][i][j] = nll[i]
                    rec["kl"][i][j] = max(kl[i], 0.0) if v.name != ref_name else 0.0
                    rec["agree"][i][j] = agree[i]
                    rec["share_rule"][i][j] = n_rule / M
                    if record_selection:
                        rec["share"][i][j] = len(lm.ctx.selected_blocks(s, 0, 0)) / M
                    rec["kv_rel"][i][j] = metrics.kv_bytes_relative(
                        L, head_dim=head_dim, kv_bytes=kv_bytes,
                        rectify_interval=v.rectify_interval, fp8_summaries=v.fp8_summaries,
                        **{k: x for k, x in v.budget_kwargs(block_size).items()})
            if (j + 1) % max(1, W // 8) == 0 or j + 1 == W:
                el = time.perf_counter() - t_loop
                log(f"decode step {j + 1}/{W}: {el:.0f} s, about {el / (j + 1) * (W - j - 1):.0f} s left")

        if record_selection:  # every layer and KV head attends the same number of blocks
            for v in variants:
                lm = lms[v.group]
                for i, s in enumerate(seqs[v.name]):
                    counts = {len(lm.ctx.selected_blocks(s, layer, h))
                              for layer in range(config.num_hidden_layers)
                              for h in range(config.num_key_value_heads)}
                    want = steps[v.name]["share_rule"][i][-1] * metrics.blocks_for(
                        keys[i][1] + W, block_size)
                    if counts != {round(want)}:
                        log(f"warning: {v.name} {keys[i]}: selected block counts {sorted(counts)} "
                            f"at the last step, budget rule {want:.0f}")

        if gen_names:
            t0 = time.perf_counter()
            cur = {}
            for name in gen_names:
                gen_tokens_out[name] = [[t] for t in gen_first[name]]
                cur[name] = list(gen_first[name])
            for _ in range(gen_tokens - 1):
                for name in gen_names:
                    v = by_name[name]
                    lm = lms[v.group]
                    _apply(lm, v)
                    nxt = lm.decode(gen_seqs[name], cur[name]).argmax(dim=-1).tolist()
                    for i, t in enumerate(nxt):
                        gen_tokens_out[name][i].append(t)
                    cur[name] = nxt
            timings["generation"] = time.perf_counter() - t0
            log(f"greedy generation: {len(gen_names)} variants x {len(texts)} texts x "
                f"{gen_tokens} tokens, {timings['generation']:.1f} s")
    finally:
        for lm in lms.values():
            lm.close()

    text_names = list(texts)
    generation = {name: {text_names[i]: toks for i, toks in enumerate(gen_tokens_out[name])}
                  for name in gen_names}
    return {"keys": keys, "window": W, "variants": variants, "reference": ref_name,
            "steps": steps, "generation": generation, "gen_prompt_len": gen_bucket if gen_names else None,
            "timings": timings, "head_dim": head_dim, "kv_bytes": kv_bytes,
            "block_size": block_size, "record_selection": bool(record_selection)}
