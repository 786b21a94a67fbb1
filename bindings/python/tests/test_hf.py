#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""resa.hf (a transformers causal LM decoding through libresa) against
transformers' own SDPA attention on tiny random-weight models, CPU backend;
the CUDA tests skip (with their reason printed) on a machine without CUDA.

Exit status 77 (meson: skipped) with the reason printed when torch or
transformers cannot be imported.  Run: RESA_LIBRARY=.../libresa.so
PYTHONPATH=bindings/python python3 bindings/python/tests/test_hf.py

Tolerances.  float32: libresa's CPU attention and torch's SDPA sum in other
orders, so attention outputs differ by float32 rounding (~1e-7 relative); two
layers and the LM head carry that to logits of magnitude ~1-10 as a few
1e-6 absolute (measured: under 1e-5).  The checks use 1e-4 absolute: two orders above what rounding gives
here and far below what a wrong position, token, block or missing key does
(those move logits by >= 1e-2, and the controls below show it).  bfloat16:
every matmul rounds to 8 bits of mantissa in both paths, and in different
places (SDPA keeps bf16 probabilities, libresa accumulates in float32), so
logits agree to a few bf16 ulps of their magnitude: 5% of max|logit|.
"""
import math
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as e:  # meson: exit 77 is "skipped"
    print(f"SKIP: test_hf needs torch and transformers ({e})")
    sys.exit(77)

import resa  # noqa: E402
from resa.hf import ResaLM  # noqa: E402

torch.set_num_threads(1)  # tiny models; a busy machine makes more threads slower
F32_ATOL = 1e-4
TIE_MARGIN = 1e-3  # a greedy choice closer than this is a tie that float rounding may flip

PROMPTS = [[5, 17, 99, 3, 42, 7, 64], [11, 2, 90], list(range(30, 43)), [77]]


def tiny_llama(dtype=torch.float32, head_dim=16, hidden=64, heads=4, kv_heads=2, layers=2,
               seed=0, config_cls=LlamaConfig, model_cls=LlamaForCausalLM, **extra):
    """Two instances with the same random weights: (resa model, SDPA reference)."""
    cfg = config_cls(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=head_dim,
                     max_position_embeddings=512, initializer_range=0.2, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    cfg2 = config_cls.from_dict(cfg.to_dict())
    cfg2._attn_implementation = "sdpa"
    ref = model_cls(cfg2).eval()
    ref.load_state_dict(model.state_dict())
    return model.to(dtype), ref.to(dtype)


def full_logits(ref, tokens):
    """The SDPA model's float32 logits at every position of one sequence."""
    with torch.no_grad():
        ids = torch.tensor([tokens], device=ref.device)
        return ref(input_ids=ids, use_cache=False).logits[0].float()


def hf_greedy(ref, prompt, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt], device=ref.device), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class TinyModelCase(unittest.TestCase):
    def assert_greedy_equal(self, ref, prompt, ours, theirs, tie=TIE_MARGIN):
        """Equal tokens, except that a divergence is accepted where the reference's
        own top-2 logits are within `tie` (a rounding tie; reported)."""
        for j, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                top = full_logits(ref, prompt + theirs[:j])[-1].topk(2).values
                margin = float(top[0] - top[1])
                self.assertLess(margin, tie,
                                f"prompt {prompt}: token {j} is {a}, transformers gives {b} "
                                f"with a top-2 margin of {margin:.3g} (not a tie)")
                print(f"  note: tie at token {j} (margin {margin:.2g}); rest not compared")
                return
        self.assertEqual(len(ours), len(theirs))


