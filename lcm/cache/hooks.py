"""What a KV policy does inside each layer, behind one interface: the layer calls its hooks, never a policy by name.

A policy (:mod:`lcm.cache.policies`) gives the model a :class:`LayerHooks` object (static, hashable: it rides on
the cache as :attr:`lcm.cache.kv.KVCache.hooks`, so a compiled step depends on it) that answers two questions for
every layer, every prefill chunk and decode step:

- **What does the layer record while a chunk passes?** :meth:`LayerHooks.record` returns the layer's state with
  whatever statistic the policy ranks entries by: the attention the chunk's observing queries pay to each entry
  (H2O, SnapKV, InfiniPot's catalyst), a trained head's score of each new entry (Locret), ...
- **What does a step attend to?** :meth:`LayerHooks.attend`: everything the layer holds (the default), or a
  selection of it (TokenSelect), updating whatever the selection keeps between steps.
- **What does the model record from its predictions?** :meth:`LayerHooks.chunk_logits`, once per prefill chunk
  after the last layer: the logits the Engine needs, and whatever the policy keeps of the model's predictions
  (InfiniPot's per-token NLL).

Both see the layer's computation of the chunk through a :class:`LayerView`. The budget-free part of a policy lives
here (one object for every budget, so a budget sweep reuses the compiled prefill), what depends on the budget in
:mod:`lcm.cache.policies` (ranking, compression) or in the hook object's own fields (TokenSelect's rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
from jaxtyping import Array, Bool, Float, Int

from lcm.cache.kv import KVCache, LayerCache
from lcm.ops.kv_scores import attention_mass
from lcm.ops.masks import Mask


@dataclasses.dataclass(frozen=True)
class LayerView:
    """One layer's computation of one chunk, as the hooks see it (traced arrays; built inside the layer).

    ``keys`` is the layer's buffer as attention reads it (rotated; computed once and shared with attention when the
    hooks :attr:`~LayerHooks.reads_keys`, else ``None``); ``stored_keys``/``values`` the buffer as stored (pre-RoPE
    where the cache stores keys so), after this chunk's write.
    """

    q: Float[Array, "B T H D"]  # rotated queries
    q_pre: Float[Array, "B T H D"]  # queries before RoPE
    k_pre: Float[Array, "B T K D"]  # the chunk's keys before RoPE
    v: Float[Array, "B T K D"]  # the chunk's values
    keys: Float[Array, "B K S D"] | None
    stored_keys: Float[Array, "B K S D"]
    values: Float[Array, "B K S D"]
    mask: Mask  # the layer's mask for this chunk (slot offsets included)
    start: Int[Array, ""]  # the chunk's first slot
    num_valid: Int[Array, ""]  # real tokens of the chunk
    observers: Bool[Array, "B T"] | None  # queries the Engine marked as observing (a policy's observers())
    inv_freq: Float[Array, " F"]
    attention_factor: Float[Array, ""] | float
    module: Any  # the layer's block (a hook may call its submodules, e.g. Locret's retaining head)
    keys_pre_rope: bool  # the buffer stores keys before RoPE (positions renumbered by the policy)


@dataclasses.dataclass(frozen=True)
class LayerHooks:
    """The plain layer: records nothing, attends to everything it holds. Subclasses are frozen dataclasses (equal
    hooks, equal compiled steps)."""

    reads_keys: ClassVar[bool] = False  # record() reads view.keys (the layer then rotates its keys once, for both)

    def record(self, view: LayerView, state: LayerCache) -> LayerCache:
        """The layer's state after the chunk, with what the policy records (after :meth:`attend`)."""
        del view
        return state

    def attend(
        self, view: LayerView, state: LayerCache, attend_all: Callable[[], jax.Array]
    ) -> tuple[Float[Array, "B T H D"], LayerCache]:
        """The chunk's attention output and the state: ``attend_all()`` attends to every filled entry."""
        del view
        return attend_all(), state

    def record_forward(self, view: LayerView) -> Any:
        """What the layer returns beside its output in the training forward (no state: ``view.keys`` and
        ``view.values`` are the tokens' own rotated keys and values, ``view.start`` 0): a pytree the model stacks
        over layers (a labelling pass's features and labels, Locret's), or None, the plain layer's."""
        del view
        return None

    def chunk_logits(
        self,
        model: Any,
        cache: KVCache,
        start: Int[Array, ""],
        tokens_BxC: Int[Array, "B C"],
        hidden_BxCxD: Float[Array, "B C D"],
        num_valid: Int[Array, ""],
        previous_logits_BxV: Float[Array, "B V"],
    ) -> tuple[Float[Array, "B V"], KVCache]:
        """After a prefill chunk's last layer (``start`` its first slot, ``num_valid`` its real tokens): the logits
        at its last real token, and the cache with whatever the policy records from the model's predictions.
        ``model.logits`` maps hidden states to logits; ``previous_logits_BxV`` are the previous chunk's (zeros
        before the first)."""
        del start, tokens_BxC, previous_logits_BxV
        last_BxD = jax.lax.dynamic_index_in_dim(hidden_BxCxD, num_valid - 1, axis=1, keepdims=False)
        return model.logits(last_BxD), cache


@dataclasses.dataclass(frozen=True)
class AttentionMass(LayerHooks):
    """Adds to each entry's ``scores`` the attention it receives from the chunk's observing queries, summed over
    them and over the query heads of its KV group (:func:`lcm.ops.kv_scores.attention_mass`, the layer's own
    probabilities: H2O's accumulated attention, SnapKV's window votes, InfiniPot's catalyst scores). Steps with no
    observers (decode steps, chunks no query of which observes) record nothing."""

    reads_keys: ClassVar[bool] = True

    def record(self, view: LayerView, state: LayerCache) -> LayerCache:
        if view.observers is None:
            return state
        if state.scores is None:
            raise ValueError("attention mass needs the layer's scores (the policy's init_layer allocates them)")
        mass = attention_mass(view.q, view.keys, view.observers, mask=view.mask)
        return dataclasses.replace(state, scores=state.scores + mass)
