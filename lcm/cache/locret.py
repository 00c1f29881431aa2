"""Locret: evict by trained retaining heads during chunked prefill (Huang et al. 2024, "Locret: Accelerating
Long-Context LLM Inference with Retaining Heads", arXiv 2410.01805; official huangyuxiang03/Locret; METHODS.md §9).

Every layer carries a retaining head (:mod:`lcm.models.retaining`) that scores each new entry, per KV head, from its
pre-RoPE ``[q, k, v]``: the predicted causal importance score (CIS). The prompt is prefilled in chunks, all but its
last ``n_loc`` tokens; after each chunk the cache (the kept entries plus the chunk) is cut back to the ``budget``
entries with the highest scores per layer and KV head, except that the ``n_s`` newest entries (the
**stabilisers**) are kept whatever their score, so the next chunk starts from an intact local context. After the
last chunk the stabilisers are not protected (``final``). The last ``n_loc`` prompt tokens are then prefilled with
no eviction, and decoding starts. Keys are stored pre-RoPE and kept entries are renumbered ``0…`` in order.

How it maps onto :mod:`lcm.cache.policies` and :class:`lcm.generate.Engine`:

- :meth:`Locret.check_model`: the model must have heads attached (:func:`lcm.io.retaining.load_retaining_heads`);
  the :class:`RetainingScores` layer hook writes ``block.retaining(q, k, v)`` into each layer's ``scores`` for
  the new entries, and
  :func:`~lcm.cache.policies.compress` moves scores with their entries. ``needs_scores = False``: no attention
  mass is accumulated (the heads replace it).
- ``streaming``: compress after every chunk; ``renumber``: keys pre-RoPE, positions = slots.
- :meth:`tail_tokens` is ``n_loc``; :meth:`priority` takes ``final=True`` for the compression after the last
  chunk before that tail (:meth:`Locret.rank` passes it).

What we took from the official code (``locret/inference/infer.py``; line numbers there):

- The loop prefills ``[0, seq_len - n_loc)`` in chunks (``:9-13``); the new chunk's scores are appended to the
  kept ones (``:19-26``); ``sc[:, -stabilizers:, :] = finfo.max`` on the newest entries unless this is the last
  chunk (``b + chunk_size < seq_len - local_len``, ``:30-31``); ``topk`` per KV head of ``min(budget, n)`` entries,
  sorted back into order (``:29, :32``); scores, keys and values are gathered alike (``:34-37``). The tail is fed
  without eviction (``:42-47``). Defaults: ``local_len = 100`` (``:3``).
- Positions are contiguous over the kept cache: the official model rotates keys from positions ``0…n-1`` of
  whatever the cache holds (``modeling_llama.py:956-957``).

Choices and deviations:

1. ``stabilizers = -1`` means 15% of the budget (at least 1 when the budget allows): the paper's Llama-3.1-8B
   setting is ``n_s = 2500`` of ``b = 16384`` (15%, ``benchmark/LEval-main/Baselines/llama-3.1-lg-test.py:68-70``);
   the Phi-3 scripts use 2500 of 6000 (42%, ``phi3-lg-test.py:69-72``) and ``example.py`` 10 of 100 (10%). 15% is the
   setting of the headline result and sits between them. An explicit value must be smaller than the budget, so
   at least one entry is chosen by score.
2. Ties among the ``+inf`` stabilisers cannot occur beyond the budget (``n_s < budget``); other ties go to the
   lower slot (``lax.top_k``), where ``torch.topk`` leaves them unspecified.
3. Empty slots rank ``-inf`` (the official cache has no empty slots: its buffers grow).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lcm.cache.hooks import LayerHooks, LayerView
from lcm.cache.kv import LayerCache, with_scores
from lcm.cache.policies import KVPolicy

STABILIZER_SHARE = 0.15  # default n_s as a share of the budget: 2500 / 16384, the paper's Llama-3.1-8B setting


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RetainingScores(LayerHooks):
    """Each layer's retaining head scores the chunk's new entries from their pre-RoPE ``[q, k, v]`` into the layer's
    ``scores`` (prefill chunks: the steps with observers; decode steps are never evicted, so they score nothing)."""

    def record(self, view: LayerView, state: LayerCache) -> LayerCache:
        if view.observers is None:
            return state
        if state.scores is None or not hasattr(view.module, "retaining"):
            raise ValueError("Locret needs every layer's scores and a retaining head on every layer")
        predicted_BxTxK = view.module.retaining(view.q_pre, view.k_pre, view.v).astype(jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        scores = jax.lax.dynamic_update_slice(state.scores, predicted_BxTxK.swapaxes(1, 2), (zero, zero, view.start))
        return dataclasses.replace(state, scores=scores)


@dataclasses.dataclass(frozen=True)
class Locret(KVPolicy):
    """Keep the ``budget`` entries with the highest retaining-head scores per layer and KV head after every prefill
    chunk, the ``n_s`` newest always (not after the last chunk); the last ``n_loc`` prompt tokens are never evicted."""

    stabilizers: int = -1  # n_s: newest entries kept after each chunk; -1 = 15% of the budget (module docstring)
    n_loc: int = 100  # last prompt tokens prefilled after the last compression, never evicted (the official 100)

    name: ClassVar[str] = "locret"
    streaming: ClassVar[bool] = True
    renumber: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = False  # the retaining heads' scores replace the attention mass

    def __post_init__(self) -> None:
        if not _is_int(self.stabilizers) or self.stabilizers < -1:
            raise ValueError(
                f"locret: stabilizers={self.stabilizers!r} must be a number of tokens >= 0, or -1 for 15% of the budget"
            )
        if not _is_int(self.n_loc) or self.n_loc < 0:
            raise ValueError(f"locret: n_loc={self.n_loc!r} must be a number of tokens >= 0 (the paper's 100)")
        super().__post_init__()

    def init_layer(self, layer: LayerCache, num_heads: int, head_dim: int) -> LayerCache:
        """The retaining heads' score of every entry, per layer and KV head."""
        return with_scores(layer)

    def layer_hooks(self) -> RetainingScores:
        return RetainingScores()

    def observers(self, positions: np.ndarray, prompt_length: int) -> np.ndarray:
        """Every prompt token is scored by the retaining heads as it is fed."""
        return np.ones(positions.shape, bool)

    def check_model(self, model: Any) -> None:
        super().check_model(model)
        if not all(hasattr(block, "retaining") for block in model.layers):
            raise ValueError(
                f"KV policy {self.name!r} needs trained retaining heads on the model; train them with: "
                "lcm run configs/locret_smollm2.py (lcm.io.retaining.load_retaining_heads attaches them)"
            )

    @property
    def stabilizer_tokens(self) -> int:
        """``n_s``: the explicit value, or 15% of the budget, at least 1 and below the budget."""
        if self.stabilizers >= 0:
            return self.stabilizers
        return min(max(1, int(STABILIZER_SHARE * self.budget)), max(0, self.budget - 1))

    def tail_tokens(self) -> int:
        """Prompt tokens at the end prefilled after the last compression, without eviction (``n_loc``)."""
        return self.n_loc

    def min_budget(self) -> int:
        return self.stabilizers + 1 if self.stabilizers >= 0 else 1

    def promised(self) -> str:
        return f"{self.stabilizer_tokens} stabilisers and at least 1 entry chosen by score"

    def rank(self, layer: LayerCache, prompt_seen: jax.Array, final: bool) -> Float[Array, "B K S"]:
        """:meth:`priority` of the retaining heads' scores; ``final`` drops the stabilisers' protection."""
        return self.priority(layer.scores, layer.length, prompt_seen, final=final)

    def priority(
        self,
        scores: Float[Array, "B K S"],
        length: jax.Array,
        prompt_seen: jax.Array,
        final: bool = False,
    ) -> Float[Array, "B K S"]:
        """The predicted CIS of every filled slot; ``+inf`` for the last ``n_s`` filled slots unless ``final`` (the
        compression after the prompt's last chunk before the ``n_loc`` tail); ``-inf`` for empty slots."""
        slots = jnp.arange(scores.shape[-1])
        rank = scores.astype(jnp.float32)
        if not final and self.stabilizer_tokens:
            rank = jnp.where(slots >= length - self.stabilizer_tokens, jnp.inf, rank)
        return jnp.where(slots < length, rank, -jnp.inf)
