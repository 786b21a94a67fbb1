#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Block-selection levers on a real model, simulated in torch (not libresa), all
positions of a text in one teacher-forced forward pass per variant.

Two modes (docs/quality.md, "levers"):
  sparse  every position from P on attends only its selected blocks, over keys and
          values that earlier positions computed the same way: block-sparse decoding
          with no rectification (f = infinity), teacher-forced.
  floor   every position from P on attends only its selected blocks, over the keys and
          values of a dense pass (its own token's from this pass): rectification after
          every token, i.e. the error of the sparse attention alone.
With "rerank": c, the attended-share column counts K and V halves: (n + ceil(c n)) / 2
of the blocks, the bytes of reading the candidates' keys and the chosen blocks' values.
Selection follows docs/API.md (blocks of b aligned to position 0, min/max summaries,
pooled group query, budget n = max(ceil(r*M), min(M, n_min)), forced local and sink
blocks), with levers that libresa may not have: per-layer r, an oracle score (true
attention mass: the upper bound of any score at that n), block summaries in other
formats ("summary": exact, fp8 (libresa's), e2m1, int4, int4s; SUMMARY_FORMATS).  Use it to choose which lever
to build; measure what ships with resa-eval through libresa.

  bench/quality/sparse_sim.py --text austen-persuasion --tokens 8192 --start 1024 \
      --variants '[{"mode":"floor"},{"mode":"floor","sink":1}]' [--device cuda]
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0] + "/bindings/python")
from resa.eval import data  # noqa: E402

DEFAULTS = dict(mode="floor", b=16, r=0.1, nmin=16, local=1, sink=0, score="pooled",
                summary="exact")


def _e4m3_grid():
    sub = [k * 2.0 ** -9 for k in range(8)]
    return sub + [(8 + m) * 2.0 ** (e - 10) for e in range(1, 16) for m in range(8)][:-1]


# Block summary formats (min/max scored from their outward rounding): the
# non-negative magnitudes a code holds, the largest of them (a block's scale
# puts its largest |key| at or below it), whether that scale is a power of two
# (one exponent byte) or any (counted as 2 bytes, an fp16; the simulation keeps
# it in fp32), and bits a value.  "fp8" is libresa's RESA_SUMMARY_FP8_E4M3
# (lib/summary_fp8.h): its bounds equal that codec's, checked on 400 random
# blocks over scales 2^-20 .. 2^20 (2026-12-07).
SUMMARY_FORMATS = {
    "fp8": (_e4m3_grid(), 448.0, True, 8),
    "e2m1": ([0, 0.5, 1, 1.5, 2, 3, 4, 6], 6.0, True, 4),   # OCP fp4
    "int4": (list(range(8)), 7.0, True, 4),                   # sign and 3-bit magnitude
    "int4s": (list(range(8)), 7.0, False, 4),                 # the same, scale amax / 7
}


def summary_bytes(fmt, d):
    """Bytes of one block's summary (kmin and kmax) for one KV head."""
    if fmt == "exact":
        return 2 * d * 2  # a 16-bit cache's summaries
    _, _, pow2, bits = SUMMARY_FORMATS[fmt]
    return 2 * d * bits // 8 + (1 if pow2 else 2)


def round_summary(kmin, kmax, fmt):
    """kmin, kmax [..., d] rounded outward (kmin down, kmax up) to fmt's grid
    under one scale per block (the last dimension): the box only grows, as
    libresa's fp8 summaries (lib/summary_fp8.h) keep the score an upper bound."""
    if fmt == "exact":
        return kmin, kmax
    grid, top, pow2, _ = SUMMARY_FORMATS[fmt]
    g = torch.tensor(grid, dtype=torch.float64, device=kmin.device)
    amax = torch.maximum(kmin.abs(), kmax.abs()).amax(-1, keepdim=True).double()
    if pow2:  # the smallest 2^s with amax 2^-s <= top
        sc = torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / top)))
        sc = torch.where(amax / sc > top, sc * 2, sc)
    else:
        sc = amax.clamp(min=1e-30) / top

    def up(a):  # smallest grid value >= a (a >= 0)
        return g[torch.searchsorted(g, a.contiguous()).clamp(max=len(grid) - 1)]

    def down(a):  # largest grid value <= a (a >= 0)
        return g[(torch.searchsorted(g, a.contiguous(), right=True) - 1).clamp(min=0)]

    lo, hi = kmin.double() / sc, kmax.double() / sc
    lo = torch.where(lo >= 0, down(lo.clamp(min=0)), -up((-lo).clamp(min=0)))
    hi = torch.where(hi >= 0, up(hi.clamp(min=0)), -down((-hi).clamp(min=0)))
    return (lo * sc).to(kmin.dtype), (hi * sc).to(kmax.dtype)


