"""Locret retaining heads: a small MLP per layer that predicts how much each cached entry will matter.

Huang et al. 2024, "Locret: Accelerating Long-Context LLM Inference with Retaining Heads" (arXiv 2410.01805),
METHODS.md §9. For one token of one layer, the head reads the
concatenated **pre-RoPE** projections ``[q, k, v]`` (all query heads, then the KV heads) and predicts one
*causal importance score* (CIS) per KV head::

    S̃ = W2 · σ(W1 · [q, k, v])          W1: (H + 2K)·D -> hidden,  W2: hidden -> K

The eviction policy (:class:`lcm.cache.locret.Locret`) keeps, per layer and KV head, the cached entries with the
highest predicted scores. The decoder layer calls ``block.retaining(q, k, v)`` right after
``block.attn.project_qkv`` when a head is attached (:func:`attach_retaining_heads`).

What we took from the official code (huangyuxiang03/Locret, ``locret/models/llama/modeling_llama.py``):

- ``fc1 = Linear((2·K + H)·D, 1024, bias=False)``, ``fc2 = Linear(1024, K, bias=False)`` (``:311-312``): no bias
  on either matrix; σ is the model's own activation, ``ACT2FN[config.hidden_act]`` (``:313``), SiLU for LLaMA.
- The input is ``torch.cat((query_states, key_states, value_states), dim=-1)`` taken straight from the
  projections, before the heads are split and before RoPE (``:570-580``); head-major flattening ``h·D + d`` as
  the projection's output layout. Our ``w1`` rows follow the same order, so official ``fc1.weight.T`` loads as is.

Deviations, and why:

- Hidden width: the official heads use 1024 units for Llama-3.1-8B (2.5% of its parameters) and Phi-3-mini
  (7.9%). A 135M model with 1024 units would spend 22% of its size on the heads; :func:`retaining_hidden_width`
  keeps the paper's *proportion* (2.5% by default) instead, rounded to a multiple of 16 (112 for SmolLM2-135M).
- The heads compute in float32 whatever the model's dtype (the official ones run in bfloat16): they are small,
  and their scores are compared across a whole prompt by top-k.
- Initialisation is ``N(0, 1/fan_in)`` (torch's default for ``nn.Linear`` is ``U(±1/sqrt(fan_in))``); the
  official heads start from that default too, the paper gives no special init.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from lcm.models.llama import Llama, LlamaConfig, abstract_model, param_count

HIDDEN_MULTIPLE = 16  # hidden widths are rounded to this (matmul-friendly tiles)
PAPER_FRACTION = 0.025  # the heads' share of Llama-3.1-8B's parameters in the paper (1024 hidden units)


def _param(rngs: nnx.Rngs, shape: tuple[int, int], axes: tuple[str | None, str | None]) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * shape[0] ** -0.5
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def retaining_in_features(config: LlamaConfig) -> int:
    """Width of one token's ``[q, k, v]``: ``(H + 2K)·D``."""
    return (config.num_heads + 2 * config.num_kv_heads) * config.head_dim


@functools.lru_cache(maxsize=16)
def _model_param_count(config: LlamaConfig) -> int:
    return param_count(abstract_model(config))


def retaining_hidden_width(config: LlamaConfig, fraction: float = PAPER_FRACTION) -> int:
    """Hidden units per head so that the heads of all layers hold ``fraction`` of the model's parameters
    (embeddings included, as the paper's 2.5% of Llama-3.1-8B does), rounded to a multiple of 16, at least 16."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ValueError(f"retaining heads: fraction={fraction!r} must be a number in (0, 1) (the paper's 0.025)")
    model_params = _model_param_count(config)
    per_unit = config.num_layers * (retaining_in_features(config) + config.num_kv_heads)
    units = round(fraction * model_params / per_unit / HIDDEN_MULTIPLE) * HIDDEN_MULTIPLE
    return max(HIDDEN_MULTIPLE, units)


class RetainingHead(nnx.Module):
    """One layer's head: ``S̃ = W2 · silu(W1 · [q, k, v])``, one float32 score per KV head and token."""

    def __init__(self, config: LlamaConfig, hidden_width: int, *, rngs: nnx.Rngs):
        if not isinstance(hidden_width, int) or isinstance(hidden_width, bool) or hidden_width <= 0:
            raise ValueError(f"retaining head: hidden_width={hidden_width!r} must be a positive integer")
        in_features = retaining_in_features(config)
        self.w1 = _param(rngs, (in_features, hidden_width), (None, "mlp"))
        self.w2 = _param(rngs, (hidden_width, config.num_kv_heads), ("mlp", "kv_heads"))
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim

    def __call__(
        self, q: Float[Array, "B T H D"], k: Float[Array, "B T K D"], v: Float[Array, "B T K D"]
    ) -> Float[Array, "B T K"]:
        batch, length = q.shape[:2]
        chex.assert_shape(q, (batch, length, self.num_heads, self.head_dim))
        chex.assert_shape([k, v], (batch, length, self.num_kv_heads, self.head_dim))
        qkv_BxTxI = jnp.concatenate(
            [x.reshape(batch, length, -1).astype(jnp.float32) for x in (q, k, v)], axis=-1
        )  # the official order: all query heads, then keys, then values, head-major
        hidden_BxTxN = jax.nn.silu(qkv_BxTxI @ self.w1[...])
        return hidden_BxTxN @ self.w2[...]


class RetainingHeads(nnx.Module):
    """One :class:`RetainingHead` per decoder layer of a model with ``config``."""

    def __init__(self, config: LlamaConfig, hidden_width: int | None = None, *, rngs: nnx.Rngs):
        self.config = config
        self.hidden_width = retaining_hidden_width(config) if hidden_width is None else hidden_width
        self.heads = nnx.List([RetainingHead(config, self.hidden_width, rngs=rngs) for _ in range(config.num_layers)])


def attach_retaining_heads(model: Llama, heads: RetainingHeads) -> Llama:
    """A copy of ``model`` whose ``layers[i].retaining`` is (a copy of) head ``i``; ``model`` itself is unchanged."""
    cfg, head_cfg = model.config, heads.config
    ours = (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    theirs = (head_cfg.num_layers, head_cfg.num_heads, head_cfg.num_kv_heads, head_cfg.head_dim)
    if ours != theirs:
        raise ValueError(
            f"retaining heads were built for (layers, heads, kv_heads, head_dim) = {theirs}; the model has {ours}"
        )
    attached = nnx.clone(model)
    for block, head in zip(attached.layers, heads.heads, strict=True):
        block.retaining = nnx.clone(head)
    return attached


def has_retaining_heads(model: Llama) -> bool:
    """Whether every decoder layer of ``model`` has a retaining head attached."""
    return all(isinstance(getattr(block, "retaining", None), RetainingHead) for block in model.layers)