class DenseEquality(TinyModelCase):
    """select_fraction = 1: every decode step attends to every block, so ReSA is
    dense attention and must reproduce transformers exactly (to rounding)."""

    def make(self, model, **kw):
        params = dict(block_size=4, select_fraction=1.0, rectify_interval=2, max_tokens=1024,
                      max_sequences=8, num_threads=1)
        params.update(kw)
        return ResaLM(model, **params)

    def test_generate_matches_transformers_greedy(self):
        model, ref = tiny_llama()
        lm = self.make(model)
        n = 24  # prompts of 1..13 tokens + 24: 7 to 9 blocks of 4 each
        ours = lm.generate(PROMPTS, n)
        for prompt, toks in zip(PROMPTS, ours):
            self.assert_greedy_equal(ref, prompt, toks, hf_greedy(ref, prompt, n))
        self.assertEqual(model.config._attn_implementation, "sdpa",
                         "the model's attention implementation is restored after generate")
        self.assertEqual(lm.ctx.free_tokens(), 1024, "generate releases its sequences")

    def test_step_logits_match_full_forward(self):
        model, ref = tiny_llama()
        lm = self.make(model)
        masks = []
        registry = transformers.AttentionInterface._global_mapping
        original = registry["resa"]

        def probe(module, q, k, v, attention_mask, **kw):
            masks.append(attention_mask)
            return original(module, q, k, v, attention_mask, **kw)

        registry["resa"] = probe
        try:
            seqs, logits = lm.prefill(PROMPTS)
            steps = [logits]
            for _ in range(20):
                toks = steps[-1].argmax(-1).tolist()
                steps.append(lm.decode(seqs, toks))
                self.assertEqual([lm.ctx.seq_pending(s) for s in seqs], [0] * len(seqs),
                                 "r = 1 decodes densely, so nothing is ever pending")
        finally:
            registry["resa"] = original
        self.assertTrue(masks and all(m is None for m in masks),
                        "transformers builds no attention mask for 'resa'")
        worst = 0.0
        for i, (s, prompt) in enumerate(zip(seqs, PROMPTS)):
            toks = lm.tokens(s)
            self.assertEqual(toks[:len(prompt)], prompt)
            self.assertEqual(len(toks), len(prompt) + 20)  # 21 logits: prefill + 20 decodes
            expect = full_logits(ref, toks)[len(prompt) - 1:]
            got = torch.stack([st[i] for st in steps])
            worst = max(worst, float((got - expect).abs().max()))
            torch.testing.assert_close(got, expect, atol=F32_ATOL, rtol=0)
        print(f"  float32 step logits vs SDPA full forward: max |diff| {worst:.2e}")
        lm.release(seqs)

    def test_prefill_split_over_steps(self):
        """Prompts longer than max_step_tokens are prefilled in several APPEND steps."""
        model, ref = tiny_llama()
        lm = self.make(model, max_step_tokens=8)
        seqs, logits = lm.prefill(PROMPTS)
        for i, prompt in enumerate(PROMPTS):
            torch.testing.assert_close(logits[i], full_logits(ref, prompt)[-1],
                                       atol=F32_ATOL, rtol=0)
        lm.release(seqs)

    def test_other_family_members(self):
        """Qwen2 (q/k/v biases) and Mistral without a window run exactly too."""
        from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
        for cfg_cls, model_cls, extra in ((Qwen2Config, Qwen2ForCausalLM, {}),
                                          (MistralConfig, MistralForCausalLM,
                                           {"sliding_window": None})):
            model, ref = tiny_llama(config_cls=cfg_cls, model_cls=model_cls, **extra)
            lm = self.make(model)
            prompt = PROMPTS[0]
            seqs, logits = lm.prefill([prompt])
            steps = [logits[0]]
            for _ in range(6):
                steps.append(lm.decode(seqs, [int(steps[-1].argmax())])[0])
            expect = full_logits(ref, lm.tokens(seqs[0]))[len(prompt) - 1:]
            torch.testing.assert_close(torch.stack(steps), expect, atol=F32_ATOL, rtol=0,
                                       msg=lambda m: f"{cfg_cls.__name__}: {m}")


