"""TOVA: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104;
NVIDIA kvpress ``TOVAPress``).

TOVA treats the cache as a bounded multi-state RNN: whenever it holds more than ``budget`` entries, it drops the
entry that the **current query** attends to least, its attention **averaged over all heads** of the layer, so every
KV head of a layer drops the same token (sec. 4, Alg. 1). Here:

- **After the prompt** (as kvpress compresses at prefill): the last prompt token is the only observer, its
  attention mass per KV head (:class:`lcm.cache.hooks.AttentionMass`, summed over each GQA group) is summed over the
  KV heads (the mean over all heads, up to ``1/H``), and the ``budget`` highest are kept in every KV head; the last
  prompt token itself is always kept (kvpress pads its score with the maximum).
- **While decoding** (the paper's per-step eviction; ``per_step=0`` leaves it out, as kvpress does): each step's
  token is written, and if the layer then holds more than ``budget`` entries the one its query attends to least
  (mean over heads, the new token itself excepted, as after the prompt) is dropped: the newest entry moves into its
  slot, so each step costs one entry's copy, the buffer stays at ``budget + 1`` slots (:meth:`TOVA.decode_capacity`)
  and memory is bounded for any output length. Slots are unordered from then on, which a decode step does not need
  (each key carries its rotation).

Deviation: the attention each step scores with is recomputed from the layer's probabilities
(:func:`lcm.ops.kv_scores.attention_mass`), a second pass over the buffer per layer and step.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lcm.cache.hooks import AttentionMass, LayerView
from lcm.cache.kv import LayerCache, map_slots
from lcm.cache.policies import KVPolicy
from lcm.ops.kv_scores import attention_mass


@dataclasses.dataclass(frozen=True)
class TovaEviction(AttentionMass):
    """Records the last prompt token's attention (the prompt's observers), and drops one entry per decode step once
    the layer holds more than ``budget`` (see the module docstring)."""

    budget: int | None  # None: never while decoding (kvpress's use: once after the prompt)

    def record(self, view: LayerView, state: LayerCache) -> LayerCache:
        state = super().record(view, state)
        if self.budget is None or view.q.shape[1] != 1:  # static: a one-token step evicts (a decode step, ...)
            return state
        if view.keys_pre_rope:
            raise ValueError("tova evicts while decoding by the attention to rotated keys; store keys after RoPE")
        batch, capacity = view.q.shape[0], view.stored_keys.shape[2]
        filled = state.length  # the new token included
        mass_BxS = attention_mass(view.q, view.stored_keys, jnp.ones((batch, 1), bool), mask=view.mask).sum(axis=1)
        slots = jnp.arange(capacity)
        candidates = slots < filled - 1  # every filled entry but the new token's
        drop_B = jnp.argmin(jnp.where(candidates, mass_BxS, jnp.inf), axis=-1)
        evict = filled > self.budget
        last = filled - 1
        target_B = jnp.where(evict, drop_B, last)  # not evicting: the newest moves onto itself
        rows = jnp.arange(batch)

        def move(x: jax.Array, axis: int) -> jax.Array:
            newest = jax.lax.dynamic_index_in_dim(x, last, axis=axis, keepdims=False)
            return x.at[rows, :, target_B].set(newest) if axis == 2 else x.at[rows, target_B].set(newest)

        state = map_slots(state, move)
        return dataclasses.replace(state, length=jnp.where(evict, last, filled))


@dataclasses.dataclass(frozen=True)
class TOVA(KVPolicy):
    """Keep the ``budget`` entries the current query attends to most (mean over the layer's heads): after the
    prompt from its last token, then one eviction per decode step. Keys keep their positions."""

    per_step: int = 1  # 1: evict one entry per decode step (the paper); 0: only once after the prompt (kvpress)

    name: ClassVar[str] = "tova"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.per_step, bool) or self.per_step not in (0, 1):
            raise ValueError(f"tova: per_step={self.per_step!r} must be 1 (evict while decoding, the paper) or 0")
        super().__post_init__()

    def min_budget(self) -> int:
        return 2

    def promised(self) -> str:
        return "the newest token and at least 1 chosen by attention"

    def stores_keys_pre_rope(self, requested: bool) -> bool:
        if requested:
            raise ValueError("tova: keys_pre_rope=True is not supported (decode steps score rotated keys)")
        return False

    def layer_hooks(self) -> TovaEviction:
        return TovaEviction(self.budget if self.per_step else None)

    def observers(self, positions: np.ndarray, prompt_length: int) -> np.ndarray:
        return positions == prompt_length - 1

    def decode_capacity(self, held: int, new_tokens: int) -> int:
        if not self.per_step:
            return held + new_tokens
        return min(held + new_tokens, max(held, self.budget) + 1)

    def rank(self, layer: LayerCache, prompt_seen: jax.Array, final: bool) -> Float[Array, "B K S"]:
        """The last prompt token's attention summed over all heads, the same for every KV head; ``+inf`` for the
        last token itself, ``-inf`` for empty slots."""
        mass_Bx1xS = layer.scores.sum(axis=1, keepdims=True)
        slots = jnp.arange(mass_Bx1xS.shape[-1])
        rank = jnp.where(slots == layer.length - 1, jnp.inf, mass_Bx1xS)
        return jnp.broadcast_to(jnp.where(slots < layer.length, rank, -jnp.inf), layer.scores.shape)
