# SPDX-License-Identifier: MIT
"""The quantities resa-eval reports, each one small function.

Per decoded token (logits over the vocabulary, torch tensors; computed in float64):
- ``nll``: negative log-likelihood of the true next token, -log softmax(logits)[target].
- ``kl``: KL(dense || variant) = sum_v p(v) (log p(v) - log q(v)), p the dense reference's
  next-token distribution, q the variant's; >= 0, 0 iff equal.
- ``top1_agree``: 1 where argmax(variant) == argmax(dense).

Per decode step and sequence (plain Python, no torch):
- ``select_budget``: libresa's block budget (include/resa.h, lib/select_budget.c).
- ``decode_kv_bytes``: the K/V bytes one decode step reads for one (layer, KV head), and
  ``kv_bytes_relative`` the same divided by a dense step's.  With L tokens in the cache
  (the new one included), M = ceil(L / b) blocks, n = the budget, d = head_dim,
  s = bytes per KV element:
      dense step           2 d s L                        (all keys and values)
      ReSA decode step     M * S_sum                      (block summaries: min and max)
                         + 2 d s (L - (M b - n b))        (the n selected blocks; the last,
                                                           partial block is always one)
                         + 2 d s L / f                    (rectification, amortized: every
                                                           f steps the f pending tokens
                                                           read the whole cache once)
  with S_sum = 2 d s (summaries in the KV dtype) or 2 d + 1 (fp8 e4m3 + a scale byte).
  Relative to dense that is about 1/b + n/M + 1/f (0.19 at b=16, r=0.1, f=32, long L).
  A step whose budget covers every block (n = M, e.g. L <= b * n_min) is dense: it reads
  2 d s L, no summaries, and leaves nothing to rectify.  f = 0 (no rectification) drops
  the last term; f = 1 (rectify after every token) adds a whole dense read per step.
"""
import math

__all__ = ["log_probs", "nll", "kl", "top1_agree", "blocks_for", "select_budget",
           "decode_kv_bytes", "kv_bytes_relative", "greedy_agreement", "mean"]


def log_probs(logits):
    """float64 log-softmax over the last dimension (a torch tensor)."""
    return logits.double().log_softmax(dim=-1)


def nll(logp, targets):
    """-log p(target) per row: logp [B, V] (log-probabilities), targets [B] (ints)."""
    import torch
    t = torch.as_tensor(targets, dtype=torch.long, device=logp.device).reshape(-1, 1)
    return -logp.gather(-1, t)[:, 0]


def kl(logp_ref, logp):
    """KL(ref || other) per row, in nats, from log-probabilities [B, V] of both.  Terms
    with p_ref = 0 contribute 0 (the limit), also where q = 0."""
    import torch
    p = logp_ref.exp()
    terms = torch.where(p > 0, p * (logp_ref - logp), torch.zeros_like(p))
    return terms.sum(dim=-1)


def top1_agree(logits_ref, logits):
    """1.0 where the two argmaxes agree, else 0.0, per row."""
    return (logits_ref.argmax(dim=-1) == logits.argmax(dim=-1)).double()


def blocks_for(length, block_size):
    return -(-int(length) // int(block_size))


def select_budget(n_blocks, fraction, min_blocks=16, local_blocks=1, sink_blocks=0):
    """Blocks a decode step attends, as libresa computes it: n = max(ceil(r M),
    min(M, n_min)), at least the forced (local + sink) blocks, at most M.  r is taken in
    millionths so that ceil(r M) is exact integer arithmetic (0.07 * 100 rounds up to 8
    in doubles)."""
    r_ppm = int(round(fraction * 1e6))
    n = (r_ppm * n_blocks + 999999) // 1000000
    n = max(n, min(min_blocks, n_blocks))
    n = max(n, min(local_blocks + sink_blocks, n_blocks))
    return min(n, n_blocks)


def decode_kv_bytes(length, *, head_dim, kv_bytes, block_size=16, fraction=0.1,
                    min_blocks=16, local_blocks=1, sink_blocks=0, rectify_interval=32,
                    fp8_summaries=False):
    """Bytes one decode step reads for one (layer, KV head) with `length` tokens in the
    cache (the new token included): a dict with summary, selected, rectify, total, dense
    and n_select, n_blocks (see the module docstring for the formula)."""
    L, d, s, b = int(length), int(head_dim), float(kv_bytes), int(block_size)
    M = blocks_for(L, b)
    n = select_budget(M, fraction, min_blocks, local_blocks, sink_blocks)
    dense = 2 * d * s * L
    out = {"n_blocks": M, "n_select": n, "dense": dense}
    if n >= M:  # every block: a dense step, nothing pending, no rectification
        out.update(summary=0.0, selected=dense, rectify=0.0, total=dense)
        return out
    per_summary = (2 * d + 1) if fp8_summaries else 2 * d * s
    summary = M * per_summary
    # The selected blocks hold n full blocks less the empty tail of the last block
    # (always selected: local_blocks >= 1).
    selected_tokens = n * b - (M * b - L) if local_blocks >= 1 else n * b
    selected = 2 * d * s * selected_tokens
    rectify = dense / rectify_interval if rectify_interval > 0 else 0.0
    out.update(summary=float(summary), selected=float(selected), rectify=float(rectify),
               total=float(summary + selected + rectify))
    return out


def kv_bytes_relative(length, **kwargs):
    """decode_kv_bytes(...)['total'] / the dense step's bytes."""
    r = decode_kv_bytes(length, **kwargs)
    return r["total"] / r["dense"]


def greedy_agreement(reference, other):
    """(fraction of positions with the same token, first position where they differ or
    None) for two token lists, over the shorter length."""
    n = min(len(reference), len(other))
    if n == 0:
        return float("nan"), None
    same = [a == b for a, b in zip(reference[:n], other[:n])]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / n, first


def mean(values):
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")
