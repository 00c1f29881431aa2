"""The frozen model's forward for Locret's training: features and causal-importance labels of a sample.

One training forward of the frozen model over prompt + answer (:meth:`lcm.models.llama.Llama.train_forward`, the
model's own layers scanned: one traced layer) with a recording hook, :class:`LocretLabels`, gives per layer the
pre-RoPE ``q, k, v`` of the prompt tokens (what the retaining heads read) and the CIS labels: for each prompt
token and KV head, the largest pre-softmax logit ``q·k/sqrt(D)`` of RoPE-rotated answer queries of its GQA group.
Why these choices, with line references into the official code: :mod:`lcm.train.locret`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from lcm.cache.hooks import LayerHooks, LayerView
from lcm.models.llama import Llama

FEATURE_DTYPE = jnp.bfloat16  # stored features (labels stay float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Backbone:
    """The frozen model as arrays for one jitted program: its parameters, and its graph as a static field."""

    params: nnx.State
    graphdef: nnx.GraphDef = dataclasses.field(metadata={"static": True})

    def model(self) -> Llama:
        return nnx.merge(self.graphdef, self.params)


def backbone_of(model: Llama) -> Backbone:
    """The arrays :func:`layerwise_pass` reads."""
    graphdef, params = nnx.split(model)
    return Backbone(params, graphdef)


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


@dataclasses.dataclass(frozen=True)
class LocretLabels(LayerHooks):
    """The training forward's recording hook for Locret: each layer returns the features and CIS labels of the
    first ``prompt_length`` tokens (the rest are the answer); :meth:`Llama.train_forward` stacks them."""

    prompt_length: int

    def record_forward(self, view: LayerView) -> Example:
        prompt = self.prompt_length
        keys_BxTxKxD = view.keys.swapaxes(1, 2)  # rotated at their positions
        cis = causal_importance(view.q[:, prompt:], keys_BxTxKxD[:, :prompt])
        return Example(view.q_pre[:, :prompt], view.k_pre[:, :prompt], view.v[:, :prompt], cis)


def layerwise_pass(
    backbone: Backbone, tokens: Int[Array, "B T"], prompt_length: int
) -> tuple[Float[Array, "B T D"], Example]:
    """The model's training forward over ``tokens`` (positions ``0…T-1``, causal), its layers scanned: the final
    hidden states (after the final norm) and, per layer, the features and CIS labels of the first
    ``prompt_length`` tokens (the rest are the answer)."""
    batch, seq = tokens.shape
    if not 0 < prompt_length < seq:
        raise ValueError(f"prompt_length={prompt_length} must lie in (0, {seq}): the answer needs at least one token")
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return backbone.model().train_forward(tokens, positions, hooks=LocretLabels(prompt_length), scan=True)


def make_example_fn(prompt_length: int, feature_dtype: jnp.dtype = FEATURE_DTYPE) -> Callable[..., Example]:
    """``example(backbone, tokens) -> Example``, jitted, features stored as ``feature_dtype``."""

    def example(backbone: Backbone, tokens: jax.Array) -> Example:
        _, out = layerwise_pass(backbone, tokens, prompt_length)
        q, k, v = (x.astype(feature_dtype) for x in (out.q, out.k, out.v))
        return Example(q, k, v, out.cis)

    return jax.jit(example)
