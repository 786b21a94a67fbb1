# SPDX-License-Identifier: MIT
"""Model and text loading for resa-eval.

Model: SmolLM2-135M-Instruct as the Q4_1 GGUF file that scripts/fetch-model.sh puts in
``${RESA_MODELS:-~/.cache/resa}``, or a transformers directory written by
:func:`save_hf` (``resa-eval --save-hf DIR``), for machines without the ``gguf`` package.

GGUF loading: transformers' own GGUF path (``from_pretrained(dir, gguf_file=...)``,
which needs the ``accelerate`` package) or the built-in loader here (``gguf.GGUFReader``
+ ``gguf.quants.dequantize`` into a ``LlamaForCausalLM``), which needs only ``gguf``.
Both give bit-identical float32 weights (checked on this model; docs/quality.md).  The
tokenizer always comes from transformers' GGUF conversion (gpt2-style byte-level BPE).

Texts: the plain-text files that scripts/fetch-texts.sh writes into
``${RESA_TEXTS:-~/.cache/resa/texts}`` (``NAME.txt``), or any UTF-8 file by path.
"""
import os
import pathlib
import sys

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXTS = ("austen-persuasion", "debian-reference")


def cache_dir():
    return pathlib.Path(os.environ.get("RESA_MODELS") or pathlib.Path.home() / ".cache" / "resa")


def texts_dir():
    return pathlib.Path(os.environ.get("RESA_TEXTS") or pathlib.Path.home() / ".cache" / "resa" / "texts")


def default_model_path():
    return cache_dir() / MODEL_FILE


def find_model(path=None):
    """The model to load: a .gguf file, or a directory holding config.json (a
    transformers directory) or exactly one .gguf file.  None: the fetched default.
    Returns (kind, path) with kind "gguf" or "hf"; raises FileNotFoundError."""
    p = pathlib.Path(path) if path else default_model_path()
    if p.is_file() and p.suffix == ".gguf":
        return "gguf", p
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if (p / MODEL_FILE).is_file():
            return "gguf", p / MODEL_FILE
    hint = "" if path else " (run scripts/fetch-model.sh)"
    raise FileNotFoundError(f"no model at {p}{hint}")


# ------------------------------------------------------------------ GGUF, built-in loader

def _unpermute(w, n_head):
    """Undoes llama.cpp's convert-time reordering of the Q/K projection rows (it
    interleaves the two rotary halves of every head: HF's rotate_half layout -> GGML's
    pairwise layout).  w: [n_head * head_dim, in]."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_llama_config(reader):
    """A transformers LlamaConfig from a llama-architecture GGUF file's metadata."""
    from transformers import LlamaConfig

    def get(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    if arch != "llama":
        raise ValueError(f"built-in GGUF loader: architecture {arch!r} is not 'llama'")
    hidden = int(get("llama.embedding_length"))
    heads = int(get("llama.attention.head_count"))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    vocab = get("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(get("llama.feed_forward_length")),
        num_hidden_layers=int(get("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("llama.attention.head_count_kv", heads)),
        head_dim=int(get("llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(get("llama.context_length")),
        rms_norm_eps=float(get("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=not has_output,
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
        hidden_act="silu", attention_bias=False, mlp_bias=False)


def gguf_state_dict(reader, config):
    """{transformers name: float32 numpy array} of every tensor, dequantized."""
    import numpy as np
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            blk, layer, kind, _ = t.name.split(".")
            if blk != "blk" or kind not in _LAYER_NAMES:
                raise ValueError(f"built-in GGUF loader: unknown tensor {t.name}")
            if kind == "attn_q":
                a = _unpermute(a, config.num_attention_heads)
            elif kind == "attn_k":
                a = _unpermute(a, config.num_key_value_heads)
            name = f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"
        out[name] = a if a.flags.writeable else a.copy()
    return out


def load_gguf_builtin(path, dtype):
    import torch
    from gguf import GGUFReader
    from transformers import LlamaForCausalLM

    reader = GGUFReader(str(path))
    config = gguf_llama_config(reader)
    state = {k: torch.from_numpy(v) for k, v in gguf_state_dict(reader, config).items()}
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Buffers (the RoPE inverse frequencies) were made on the meta device: make the
    # modules that hold them again, on the CPU.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)):
                with torch.device("cpu"):
                    setattr(parent, child_name, type(child)(config))
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"built-in GGUF loader: tensors left unset: {meta[:4]}")
    return model.to(dtype).eval()


# ------------------------------------------------------------------ public loading

def load_tokenizer(path=None):
    from transformers import AutoTokenizer
    kind, p = find_model(path)
    if kind == "hf":
        return AutoTokenizer.from_pretrained(str(p))
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def load_model(path=None, *, dtype="float32", device="cpu", loader="auto", log=None):
    """(model, tokenizer): the model in eval mode on `device` in `dtype` (a torch dtype
    or its name).  loader (GGUF only): "transformers", "builtin", or "auto" (transformers,
    falling back to the built-in loader when it fails, e.g. without accelerate)."""
    import torch
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    kind, p = find_model(path)
    tokenizer = load_tokenizer(p)
    if kind == "hf":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        model = None
        if loader in ("auto", "transformers"):
            try:
                from transformers import AutoModelForCausalLM
                model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                             dtype=torch.float32)
                model = model.to(dtype)
            except Exception as e:  # noqa: BLE001 - any failure: fall back when allowed
                if loader == "transformers":
                    raise
                log(f"resa-eval: transformers' GGUF loader failed ({type(e).__name__}: {e}); "
                    f"using the built-in one")
        if model is None:
            model = load_gguf_builtin(p, dtype)
        # A GGUF-derived config carries quantization_config; the weights are plain now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.generation_config.pad_token_id = model.config.eos_token_id
    return model.to(device).eval(), tokenizer


def save_hf(model, tokenizer, out_dir, dtype="bfloat16"):
    """Writes the model as a transformers directory (config.json, model.safetensors in
    `dtype`, tokenizer files) that AutoModelForCausalLM/AutoTokenizer load without the
    gguf package.  Returns {file name: bytes}."""
    import torch
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}


# ------------------------------------------------------------------ texts

def find_text(name):
    """Path of a text: an existing file, else TEXTS_DIR/NAME(.txt)."""
    p = pathlib.Path(name)
    if p.is_file():
        return p
    for cand in (texts_dir() / name, texts_dir() / f"{name}.txt"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no text {name!r} (a file, or {texts_dir()}/{name}.txt; "
                            f"run scripts/fetch-texts.sh)")


def text_name(name):
    p = pathlib.Path(name)
    return p.stem if p.suffix == ".txt" else p.name


def load_tokens(tokenizer, name, n_tokens):
    """The first n_tokens token ids of a text (no BOS: SmolLM2's tokenizer adds none).
    Only a prefix of the characters is tokenized, long enough for n_tokens (retried
    longer if not); raises ValueError when the whole text is too short."""
    text = find_text(name).read_text(encoding="utf-8")
    chars = max(4096, 8 * n_tokens)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        # The last token of a cut prefix may be a fragment: keep one token in reserve.
        if len(ids) > n_tokens or chars >= len(text):
            break
        chars *= 2
    if chars < len(text):
        ids = ids[:-1]
    if len(ids) < n_tokens:
        raise ValueError(f"text {name!r} has {len(ids)} tokens, fewer than the {n_tokens} needed")
    return ids[:n_tokens]