class Sim:
    def __init__(self, model, start):
        self.model, self.start, self.cfg, self.dense_kv, self.pca = model, start, None, {}, {}

    def causal(self, t0, c, t_all, dev):
        t = torch.arange(t0, t0 + c, device=dev)[:, None]
        j = torch.arange(t_all, device=dev)[None, :]
        return torch.zeros(c, t_all, device=dev).masked_fill(j > t, -float("inf"))

    def block_mask(self, q, k, t0, c, layer, scaling):
        """[Hkv, c, M] bool: the blocks each query row t0..t0+c attends."""
        cfg = self.cfg
        hq, d = q.shape[0], q.shape[-1]
        hkv, t_all = k.shape[0], k.shape[1]
        g, b = hq // hkv, cfg["b"]
        m = (t_all + b - 1) // b
        pad = m * b - t_all
        dev = q.device
        qg = q[:, t0:t0 + c].view(hkv, g, c, d)
        if cfg["score"] == "oracle":
            p = torch.softmax(torch.einsum("hgcd,htd->hgct", qg, k) * scaling
                              + self.causal(t0, c, t_all, dev)[None, None], -1)
            s = F.pad(p, (0, pad)).view(hkv, g, c, m, b).sum(-1)
            s = s.amax(1) if cfg.get("group") == "max" else s.mean(1)
        elif cfg["score"] == "lowrank":
            # a per-token key sketch: the keys' top `rank` principal directions of
            # this (layer, KV head), fitted on the prefill [0, start); each query
            # head's approximate logits over every token, a block's log-sum-exp
            # over its tokens, and the group's estimated shares summed (as head
            # share).  Bytes: rank values a token (fp8: 1 byte each, plus a scale)
            # against 2 d K/V values; min/max fp8 summaries are 2 d / b a token.
            rk = cfg.get("rank", 8)
            if layer not in self.pca:
                kf = k[:, :self.start]
                mu = kf.mean(1, keepdim=True)
                cov = torch.einsum("htd,hte->hde", kf - mu, kf - mu) / kf.shape[1]
                self.pca[layer] = (mu, torch.linalg.eigh(cov)[1][..., -rk:])
            mu, u = self.pca[layer]
            sk = torch.einsum("htd,hdr->htr", k - mu, u)
            if cfg.get("fp8"):  # e4m3 with one fp32 scale a token
                sc = sk.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 448.0
                sk = (sk / sc).to(torch.float8_e4m3fn).float() * sc
            st = torch.einsum("hgcr,htr->hgct", torch.einsum("hgcd,hdr->hgcr", qg, u), sk) * scaling
            st = st + self.causal(t0, c, t_all, dev)[None, None]
            sb = torch.logsumexp(F.pad(st, (0, pad), value=-float("inf")).view(hkv, g, c, m, b), -1)
            s = torch.logsumexp(sb - torch.logsumexp(sb, -1, keepdim=True), 1)
            s = torch.nan_to_num(s, nan=-float("inf"))
        elif cfg["score"] in ("centroid", "meanvar"):
            # per block the mean key (and per-dimension variance): d (2 d) values
            kp = F.pad(k, (0, 0, 0, pad)).view(hkv, m, b, d)
            cnt = torch.full((m,), float(b), device=dev)
            cnt[-1] = b - pad
            mu = kp.sum(2) / cnt[None, :, None]
            qp = qg.mean(1)
            s = torch.einsum("hcd,hmd->hcm", qp, mu)
            if cfg["score"] == "meanvar":  # log E[exp(q.k)] of a Gaussian block, in logit units
                var = (kp * kp).sum(2) / cnt[None, :, None] - mu * mu
                s = s + 0.5 * scaling * torch.einsum("hcd,hmd->hcm", qp * qp, var.clamp(min=0))
        else:
            kmax = F.pad(k, (0, 0, 0, pad), value=-1e30).view(hkv, m, b, d).amax(2)
            kmin = F.pad(k, (0, 0, 0, pad), value=1e30).view(hkv, m, b, d).amin(2)
            kmin, kmax = round_summary(kmin, kmax, cfg["summary"])
            # a block's summary at decode time covers its keys up to the query; only
            # the query's own block is partial, and it is always forced
            # bound = q.mid + sum |q| * half-width; alpha scales the width term
            # (1: the paper's upper bound, 0: the midpoint of the box)
            mid, half = (kmax + kmin) / 2, (kmax - kmin) / 2
            alpha = cfg.get("alpha", 1.0)
            group = cfg.get("group", "pooled")
            if group == "pooled":  # one score from the mean query of the group
                qp = qg.mean(1)
                s = torch.einsum("hcd,hmd->hcm", qp, mid) + alpha * torch.einsum("hcd,hmd->hcm", qp.abs(), half)
            else:  # every query head scores every block; the group combines them
                sh = (torch.einsum("hgcd,hmd->hgcm", qg, mid)
                      + alpha * torch.einsum("hgcd,hmd->hgcm", qg.abs(), half)) * scaling
                t = torch.arange(t0, t0 + c, device=dev)
                valid = torch.arange(m, device=dev)[None, :] < (t // b + 1)[:, None]
                sh = sh.masked_fill(~valid[None, None], -float("inf"))
                if group == "max":  # the best head's raw score
                    s = sh.amax(1)
                elif group == "lse":  # estimated attention share, summed over heads
                    s = torch.logsumexp(sh - torch.logsumexp(sh, -1, keepdim=True), 1)
                elif group == "maxnorm":  # the best head's estimated share
                    s = (sh - torch.logsumexp(sh, -1, keepdim=True)).amax(1)
                elif group == "rank":  # union of per-head top lists, round robin
                    o = sh.argsort(-1, descending=True)
                    rk = torch.empty_like(o)
                    rk.scatter_(-1, o, torch.arange(m, device=dev).expand_as(o).contiguous())
                    s = -rk.amin(1).double() * g - rk.argmin(1).double()
                else:
                    raise ValueError(group)
        t = torch.arange(t0, t0 + c, device=dev)
        mt = t // b + 1
        blk = torch.arange(m, device=dev)
        valid = blk[None, :] < mt[:, None]
        s = s.masked_fill(~valid[None], -float("inf"))
        r = cfg["r"][layer] if isinstance(cfg["r"], list) else cfg["r"]
        n = torch.maximum(torch.ceil(r * mt.double()).long(), torch.clamp(mt, max=cfg["nmin"]))
        forced = (blk[None, :] >= (mt[:, None] - cfg["local"])) & valid
        if cfg["sink"]:
            forced |= (blk[None, :] < cfg["sink"]) & valid
        n = n[None].expand(hkv, c)
        if cfg.get("topp"):  # adaptive budget: the fewest blocks whose estimated share
            # (softmax of the group score, which must be in log-share units) reaches topp
            pr = torch.softmax(s.float(), -1).sort(-1, descending=True).values.cumsum(-1)
            n = torch.maximum(n if cfg.get("topp_floor", True) else torch.clamp(mt, max=cfg["nmin"])[None],
                              (pr < cfg["topp"]).sum(-1) + 1)
        n = torch.minimum(torch.maximum(n, forced.sum(-1)[None]), mt[None])
        s = s.masked_fill(forced[None], float("inf"))
        order = s.argsort(-1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(m, device=dev).expand_as(order).contiguous())
        keep = t >= self.start
        if cfg.get("rerank"):  # two stages: the score's top ceil(rerank n) blocks are
            # candidates whose keys are read exactly; the n with the most true attention
            # mass among them are attended (bytes: K of the candidates, V of the n)
            cand_n = torch.minimum(torch.ceil(cfg["rerank"] * n.double()).long(), mt[None])
            cand = rank < cand_n[..., None]
            p = torch.softmax(torch.einsum("hgcd,htd->hgct", qg, k) * scaling
                              + self.causal(t0, c, t_all, dev)[None, None], -1)
            mass = F.pad(p, (0, pad)).view(hkv, g, c, m, b).sum(-1).mean(1)
            mass = mass.masked_fill(~cand, -float("inf")).masked_fill(forced[None], float("inf"))
            order = mass.argsort(-1, descending=True)
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(m, device=dev).expand_as(order).contiguous())
            self.attended += ((n + cand_n).double() / 2 / mt[None].double())[:, keep].sum().item()
            self.rows += int(keep.sum()) * hkv
            return rank < n[..., None]
        self.attended += (n.double() / mt[None].double())[:, keep].sum().item()
        self.rows += int(keep.sum()) * hkv
        return rank < n[..., None]

    def attention(self, module, q, k, v, mask, scaling=None, **kw):
        layer, cfg = module.layer_idx, self.cfg
        q, k, v = q[0].float(), k[0].float(), v[0].float()
        hq, t_all, d = q.shape
        hkv = k.shape[0]
        g = hq // hkv
        if cfg["mode"] == "capture":
            self.dense_kv[layer] = (k.clone(), v.clone())
        kk, vv = self.dense_kv[layer] if cfg["mode"] == "floor" else (k, v)
        out = torch.empty_like(q)
        chunk = 1024
        for t0 in range(0, t_all, chunk):
            c = min(chunk, t_all - t0)
            rows = torch.arange(c, device=q.device)
            idx = rows + t0
            qc = q[:, t0:t0 + c].view(hkv, g, c, d)
            s = torch.einsum("hgcd,htd->hgct", qc, kk) * scaling
            if cfg["mode"] == "floor":  # the own token's key from this pass
                s[:, :, rows, idx] = (qc * k[:, t0:t0 + c].view(hkv, 1, c, d)).sum(-1) * scaling
            s = s + self.causal(t0, c, t_all, q.device)[None, None]
            if cfg["mode"] in ("sparse", "floor") and t0 + c > self.start:
                tm = self.block_mask(q, kk, t0, c, layer, scaling).repeat_interleave(cfg["b"], -1)[..., :t_all]
                tm = tm | (idx < self.start)[None, :, None]
                s = s.masked_fill(~tm[:, None], -float("inf"))
            p = torch.softmax(s, -1)
            o = torch.einsum("hgct,htd->hgcd", p, vv)
            if cfg["mode"] == "floor":  # the own token's value from this pass
                o = o + p[:, :, rows, idx][..., None] * (v[:, t0:t0 + c] - vv[:, t0:t0 + c]).view(hkv, 1, c, d)
            out[:, t0:t0 + c] = o.reshape(hq, c, d)
        return out.to(module.o_proj.weight.dtype).transpose(0, 1)[None].contiguous(), None

    def run(self, ids, cfg):
        self.cfg, self.attended, self.rows, self.pca = cfg, 0.0, 0, {}
        with torch.no_grad():
            logits = self.model(ids, use_cache=False).logits[0, :-1].float()
        return torch.log_softmax(logits, -1), (self.attended / self.rows if self.rows else 1.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", action="append", help="text name or file (repeatable)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--start", type=int, default=1024, help="first scored position (earlier: dense prefill)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", required=True, help="JSON list of overrides of %s" % json.dumps(DEFAULTS))
    a = ap.parse_args(argv)
    from transformers import AttentionInterface
    model, tok = data.load_model(a.model, dtype="float32", device=a.device)
    sim = Sim(model, a.start)
    AttentionInterface.register("resa_sim", sim.attention)
    model.config._attn_implementation = "resa_sim"
    variants = json.loads(a.variants)
    cf = model.config
    hd = getattr(cf, "head_dim", None) or cf.hidden_size // cf.num_attention_heads
    # a step's bytes against a dense step's over an fp8 cache (d + 4 bytes a token
    # and head for K and for V, as libresa stores it): the attended share plus
    # the summaries, which every step reads whole
    print("| text | variant | attended share | + summaries (fp8 cache) | NLL | vs dense | KL(dense‖v) | top-1 agree |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.text or list(data.DEFAULT_TEXTS):
        ids = torch.tensor([data.load_tokens(tok, name, a.tokens)], device=a.device)
        tgt = ids[0, 1:][a.start:]
        dense, _ = sim.run(ids, dict(DEFAULTS, mode="capture"))
        dense = dense[a.start:]
        nll_d = -dense.gather(1, tgt[:, None]).mean().item()
        print(f"| {data.text_name(name)} | dense | 1.000 | 1.000 | {nll_d:.4f} | | | |", flush=True)
        for v in variants:
            cfg = dict(DEFAULTS, **v)
            t = time.time()
            lp, share = sim.run(ids, cfg)
            lp = lp[a.start:]
            nll = -lp.gather(1, tgt[:, None]).mean().item()
            kl = (dense.exp() * (dense - lp)).sum(-1).mean().item()
            agree = (dense.argmax(-1) == lp.argmax(-1)).float().mean().item()
            traffic = share + (summary_bytes(cfg["summary"], hd) / (2 * cfg["b"] * (hd + 4))
                               if cfg["mode"] in ("sparse", "floor") and cfg["score"] == "pooled" else 0)
            print(f"| {data.text_name(name)} | {json.dumps(v)} | {share:.3f} | {traffic:.3f} | {nll:.4f} | "
                  f"{100 * (nll / nll_d - 1):+.2f}% | {kl:.4f} | {agree:.3f} |", flush=True)
            print(f"  ({time.time() - t:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
