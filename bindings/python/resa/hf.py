# SPDX-License-Identifier: MIT
"""resa.hf: a Hugging Face causal LM of the Llama family decoding through libresa.

libresa owns the KV cache and the attention; transformers runs everything else
(embeddings, RoPE, projections, MLPs, norms, the LM head).  Every forward pass
packs all rows of one libresa step into a single batch row: ``input_ids`` and
explicit ``position_ids`` of shape [1, T] (each sequence with its own
positions), ``use_cache=False``, and the open :class:`resa.Step` passed as an
extra forward keyword (``resa_step``).  transformers forwards unknown keywords
down to the attention function of every layer; the function registered here
under the name ``"resa"`` (``transformers.AttentionInterface``) takes the
post-RoPE q/k/v of the layer ``module.layer_idx`` and calls
``step.attend(layer, q[T, Hq, d], k[T, Hkv, d], v[T, Hkv, d])``.

No attention mask function is registered for ``"resa"``: for an attention
implementation that the mask interface does not know, transformers'
``create_causal_mask`` returns ``None`` at once (masking_utils.py,
``_preprocess_mask_arguments``), so no [T, T] mask is built and none of the
packed-sequence detection (which reads a device value on the host and would
break CUDA-graph capture) runs.  See docs/huggingface.md.

The model's ``config._attn_implementation`` is "resa" only while a ResaLM call
runs and is restored afterwards, so the same model object still works with
its own attention (e.g. ``model.generate``) between ResaLM calls.

    from resa.hf import ResaLM
    lm = ResaLM(model, block_size=16, select_fraction=0.15, rectify_interval=128)
    new_tokens = lm.generate([[1, 2, 3], [4, 5]], max_new_tokens=64)

torch and transformers are imported here only (``import resa`` needs neither).
"""
import contextlib
import math

import torch
import transformers

from . import Backend, Context, DType, Mode
from ._tensors import to_dtype

__all__ = ["ResaLM", "ATTN_IMPLEMENTATION", "STEP_KWARG", "resa_attention_forward",
           "SUPPORTED_MODEL_TYPES"]

#: The name the attention function is registered under.
ATTN_IMPLEMENTATION = "resa"
#: The forward keyword that carries the open step down to the attention function.
STEP_KWARG = "resa_step"
#: config.model_type values accepted (SmolLM2 is "llama").
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_DTYPES = {torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16}
# Context parameters ResaLM derives from the model; passing them is an error.
_SHAPE_PARAMS = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "io_dtype")


def resa_attention_forward(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, **kwargs):
    """transformers attention function: query [1, Hq, T, d], key/value [1, Hkv, T, d]
    (post-RoPE) -> (attn_output [1, T, Hq, d], None).  The mask is ignored (None
    anyway): libresa knows every row's sequence and position from the step."""
    step = kwargs.get(STEP_KWARG)
    if step is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} called without an open libresa "
            f"step (the forward keyword {STEP_KWARG!r}); run the model through resa.hf.ResaLM")
    if query.shape[0] != 1:
        raise ValueError(f"resa attention expects one packed batch row, got batch {query.shape[0]}")
    # [1, H, T, d] -> [T, H, d]; after RoPE q and k are usually already laid out
    # [T, H, d] in memory (transposed views), so contiguous() is mostly free.
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    out = step.attend(module.layer_idx, q, k, v)
    return out.unsqueeze(0), None


transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, resa_attention_forward)