class SparseAndRectify(TinyModelCase):
    """Block-sparse decode with rectification, teacher-forced on fixed tokens so that
    every run sees the same ids and the SDPA model gives the dense truth."""
    PROMPT = [int(t) for t in torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(1))]
    CONT = [int(t) for t in torch.randint(0, 128, (26,), generator=torch.Generator().manual_seed(2))]
    R = 0.25

    def run_forced(self, model, rectify_interval, mutate=None):
        """Decodes CONT after PROMPT with r = 0.25 (2 to 4 of 7..13 blocks of 4).  Right
        after each rectification the next token is decoded with r = 1 instead: a dense step over the cache, whose logits equal the dense
        truth only if every K/V in the cache does.  Returns (errors of those dense
        probes, errors of the sparse steps)."""
        lm = ResaLM(model, block_size=4, select_fraction=self.R, select_min_blocks=1,
                    local_blocks=1, rectify_interval=rectify_interval, max_tokens=256,
                    max_sequences=2, num_threads=1)
        if mutate:
            mutate(lm)
        truth = full_logits(self.ref, self.PROMPT + self.CONT)
        seqs, _ = lm.prefill([self.PROMPT])
        probes, sparse, rectified, dense_probe = [], [], 0, False
        for j, t in enumerate(self.CONT):
            pos = len(self.PROMPT) + j
            lm.ctx.set("select_fraction", 1.0 if dense_probe else self.R)
            pending_before = lm.ctx.seq_pending(seqs[0])
            logits = lm.decode(seqs, [t])[0]
            # a dense step leaves pending as it was; a sparse one adds 1 unless rectified
            just_rectified = not dense_probe and lm.ctx.seq_pending(seqs[0]) == 0
            self.assertTrue(just_rectified or lm.ctx.seq_pending(seqs[0]) ==
                            pending_before + (0 if dense_probe else 1))
            rectified += just_rectified
            err = float((logits - truth[pos]).abs().max())
            (probes if dense_probe else sparse).append(err)
            dense_probe = just_rectified  # probe the cache right after each rectification
        self.assertEqual(lm.tokens(seqs[0]), self.PROMPT + self.CONT)
        lm.close()
        return probes, sparse, rectified

    @classmethod
    def setUpClass(cls):
        cls.model, cls.ref = tiny_llama(layers=3, seed=3)

    def test_rectified_cache_is_dense(self):
        probes, sparse, rectified = self.run_forced(self.model, rectify_interval=4)
        print(f"  {rectified} rectifications; dense probes max err {max(probes):.2e}; "
              f"sparse steps max err {max(sparse):.2e}")
        self.assertGreaterEqual(rectified, 4)
        self.assertGreaterEqual(len(probes), 4)
        self.assertLess(max(probes), F32_ATOL, "after rectification the cache is the dense cache")
        self.assertGreater(max(sparse), 100 * F32_ATOL, "sparse steps attend to fewer blocks")

    def test_controls_fail_the_probe(self):
        """The probe is sharp: rectification fed wrong token ids or wrong positions
        leaves a wrong cache that the dense probes see (no rectification at all:
        test_no_rectification_leaves_drift)."""
        def wrong_ids(lm):
            forward = lm._forward

            def shifted(step, ids, pos, keep):
                if keep == []:  # only rectification skips the LM head
                    ids = [(t + 1) % 128 for t in ids]
                return forward(step, ids, pos, keep)
            lm._forward = shifted

        def wrong_positions(lm):
            forward = lm._forward

            def shifted(step, ids, pos, keep):
                if keep == []:
                    pos = [p + 1 for p in pos]
                return forward(step, ids, pos, keep)
            lm._forward = shifted

        for name, interval, mutate in (("ids", 4, wrong_ids), ("positions", 4, wrong_positions)):
            probes, _, rectified = self.run_forced(self.model, interval, mutate)
            self.assertGreaterEqual(rectified, 4)
            print(f"  wrong rectification {name}: dense probes max err {max(probes):.2e}")
            self.assertGreater(max(probes), 100 * F32_ATOL, f"wrong {name} must be visible")

    def test_no_rectification_leaves_drift(self):
        """Sparse decoding without rectification, then one dense step: its logits are
        off, because the sparse steps' K/V (layers >= 1) are not the dense ones."""
        lm = ResaLM(self.model, block_size=4, select_fraction=self.R, select_min_blocks=1,
                    rectify_interval=0, max_tokens=256, max_sequences=2, num_threads=1)
        truth = full_logits(self.ref, self.PROMPT + self.CONT)
        seqs, _ = lm.prefill([self.PROMPT])
        for t in self.CONT[:-1]:
            lm.decode(seqs, [t])
        self.assertEqual(lm.ctx.seq_pending(seqs[0]), len(self.CONT) - 1)
        lm.ctx.set("select_fraction", 1.0)
        drift = float((lm.decode(seqs, self.CONT[-1:])[0] - truth[-1]).abs().max())
        # the same after rectifying by hand: exact again
        lm.ctx.set("select_fraction", self.R)
        seqs2, _ = lm.prefill([self.PROMPT])
        for t in self.CONT[:-1]:
            lm.decode(seqs2, [t])
        lm.rectify(seqs2)
        self.assertEqual(lm.ctx.seq_pending(seqs2[0]), 0)
        lm.ctx.set("select_fraction", 1.0)
        fixed = float((lm.decode(seqs2, self.CONT[-1:])[0] - truth[-1]).abs().max())
        print(f"  one dense step after {len(self.CONT) - 1} sparse ones: err {drift:.2e} "
              f"unrectified, {fixed:.2e} after lm.rectify")
        self.assertGreater(drift, 100 * F32_ATOL)
        self.assertLess(fixed, F32_ATOL)
        lm.close()

    def test_selection_follows_budget(self):
        """With record_selection, each (layer, KV head) attends n = max(ceil(r M),
        min(M, n_min)) blocks, the current block among them."""
        n_min = 2
        lm = ResaLM(self.model, block_size=4, select_fraction=self.R, select_min_blocks=n_min,
                    rectify_interval=0, record_selection=True, max_tokens=256, num_threads=1)
        seqs, _ = lm.prefill([self.PROMPT])
        for t in self.CONT:
            lm.decode(seqs, [t])
            m = math.ceil(len(lm.tokens(seqs[0])) / 4)
            want = max(math.ceil(self.R * m), min(m, n_min))
            for layer in range(3):
                for head in range(2):
                    blocks = lm.ctx.selected_blocks(seqs[0], layer, head)
                    self.assertEqual(len(blocks), want)
                    self.assertIn(m - 1, blocks)
        lm.close()


