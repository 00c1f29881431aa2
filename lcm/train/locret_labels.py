"""The frozen model's forward for Locret's training: features and causal-importance labels of a sample.

One forward of the frozen model over prompt + answer, its own modules run layer by layer (the decoder layers
stacked and scanned: one traced layer), gives per layer the pre-RoPE ``q, k, v`` of the prompt tokens (what the
retaining heads read) and the CIS labels: for each prompt token and KV head, the largest pre-softmax logit
``q·k/sqrt(D)`` of RoPE-rotated answer queries of its GQA group. Why these choices, with line references into the
official code: :mod:`lcm.train.locret`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from lcm.kernels.attention import api as attention_api
from lcm.kernels.attention.config import XlaConfig
from lcm.models.llama import Llama
from lcm.ops import masks
from lcm.ops.rotary import apply_rope

FEATURE_DTYPE = jnp.bfloat16  # stored features (labels stay float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Backbone:
    """The frozen model as arrays for one jitted program: its decoder layers stacked on a leading axis (scanned,
    so a 30-layer model traces and compiles one layer) and RoPE tables for one sequence length."""

    layers: nnx.State  # every Block's parameters, stacked [L, ...]
    embed: jax.Array  # [V, D]
    final_norm: nnx.State
    inv_freq: jax.Array  # [D/2] float32
    attention_factor: jax.Array  # [] float32
    layer_graphdef: nnx.GraphDef = dataclasses.field(metadata={"static": True})
    norm_graphdef: nnx.GraphDef = dataclasses.field(metadata={"static": True})
    window: int | None = dataclasses.field(metadata={"static": True})
    q_block: int = dataclasses.field(metadata={"static": True})
    kv_block: int = dataclasses.field(metadata={"static": True})


def backbone_of(model: Llama, seq_len: int) -> Backbone:
    """The arrays :func:`layerwise_pass` reads, for sequences of ``seq_len`` tokens at positions ``0…seq_len-1``."""
    layer_graphdef, _ = nnx.split(model.layers[0])
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(block) for block in model.layers])
    norm_graphdef, final_norm = nnx.split(model.final_norm)
    inv_freq, attention_factor = model.rope_tables(seq_len)
    cfg = model.config
    return Backbone(
        layers=layers,
        embed=model.embed[...],
        final_norm=final_norm,
        inv_freq=jnp.asarray(inv_freq, jnp.float32),
        attention_factor=jnp.asarray(attention_factor, jnp.float32),
        layer_graphdef=layer_graphdef,
        norm_graphdef=norm_graphdef,
        window=cfg.sliding_window,
        q_block=cfg.attention_q_block,
        kv_block=cfg.attention_kv_block,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Example:
    """Features and labels of the ``P`` prompt tokens of one sample, for every layer."""

    q: Float[Array, "L B P H D"]  # pre-RoPE projections: what the retaining heads read
    k: Float[Array, "L B P K D"]
    v: Float[Array, "L B P K D"]
    cis: Float[Array, "L B P K"]  # causal importance scores (float32): the labels


def causal_importance(q_answer: Float[Array, "B A H D"], k_prompt: Float[Array, "B P K D"]) -> Float[Array, "B P K"]:
    """CIS labels: for each prompt key and KV head, the largest pre-softmax logit ``q·k/sqrt(D)`` over the answer
    queries and the query heads of its GQA group (query head ``h`` reads KV head ``h // (H/K)``). Pass RoPE-rotated
    queries and keys, as the official labels are (module docstring)."""
    batch, answer, num_heads, head_dim = q_answer.shape
    num_kv_heads = k_prompt.shape[2]
    chex.assert_shape(k_prompt, (batch, None, num_kv_heads, head_dim))
    q_BxAxKxGxD = q_answer.reshape(batch, answer, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits_BxKxGxAxP = jnp.einsum(
        "bakgd,bpkd->bkgap", q_BxAxKxGxD.astype(jnp.float32), k_prompt.astype(jnp.float32)
    ) * jnp.float32(head_dim**-0.5)
    return logits_BxKxGxAxP.max(axis=(2, 3)).swapaxes(1, 2)


def layerwise_pass(
    backbone: Backbone, tokens: Int[Array, "B T"], prompt_length: int
) -> tuple[Float[Array, "B T D"], Example]:
    """The model's forward over ``tokens`` (positions ``0…T-1``, causal), one decoder layer at a time with the
    model's own modules: the final hidden states (after the final norm; equal to ``Llama.hidden_states``'s to float
    round-off, tested) and, per layer, the features and CIS labels of the first ``prompt_length`` tokens (the rest
    are the answer)."""
    batch, seq = tokens.shape
    if not 0 < prompt_length < seq:
        raise ValueError(f"prompt_length={prompt_length} must lie in (0, {seq}): the answer needs at least one token")
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def layer(x: jax.Array, layer_params: nnx.State) -> tuple[jax.Array, Example]:
        block = nnx.merge(backbone.layer_graphdef, layer_params)
        q, k, v = block.attn.project_qkv(block.input_norm(x))
        q_rot = apply_rope(q, positions, backbone.inv_freq, backbone.attention_factor)
        k_rot = apply_rope(k, positions, backbone.inv_freq, backbone.attention_factor)
        mask = masks.causal() if backbone.window is None else masks.causal() & masks.sliding_window(backbone.window)
        attn = attention_api.attention(
            q_rot,
            k_rot.swapaxes(1, 2),
            v.swapaxes(1, 2),
            mask=mask,
            implementation="xla",
            config=XlaConfig(backbone.q_block, backbone.kv_block),
        )
        cis = causal_importance(q_rot[:, prompt_length:], k_rot[:, :prompt_length])
        x = x + block.attn.output(attn)
        x = x + block.mlp(block.post_attention_norm(x))
        return x, Example(q[:, :prompt_length], k[:, :prompt_length], v[:, :prompt_length], cis)

    x, example = jax.lax.scan(layer, backbone.embed[tokens], backbone.layers)
    return nnx.merge(backbone.norm_graphdef, backbone.final_norm)(x), example


def make_example_fn(prompt_length: int, feature_dtype: jnp.dtype = FEATURE_DTYPE) -> Callable[..., Example]:
    """``example(backbone, tokens) -> Example``, jitted, features stored as ``feature_dtype``."""

    def example(backbone: Backbone, tokens: jax.Array) -> Example:
        _, out = layerwise_pass(backbone, tokens, prompt_length)
        q, k, v = (x.astype(feature_dtype) for x in (out.q, out.k, out.v))
        return Example(q, k, v, out.cis)

    return jax.jit(example)