def _model_layout(model, max_seq_tokens):
    """Checks that ReSA can run `model` exactly; returns (layers, q heads, kv heads,
    head_dim, softmax scale, dtype, device).  Raises ValueError otherwise."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("not a transformers model (no .config)")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported: resa.hf runs Llama-family causal LMs "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}; SmolLM2 is 'llama')")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported")
    for name in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise ValueError(f"attention logit softcapping ({name}={getattr(config, name)}) "
                             "is not supported: libresa computes plain softmax attention")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"every layer must be full attention; layer_types = {sorted(set(layer_types))}")
    window = getattr(config, "sliding_window", None)
    if window is not None and (getattr(config, "use_sliding_window", True) is not False):
        # A window at least as long as the longest sequence the context can hold never
        # masks anything (transformers keeps key j for query i when j > i - window).
        if window < max_seq_tokens:
            raise ValueError(
                f"sliding-window attention (sliding_window={window}) is not supported: libresa "
                f"attends to the whole sequence; it is exact only when the window covers the "
                f"longest sequence (max_seq_tokens={max_seq_tokens}); lower max_tokens/max_seq_tokens "
                f"to at most {window} to run this model")
    if getattr(config, "is_causal", True) is False:
        raise ValueError("config.is_causal is False: bidirectional attention is not supported")

    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    n_layers = config.num_hidden_layers
    if layers is None or len(layers) != n_layers or not hasattr(model, "lm_head"):
        raise ValueError(f"{type(model).__name__}: expected a causal LM with .lm_head and "
                         f"base_model.layers of {n_layers} decoder layers")
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // hq
    if hq % hkv:
        raise ValueError(f"num_attention_heads {hq} is not a multiple of num_key_value_heads {hkv}")
    scales = set()
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) != i or not hasattr(attn, "scaling"):
            raise ValueError(f"layer {i}: expected a self_attn module with layer_idx == {i} and .scaling")
        if getattr(attn, "sliding_window", None) not in (None, 0) and attn.sliding_window < max_seq_tokens:
            raise ValueError(f"layer {i} uses sliding-window attention (window {attn.sliding_window})")
        if getattr(attn, "head_dim", head_dim) != head_dim:
            raise ValueError(f"layer {i}: head_dim {attn.head_dim} != config head_dim {head_dim}")
        scales.add(float(attn.scaling))
    if len(scales) != 1:
        raise ValueError(f"layers use different softmax scales {sorted(scales)}")

    params = list(model.parameters())
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if len(devices) != 1:
        raise ValueError(f"the model is spread over several devices {sorted(map(str, devices))}")
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise ValueError(f"the model's parameters must share one dtype of float32, float16, "
                         f"bfloat16; found {sorted(map(str, dtypes))}")
    return (n_layers, hq, hkv, head_dim, scales.pop(), next(iter(dtypes)), devices.pop())


def _resolve_backend(backend, device):
    if backend is None or (isinstance(backend, str) and backend.lower() == "auto") \
            or backend == Backend.AUTO:
        return Backend.CUDA if device.type == "cuda" else Backend.CPU
    if isinstance(backend, str):
        backend = Backend[backend.upper()]
    backend = Backend(backend)
    want = "cuda" if backend == Backend.CUDA else "cpu"
    if device.type != want:
        raise ValueError(f"backend {backend.name} needs the model on {want}, it is on {device}")
    return backend


class _DecodeGraph:
    """One captured decode forward (every layer and the LM head) for one batch size.
    libresa replays only the shape captured last and a StepGraph holds one graph, so
    ResaLM keeps one of these and makes a new one when the batch size changes."""

    def __init__(self, lm, batch):
        from .graphs import StepGraph
        self.batch = batch
        self.graph = StepGraph(lm.ctx)  # from now on the context's steps run on its stream
        self.ids = torch.zeros((1, batch), dtype=torch.long, device=lm.device)
        self.pos = torch.zeros((1, batch), dtype=torch.long, device=lm.device)
        self.logits = None  # the captured forward's output, [batch, vocab], rewritten by replays

    def load(self, ids, pos):
        """Writes a step's inputs into the static buffers (on torch's current stream,
        which StepGraph orders before the launch and after the previous one)."""
        self.ids.copy_(torch.tensor([ids], dtype=torch.long))
        self.pos.copy_(torch.tensor([pos], dtype=torch.long))


class ResaLM:
    """A transformers causal LM (Llama family) with libresa's KV cache and attention.

    ``model`` stays on its device and dtype (CPU float32/bfloat16/float16, CUDA
    bfloat16/float16); ``backend`` None picks CUDA for a CUDA model, else CPU.
    ``max_tokens`` and ``max_sequences`` size the KV pool; any other libresa
    parameter goes by its lowercase name (block_size=, select_fraction=,
    select_min_blocks=, local_blocks=, sink_blocks=, rectify_interval=,
    summary_format=, record_selection=, max_seq_tokens=, max_step_tokens=,
    num_threads=, kv_dtype=, softmax_scale= to override the model's scale).
    ``auto_rectify`` (default True): decode() rectifies the sequences that are due.
    ``cuda_graph`` (CUDA only): each decode batch size is captured once with
    resa.graphs.StepGraph and replayed afterwards.
    """

    def __init__(self, model, backend=None, max_tokens=65536, max_sequences=64, *,
                 cuda_graph=False, auto_rectify=True, **resa_params):
        for name in _SHAPE_PARAMS:
            if name in resa_params:
                raise TypeError(f"{name} comes from the model's config; do not pass it")
        max_seq = int(resa_params.get("max_seq_tokens") or 0) or int(max_tokens)
        n_layers, hq, hkv, head_dim, scale, dtype, device = _model_layout(model, max_seq)
        backend = _resolve_backend(backend, device)
        if backend == Backend.CUDA:
            if head_dim not in (64, 128, 256):
                raise ValueError(f"the CUDA backend needs head_dim 64, 128 or 256, not {head_dim}")
            if dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"the CUDA backend needs a float16 or bfloat16 model, not {dtype}")
            if hq // hkv > 16:
                raise ValueError(f"the CUDA backend allows at most 16 query heads per KV head, "
                                 f"not {hq // hkv}")
            kv = resa_params.get("kv_dtype")
            if kv is not None and to_dtype(kv, "kv_dtype") not in (_DTYPES[dtype],
                                                                    DType.FP8_E4M3):
                raise ValueError("the CUDA backend needs kv_dtype equal to the model dtype "
                                 "or fp8")
        elif cuda_graph:
            raise ValueError("cuda_graph=True needs the CUDA backend")
        if "record_selection" in resa_params:
            resa_params["record_selection"] = int(bool(resa_params["record_selection"]))
        resa_params.setdefault("softmax_scale", scale)

        self.model = model
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.auto_rectify = bool(auto_rectify)
        self.cuda_graph = bool(cuda_graph)
        self.vocab_size = model.config.vocab_size
        self._history = {}   # seq id -> token ids whose K/V are in the cache
        self._graph = None   # cuda_graph: the _DecodeGraph of the last decode batch size
        #: counters: tokens prefilled, decode steps and tokens, rectify steps and tokens,
        #: captured decode graphs and replays
        self.stats = dict.fromkeys(("prefill_tokens", "decode_steps", "decode_tokens",
                                    "rectify_steps", "rectify_tokens", "graph_captures",
                                    "graph_replays"), 0)
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:  # the CUDA backend works on the device current at creation
            self.ctx = Context(backend, num_layers=n_layers, num_q_heads=hq, num_kv_heads=hkv,
                               head_dim=head_dim, io_dtype=_DTYPES[dtype],
                               max_tokens=max_tokens, max_sequences=max_sequences, **resa_params)

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _resa_attention(self):
        config = self.model.config
        saved = config._attn_implementation
        config._attn_implementation = ATTN_IMPLEMENTATION
        try:
            with torch.no_grad():
                yield
        finally:
            config._attn_implementation = saved

    def _tensor(self, values):
        return torch.tensor([values], dtype=torch.long, device=self.device)

    def _forward(self, step, ids, pos, keep):
        """Runs the model over one step's packed rows.  keep: the rows whose logits
        are wanted (a list, or None for every row, or [] for none: the LM head is
        skipped).  Returns float32 logits [len(keep), vocab] or None."""
        kwargs = {STEP_KWARG: step, "use_cache": False}
        if keep is not None and not keep:
            self.model.base_model(input_ids=self._tensor(ids), position_ids=self._tensor(pos), **kwargs)
            return None
        if keep is not None:
            kwargs["logits_to_keep"] = torch.tensor(keep, dtype=torch.long, device=self.device)
        out = self.model(input_ids=self._tensor(ids), position_ids=self._tensor(pos), **kwargs)
        return out.logits[0].to(torch.float32, copy=True)

    def _max_step_rows(self):
        return int(self.ctx.get("max_step_tokens"))

    def _seq_check(self, seqs):
        seqs = [int(s) for s in seqs]
        for s in seqs:
            if s not in self._history:
                raise ValueError(f"unknown sequence {s} (not prefilled by this ResaLM, or released)")
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"sequences must be distinct within a step: {seqs}")
        return seqs

    # ------------------------------------------------------------------ per-step API
    def prefill(self, prompts):
        """New sequences with these prompts (lists of token ids, any lengths) stored by
        dense APPEND steps: all prompts packed in one step, split into several only
        when they exceed max_step_tokens.  Returns (seq_ids, float32 logits [B, vocab]
        of each prompt's last token)."""
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts:
            raise ValueError("no prompts")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:4]} outside [0, {self.vocab_size})")
        seqs = []
        try:
            for _ in prompts:
                seqs.append(self.ctx.seq_create())
                self._history[seqs[-1]] = []
            logits = [None] * len(prompts)
            done = [0] * len(prompts)
            budget_rows = self._max_step_rows()
            with self._resa_attention():
                while any(d < len(p) for d, p in zip(done, prompts)):
                    entries, ids, pos, keep, finishing = [], [], [], [], []
                    budget = budget_rows
                    for i, p in enumerate(prompts):
                        if done[i] == len(p) or budget == 0:
                            continue
                        n = min(len(p) - done[i], budget)
                        budget -= n
                        entries.append((i, n))
                        ids += p[done[i]:done[i] + n]
                        pos += range(done[i], done[i] + n)
                        if done[i] + n == len(p):
                            keep.append(len(ids) - 1)
                            finishing.append(i)
                    with self.ctx.step([seqs[i] for i, _ in entries], Mode.APPEND,
                                       [n for _, n in entries]) as step:
                        out = self._forward(step, ids, pos, keep)
                    for i, n in entries:
                        self._history[seqs[i]] += prompts[i][done[i]:done[i] + n]
                        done[i] += n
                    self.stats["prefill_tokens"] += len(ids)
                    for row, i in enumerate(finishing):
                        logits[i] = out[row]
        except BaseException:
            self.release(seqs)
            raise
        return seqs, torch.stack(logits)

    def decode(self, seqs, tokens, *, auto_rectify=None):
        """One DECODE step: token tokens[i] appended to seqs[i] (its K/V stored, block-
        sparse attention).  Returns float32 logits [B, vocab] for the next tokens.  Then,
        when auto_rectify (default: the constructor's), rectifies the sequences that are
        due (RECTIFY_INTERVAL pending tokens); the returned logits are not affected."""
        seqs = self._seq_check(seqs)
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.reshape(-1).tolist()
        tokens = [int(t) for t in tokens]
        if len(tokens) != len(seqs) or not seqs:
            raise ValueError(f"need one token per sequence: {len(seqs)} sequences, {len(tokens)} tokens")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:4]} outside [0, {self.vocab_size})")
        pos = [len(self._history[s]) for s in seqs]
        with self._resa_attention():
            if self.cuda_graph:
                logits = self._decode_graphed(seqs, tokens, pos)
            else:
                with self.ctx.step(seqs, Mode.DECODE, [1] * len(seqs)) as step:
                    logits = self._forward(step, tokens, pos, None)
        for s, t in zip(seqs, tokens):
            self._history[s].append(t)
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(seqs)
        if self.auto_rectify if auto_rectify is None else auto_rectify:
            due = [s for s in seqs if self.ctx.seq_rectify_due(s)]
            if due:
                self.rectify(due)
        return logits

    def _decode_graphed(self, seqs, tokens, pos):
        """A decode step through a CUDA graph.  A batch size seen for the first time
        (or again after another one) gets a fresh StepGraph and runs eagerly on its
        side stream (the warm-up torch asks for before a capture: cuBLAS workspaces and
        allocator pools of that stream exist then); the next step of that size is
        captured (and launched once); later ones replay with RESA_STEP_REPLAY.  The
        graph reads ids and positions from static buffers and writes static logits,
        copied out before the next launch can overwrite them."""
        batch = len(seqs)
        graph = self._graph
        current = torch.cuda.current_stream(self.device)
        if graph is None or graph.batch != batch:
            self._graph = None
            graph = _DecodeGraph(self, batch)
            side = graph.graph.stream
            side.wait_stream(current)
            with torch.cuda.stream(side):
                with self.ctx.step(seqs, Mode.DECODE, [1] * batch) as step:
                    logits = self._forward(step, tokens, pos, None)
            current.wait_stream(side)
            logits.record_stream(current)
            self._graph = graph
            return logits
        graph.load(tokens, pos)
        if graph.logits is None:
            try:
                with self.ctx.step(seqs, Mode.DECODE, [1] * batch) as step:
                    def run():
                        return self.model(input_ids=graph.ids, position_ids=graph.pos,
                                          use_cache=False, **{STEP_KWARG: step}).logits[0]
                    graph.logits = graph.graph.capture(run)  # captures, then launches once
            except BaseException:
                self._graph = None  # a failed capture: start over at the next step
                raise
            self.stats["graph_captures"] += 1
        else:
            with self.ctx.step(seqs, Mode.DECODE, [1] * batch, replay=True):
                graph.graph.replay()
            self.stats["graph_replays"] += 1
        return graph.logits.to(torch.float32, copy=True)

    def rectify(self, seqs):
        """Re-runs each sequence's pending tokens (ids from its history, positions
        [len - pending, len)) densely in RECTIFY mode, overwriting their K/V; the
        logits are not computed.  Sequences with nothing pending are skipped.  All
        sequences share a step, split only beyond max_step_tokens (oldest tokens first)."""
        seqs = self._seq_check(seqs)
        budget_rows = self._max_step_rows()
        with self._resa_attention():
            while True:
                work = [(s, self.ctx.seq_pending(s)) for s in seqs]
                work = [(s, p) for s, p in work if p > 0]
                if not work:
                    return
                entries, ids, pos = [], [], []
                budget = budget_rows
                for s, p in work:
                    if budget == 0:
                        break
                    n = min(p, budget)
                    budget -= n
                    length = len(self._history[s])
                    entries.append((s, n))
                    ids += self._history[s][length - p:length - p + n]
                    pos += range(length - p, length - p + n)
                with self.ctx.step([s for s, _ in entries], Mode.RECTIFY,
                                   [n for _, n in entries]) as step:
                    self._forward(step, ids, pos, [])
                self.stats["rectify_steps"] += 1
                self.stats["rectify_tokens"] += len(ids)
                after = {s: self.ctx.seq_pending(s) for s, _ in entries}
                if any(after[s] >= p for s, p in work if s in after):
                    raise RuntimeError(f"rectification made no progress: pending {after}")

    def release(self, seqs):
        """Returns the sequences' pages to the pool; unknown ids are ignored."""
        for s in seqs:
            s = int(s)
            if self._history.pop(s, None) is not None:
                self.ctx.seq_release(s)

    def tokens(self, seq):
        """The sequence's token ids so far (those whose K/V are in the cache)."""
        return list(self._history[self._seq_check([seq])[0]])

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, generator):
        """Next token per row of float32 logits [B, V]: argmax, or a sample after
        temperature, top-k and top-p in transformers' order and semantics."""
        if not do_sample:
            return logits.argmax(dim=-1).tolist()
        scores = logits / temperature
        if top_k and top_k > 0:
            k = min(int(top_k), scores.shape[-1])
            kth = torch.topk(scores, k, dim=-1).values[..., -1, None]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if top_p < 1.0:
            sorted_scores, sorted_idx = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - top_p)
            remove[..., -1:] = False  # keep at least one token
            scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
        probs = scores.softmax(dim=-1)
        if generator is not None and probs.device != generator.device:
            probs = probs.to(generator.device)
        return torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()

    def generate(self, prompts, max_new_tokens, do_sample=False, temperature=1.0, top_k=0,
                 top_p=1.0, eos_token_id=None, generator=None):
        """Generates up to max_new_tokens new tokens per prompt; returns them per prompt
        (a sequence stops after emitting a token of eos_token_id, an int or a list of
        ints, which is included; None: no EOS).  Greedy unless do_sample; sampling
        applies temperature, then top_k (0: off), then top_p (1.0: off) and draws
        with `generator` (a torch.Generator; on the logits' device, or its own, where
        the probabilities are moved).  The sequences are released at the end."""
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, not {temperature}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], not {top_p}")
        if eos_token_id is None:
            eos = set()
        elif isinstance(eos_token_id, int):
            eos = {eos_token_id}
        else:
            eos = {int(t) for t in eos_token_id}
        out = [[] for _ in prompts]
        if max_new_tokens <= 0 or not prompts:
            return out
        seqs, logits = self.prefill(prompts)
        try:
            active = list(range(len(prompts)))
            while True:
                picked = self._pick(logits, do_sample, temperature, top_k, top_p, generator)
                still, next_tokens = [], []
                for i, t in zip(active, picked):
                    out[i].append(t)
                    if t in eos or len(out[i]) >= max_new_tokens:
                        self.release([seqs[i]])
                    else:
                        still.append(i)
                        next_tokens.append(t)
                if not still:
                    break
                active = still
                logits = self.decode([seqs[i] for i in active], next_tokens)
        finally:
            self.release(seqs)
        return out

    def close(self):
        """Releases every sequence and the context."""
        self.release(list(self._history))
        self._graph = None
        self.ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