class Sampling(TinyModelCase):
    @classmethod
    def setUpClass(cls):
        cls.model, cls.ref = tiny_llama()
        cls.lm = ResaLM(cls.model, block_size=4, select_fraction=0.5, select_min_blocks=1,
                        rectify_interval=4, max_tokens=1024, num_threads=1)

    def sample(self, seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return self.lm.generate(PROMPTS, 16, do_sample=True, generator=g, **kw)

    def test_seeded_sampling_is_reproducible(self):
        kw = dict(temperature=0.8, top_k=20, top_p=0.9)
        a, b, c = self.sample(123, **kw), self.sample(123, **kw), self.sample(124, **kw)
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)
        self.assertEqual([len(x) for x in a], [16] * len(PROMPTS))

    def test_top_k_1_is_greedy(self):
        self.assertEqual(self.sample(5, top_k=1), self.lm.generate(PROMPTS, 16))
        self.assertEqual(self.sample(6, top_p=0.0), self.lm.generate(PROMPTS, 16))

    def test_eos_stops_each_sequence(self):
        greedy = self.lm.generate(PROMPTS, 16)
        first = greedy[0]
        k = next(j for j in range(2, 16) if first[j] not in first[:j])
        eos = first[k]
        out = self.lm.generate(PROMPTS, 16, eos_token_id=eos)
        for g, o in zip(greedy, out):
            self.assertEqual(o, g[:g.index(eos) + 1] if eos in g else g)
        self.assertEqual(out[0], first[:k + 1])
        out = self.lm.generate(PROMPTS, 16, eos_token_id=[eos, 1000])
        self.assertEqual(out[0], first[:k + 1])
        self.assertEqual(self.lm.ctx.free_tokens(), 1024)

    def test_length_limit(self):
        self.assertEqual([len(x) for x in self.lm.generate(PROMPTS, 1)], [1] * len(PROMPTS))
        self.assertEqual(self.lm.generate(PROMPTS, 0), [[] for _ in PROMPTS])


class BFloat16(TinyModelCase):
    def test_bf16_cpu_close_to_sdpa(self):
        model, ref = tiny_llama(dtype=torch.bfloat16)
        lm = ResaLM(model, block_size=4, select_fraction=1.0, max_tokens=256, num_threads=1)
        self.assertEqual(lm.ctx.get("io_dtype"), int(resa.DType.BF16))
        cont = [3, 9, 27, 81, 115, 89, 11, 33, 99, 41]
        seqs, logits = lm.prefill(PROMPTS[:2])
        steps = [logits]
        for t in cont:
            steps.append(lm.decode(seqs, [t, t]))
        for i, prompt in enumerate(PROMPTS[:2]):
            expect = full_logits(ref, prompt + cont)[len(prompt) - 1:]
            got = torch.stack([st[i] for st in steps])
            tol = 0.05 * float(expect.abs().max())
            err = float((got - expect).abs().max())
            print(f"  bfloat16 logits: max |diff| {err:.3g}, tolerance {tol:.3g}")
            self.assertLess(err, tol)
            self.assertGreater(float((expect - full_logits(ref, prompt + cont[::-1])
                                      [len(prompt) - 1:]).abs().max()), tol,
                               "the tolerance separates other token histories")
        lm.release(seqs)


