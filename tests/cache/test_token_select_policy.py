"""TokenSelect in the Engine: chunked prefill and decode against a float64 numpy decoder that selects by the
paper's rules (METHODS §5) on its own, the full-cache equivalence below the budget, and bad input.

The reference re-implements the whole tiny decoder (RMSNorm, GQA, half-split RoPE, SwiGLU) in numpy from the
model's parameters, and TokenSelect per layer and chunk: pre-RoPE keys, fingerprint = mean query rotated at
``n_local + t``, soft vote over the candidates, ``n_init`` ∪ top-k ∪ ``n_local``, contiguous positions, and the
selection cache's reuse rule. Only the parameters are shared with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from lcm.cache.policies import POLICIES, TokenSelect, make_policy
from lcm.generate import Engine
from lcm.models.llama import Llama


def _rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Half-split rotation of ``x [N, H, D]`` at ``positions [N]``."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class ReferenceTokenSelect:
    """A numpy float64 decoder for batch 1 whose attention follows TokenSelect; ``feed(tokens)`` returns the
    logits of every fed token."""

    def __init__(self, model: Llama, n_init: int, k: int, n_local: int, threshold: float):
        cfg = model.config
        self.cfg, self.n_init, self.k, self.n_local, self.threshold = cfg, n_init, k, n_local, threshold
        self.budget = n_init + k + n_local
        f64 = lambda p: np.asarray(p[...], np.float64)
        self.embed = f64(model.embed)
        self.head = f64(model.lm_head) if not cfg.tie_embeddings else self.embed.T
        self.final_norm = f64(model.final_norm.scale)
        self.layers = [
            {
                "norm1": f64(b.input_norm.scale),
                "norm2": f64(b.post_attention_norm.scale),
                "q": f64(b.attn.q_proj),
                "k": f64(b.attn.k_proj),
                "v": f64(b.attn.v_proj),
                "o": f64(b.attn.o_proj),
                "gate": f64(b.mlp.gate_proj),
                "up": f64(b.mlp.up_proj),
                "down": f64(b.mlp.down_proj),
            }
            for b in model.layers
        ]
        self.inv_freq = cfg.rope_base ** (-np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
        self.keys = [np.zeros((0, cfg.num_kv_heads, cfg.head_dim)) for _ in self.layers]
        self.values = [np.zeros((0, cfg.num_kv_heads, cfg.head_dim)) for _ in self.layers]
        self.cached: list[tuple[np.ndarray, np.ndarray] | None] = [None for _ in self.layers]  # (q̄, top-k)
        self.selections = 0  # layer steps that attended to a selection
        self.reuses = 0  # ... of which reused the cached top-k

    def _norm(self, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)

    def _select(self, layer: int, q: np.ndarray, n: int) -> list[int]:
        """The entries a chunk of queries ``q [T, H, D]`` attends to in a layer of ``n`` entries (``n > budget``)."""
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        q_mean = _rope(q, self.n_local + np.arange(len(q)), self.inv_freq).mean(axis=0)  # [H, D]
        candidates = np.arange(self.n_init, n - self.n_local)
        cached = self.cached[layer]
        if cached is not None:
            a, b = q_mean.ravel(), cached[0].ravel()
            if a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= self.threshold and cached[1][-1] < n - self.n_local:
                self.reuses += 1
                top = cached[1]
                return [*range(self.n_init), *top.tolist(), *range(n - self.n_local, n)]
        keys = self.keys[layer][candidates]  # [C, K, D], pre-RoPE
        scores = np.stack([keys[:, h // group] @ q_mean[h] for h in range(self.cfg.num_heads)])  # no 1/sqrt(d)
        votes = _softmax(scores).sum(axis=0)
        top = np.sort(candidates[np.argsort(-votes, kind="stable")[: self.k]])
        self.cached[layer] = (q_mean, top)
        return [*range(self.n_init), *top.tolist(), *range(n - self.n_local, n)]

    def _attention(self, layer: int, q: np.ndarray, first_slot: int) -> np.ndarray:
        cfg, n = self.cfg, len(self.keys[layer])
        group = cfg.num_heads // cfg.num_kv_heads
        selected = list(range(n)) if n <= self.budget else self._select(layer, q, n)
        self.selections += n > self.budget
        index = np.asarray(selected)
        keys = _rope(self.keys[layer][index], np.arange(len(index)), self.inv_freq)  # contiguous positions
        values = self.values[layer][index]
        out = np.zeros_like(q)
        for t in range(len(q)):
            slot = first_slot + t
            position = int((index < slot).sum())
            q_t = _rope(q[t : t + 1], np.asarray([position]), self.inv_freq)[0]
            visible = index <= slot
            for h in range(cfg.num_heads):
                logits = keys[visible, h // group] @ q_t[h] / np.sqrt(cfg.head_dim)
                out[t, h] = _softmax(logits) @ values[visible, h // group]
        return out

    def feed(self, tokens: list[int]) -> np.ndarray:
        x = self.embed[np.asarray(tokens)]
        first_slot = len(self.keys[0])
        for layer, p in enumerate(self.layers):
            h = self._norm(x, p["norm1"])
            q = np.einsum("td,dhk->thk", h, p["q"])
            self.keys[layer] = np.concatenate([self.keys[layer], np.einsum("td,dhk->thk", h, p["k"])])
            self.values[layer] = np.concatenate([self.values[layer], np.einsum("td,dhk->thk", h, p["v"])])
            x = x + np.einsum("thk,hkd->td", self._attention(layer, q, first_slot), p["o"])
            h = self._norm(x, p["norm2"])
            gate = h @ p["gate"]
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ p["up"])) @ p["down"]
        return self._norm(x, self.final_norm) @ self.head

    def generate(self, prompt: list[int], chunk: int, max_new_tokens: int) -> tuple[np.ndarray, list[int]]:
        for start in range(0, len(prompt), chunk):
            logits = self.feed(prompt[start : start + chunk])
        prefill_logits, out = logits[-1], [int(np.argmax(logits[-1]))]
        while len(out) < max_new_tokens:
            out.append(int(np.argmax(self.feed(out[-1:])[-1])))
        return prefill_logits, out


@pytest.mark.parametrize("threshold", [2.0, -1.0], ids=["never-reuse", "always-reuse"])
def test_prefill_and_decode_match_the_numpy_reference(model: Llama, threshold: float) -> None:
    policy = TokenSelect(budget=16, n_init=2, n_local=8, threshold=threshold)  # k = 6
    tokens = np.random.default_rng(7).integers(0, model.config.vocab_size, (1, 45))  # 6 chunks, the last one ragged
    engine = Engine(model, chunk_size=8, policy=policy)
    cache = engine.new_cache(1, 45 + 8)
    logits, cache = engine.prefill(tokens, cache)
    reference = ReferenceTokenSelect(model, n_init=2, k=6, n_local=8, threshold=threshold)
    want_logits, want_tokens = reference.generate(tokens[0].tolist(), chunk=8, max_new_tokens=8)
    assert reference.selections > 0
    if threshold < 0:
        assert reference.reuses > 0  # the cached selection is exercised, not only recomputation
    else:
        assert reference.reuses == 0
    # float32 against float64 through 2 layers of O(1) activations: round-off ~1e-6; a wrong selection or
    # position moves logits by O(0.1)
    np.testing.assert_allclose(np.asarray(logits[0]), want_logits, atol=1e-4, rtol=1e-4)
    assert bool(np.asarray(cache.selection.filled).all())
    np.testing.assert_array_equal(engine.generate(tokens, 8)[0], want_tokens)


def test_the_engine_prefills_in_chunks_that_fit_the_local_window(model: Llama) -> None:
    engine = Engine(model, chunk_size=512, policy=TokenSelect(budget=64))
    assert engine.policy.attention_rule().n_local == 32 and engine.chunk_size == 32
    assert engine.prompt_capacity(1000) == 1000  # nothing is evicted: the cache holds the whole prompt


def test_defaults_split_the_budget_as_the_paper() -> None:
    rule = TokenSelect(budget=2688).attention_rule()
    assert (rule.n_init, rule.k, rule.n_local, rule.threshold) == (128, 2048, 512, 0.9)  # METHODS §5
    rule = make_policy("tokenselect", 1024).attention_rule()
    assert (rule.n_init, rule.k, rule.n_local) == (128, 384, 512)
    assert POLICIES["tokenselect"] is TokenSelect


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_policy("tokenselect", 64, n_init=32, n_local=32), "budget=64 is smaller than the 65 tokens"),
        (lambda: make_policy("tokenselect", 64, n_local=2.5), "n_local=2.5 must be an integer"),
        (lambda: make_policy("tokenselect", 64, threshold="high"), "threshold='high' must be a number"),
        (lambda: make_policy("tokenselect", 64, n_local=0), "n_local=0 leaves the current token out"),
        (lambda: make_policy("tokenselect", 64, k=8), "unknown parameter 'k'"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
