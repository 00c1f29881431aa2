"""A float64 numpy LLaMA decoder (batch 1) built from a model's parameters: the independent reference of the
KV-policy engine tests. RMSNorm, GQA, half-split RoPE and SwiGLU are written here from the formulas; nothing is
shared with the code under test but the parameters.

The cache holds pre-RoPE keys ``[N, K, D]`` per layer; entry ``n`` of KV head ``g`` is rotated at position ``n``
(its index in the cache), so after an eviction the kept entries are renumbered ``0…`` in order, as the renumbering
policies do, and different heads may hold different tokens. Subclasses choose what a chunk's queries attend to
(:meth:`NumpyDecoder.attended`) and what a layer keeps after a chunk (:meth:`NumpyDecoder.evict`).
"""

from __future__ import annotations

import numpy as np

from lcm.models.llama import Llama


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Half-split rotation of ``x [N, H, D]`` at ``positions [N]``."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


class NumpyDecoder:
    """Full attention over whatever the cache holds; ``feed(tokens)`` returns the logits of every fed token."""

    def __init__(self, model: Llama):
        cfg = model.config
        self.cfg = cfg
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

    def _norm(self, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)

    def attended(self, layer: int, q: np.ndarray) -> np.ndarray:
        """Cache entries the chunk's pre-RoPE queries ``q [T, H, D]`` attend to (ascending); all by default."""
        return np.arange(len(self.keys[layer]))

    def new_entries(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Called with the chunk's pre-RoPE projections after its entries joined the cache."""

    def evict(self, final: bool) -> None:
        """Called after each prefill chunk of the evictable part of the prompt (``final``: its last chunk)."""

    def _attention(self, layer: int, q: np.ndarray, first_slot: int) -> np.ndarray:
        cfg = self.cfg
        group = cfg.num_heads // cfg.num_kv_heads
        index = self.attended(layer, q)
        keys = rope(self.keys[layer][index], np.arange(len(index)), self.inv_freq)  # contiguous positions
        values = self.values[layer][index]
        out = np.zeros_like(q)
        for t in range(len(q)):
            slot = first_slot + t
            q_t = rope(q[t : t + 1], np.asarray([int((index < slot).sum())]), self.inv_freq)[0]
            visible = index <= slot
            for h in range(cfg.num_heads):
                logits = keys[visible, h // group] @ q_t[h] / np.sqrt(cfg.head_dim)
                out[t, h] = softmax(logits) @ values[visible, h // group]
        return out

    def feed(self, tokens: list[int]) -> np.ndarray:
        x = self.embed[np.asarray(tokens)]
        first_slot = len(self.keys[0])
        for layer, p in enumerate(self.layers):
            h = self._norm(x, p["norm1"])
            q = np.einsum("td,dhk->thk", h, p["q"])
            k, v = np.einsum("td,dhk->thk", h, p["k"]), np.einsum("td,dhk->thk", h, p["v"])
            self.keys[layer] = np.concatenate([self.keys[layer], k])
            self.values[layer] = np.concatenate([self.values[layer], v])
            self.new_entries(layer, q, k, v)
            x = x + np.einsum("thk,hkd->td", self._attention(layer, q, first_slot), p["o"])
            h = self._norm(x, p["norm2"])
            x = x + (silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
        return self._norm(x, self.final_norm) @ self.head

    def generate(
        self, prompt: list[int], chunk: int, max_new_tokens: int, tail: int = 0
    ) -> tuple[np.ndarray, list[int]]:
        """Prefill in chunks (evicting after each chunk of the first ``len(prompt) - tail`` tokens), then greedy
        decoding; returns the prefill's last logits and the ``max_new_tokens`` greedy tokens."""
        split = len(prompt) - tail
        starts = [*range(0, split, chunk), *range(split, len(prompt), chunk)]
        for start in starts:
            end = min(start + chunk, split if start < split else len(prompt))
            logits = self.feed(prompt[start:end])
            if start < split:
                self.evict(final=end == split)
        prefill_logits, out = logits[-1], [int(np.argmax(logits[-1]))]
        while len(out) < max_new_tokens:
            out.append(int(np.argmax(self.feed(out[-1:])[-1])))
        return prefill_logits, out