class Refusals(unittest.TestCase):
    def test_unsupported_models(self):
        from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
        model, _ = tiny_llama(config_cls=MistralConfig, model_cls=MistralForCausalLM,
                              sliding_window=16)
        with self.assertRaisesRegex(ValueError, "sliding"):
            ResaLM(model, max_tokens=256)
        ResaLM(model, max_tokens=256, max_seq_tokens=16).close()  # window covers every sequence
        model, _ = tiny_llama(config_cls=Qwen2Config, model_cls=Qwen2ForCausalLM,
                              use_sliding_window=True, sliding_window=8, max_window_layers=1)
        with self.assertRaisesRegex(ValueError, "full attention|sliding"):
            ResaLM(model, max_tokens=256)
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0,
            eos_token_id=0))
        with self.assertRaisesRegex(ValueError, "not supported"):
            ResaLM(gpt2)
        model, _ = tiny_llama()
        with self.assertRaisesRegex(ValueError, "cuda"):
            ResaLM(model, backend="cuda")
        with self.assertRaises(TypeError):
            ResaLM(model, head_dim=16)
        model.config.attn_logit_softcapping = 30.0
        with self.assertRaisesRegex(ValueError, "softcapping"):
            ResaLM(model)

    def test_outside_a_step(self):
        model, _ = tiny_llama()
        lm = ResaLM(model, max_tokens=256, num_threads=1)
        model.config._attn_implementation = "resa"
        with self.assertRaisesRegex(RuntimeError, "without an open libresa step"):
            model(input_ids=torch.tensor([[1, 2]]))
        model.config._attn_implementation = "sdpa"
        with self.assertRaisesRegex(ValueError, "unknown sequence"):
            lm.decode([12345], [1])
        lm.close()


def cuda_reason():
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not resa.backend_available(resa.Backend.CUDA):
        return "libresa's CUDA backend is not available (not built, or no usable GPU)"
    return None


@unittest.skipIf(cuda_reason() is not None, f"CUDA tests: {cuda_reason()}")
class Cuda(TinyModelCase):
    @classmethod
    def setUpClass(cls):
        model, ref = tiny_llama(dtype=torch.bfloat16, head_dim=64, hidden=256, heads=4,
                                kv_heads=2, layers=2)
        cls.model, cls.ref = model.cuda(), ref.cuda()

    def make(self, **kw):
        return ResaLM(self.model, block_size=8, select_fraction=1.0, rectify_interval=4,
                      max_tokens=4096, **kw)

    def test_dense_bf16_matches_sdpa(self):
        """r = 1 on the CUDA backend, bfloat16: teacher-forced step logits within the
        bfloat16 tolerance of SDPA's, and greedy tokens equal to transformers' up to
        a bfloat16 tie (top-2 closer than that tolerance)."""
        lm = self.make()
        self.assertEqual(lm.ctx.backend, resa.Backend.CUDA)
        cont = [3, 9, 27, 81, 115, 89, 11, 33, 99, 41, 7, 70, 1, 2, 120, 64, 32]
        seqs, logits = lm.prefill(PROMPTS)
        steps = [logits]
        for t in cont:
            steps.append(lm.decode(seqs, [t] * len(PROMPTS)))
        tie = 0.0
        for i, prompt in enumerate(PROMPTS):
            expect = full_logits(self.ref, prompt + cont)[len(prompt) - 1:]
            got = torch.stack([st[i] for st in steps])
            tol = 0.05 * float(expect.abs().max())
            tie = max(tie, tol)
            err = float((got - expect).abs().max())
            print(f"  CUDA bfloat16 logits: max |diff| {err:.3g}, tolerance {tol:.3g}")
            self.assertLess(err, tol)
        lm.release(seqs)
        n = 24
        ours = lm.generate(PROMPTS, n)
        for prompt, toks in zip(PROMPTS, ours):
            self.assert_greedy_equal(self.ref, prompt, toks, hf_greedy(self.ref, prompt, n), tie)
        lm.close()

    def test_cuda_graph_same_tokens(self):
        sparse = dict(select_fraction=0.25, select_min_blocks=1)
        eager = ResaLM(self.model, block_size=8, rectify_interval=4, max_tokens=4096, **sparse)
        graphed = ResaLM(self.model, block_size=8, rectify_interval=4, max_tokens=4096,
                         cuda_graph=True, **sparse)
        for _ in range(2):  # the second call replays graphs captured by the first
            want = eager.generate(PROMPTS, 40)
            got = graphed.generate(PROMPTS, 40)
            self.assertEqual(got, want)
        self.assertEqual(graphed.stats["graph_captures"], 1, graphed.stats)
        self.assertGreater(graphed.stats["graph_replays"], 60, graphed.stats)
        eager.close()
        graphed.close()


if __name__ == "__main__":
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    unittest.main(verbosity=2)
