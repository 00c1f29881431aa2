"""InfiniPot: continual context distillation in a fixed KV "pot" (Kim et al. 2024, "InfiniPot: Infinite Context
Processing on Memory-Constrained LLMs", arXiv 2410.01518; no official code, apple/ml-epicache has a baseline).

The input streams through a pot of fixed size. Whenever the next chunk would overflow it, a **CCD cycle**
distills the pot down to ``|C|`` entries per layer and KV head, ranked by two scores (sec. 3):

- **CaP** (Catalyst Prompt): a short generic instruction is appended *temporarily* after the pot; each cached
  key is scored by the attention it receives from the catalyst's queries, per layer and per KV head. The
  catalyst's own KV is discarded after scoring.
- **NuC** (Novelty under Compression): one score per token, shared by all heads: its negative log-likelihood
  under the model given the (compressed) context it was read with.
- **Combination**: the ``alpha * |C|`` tokens with the highest NuC first, then each head fills the remaining
  slots with its highest CaP scores (heads may end up holding different tokens).
- **CR-RoPE**: keys are stored before RoPE and the retained entries are renumbered ``0…|C|-1`` in their
  original order; new tokens continue from ``|C|``, so no position ever exceeds the pot.

How it maps onto :mod:`lcm.cache.policies` and :class:`lcm.generate.Engine`:

- ``budget`` is ``|C|``, the entries kept after a CCD cycle. The pot is ``|M| = budget + chunk_size``: the
  Engine feeds one chunk into the freed space and compresses after every chunk that leaves more than ``budget``
  entries (``streaming``), which is exactly "compress when the next chunk would overflow ``|M|``". The cache
  buffer also has room for the catalyst's ``len(catalyst_ids)`` transient entries
  (:meth:`lcm.generate.Engine.prompt_capacity`), a constant independent of the input's length.
- ``renumber=True`` is CR-RoPE: keys pre-RoPE, positions = slots after :func:`~lcm.cache.policies.compress`.
- CaP: before each compression the Engine feeds :meth:`probe_tokens` (the catalyst) after the filled slots
  with each layer's ``scores`` zeroed and the catalyst's queries the only observers, then sets each layer's
  ``length`` back (``lcm.steps.probe_chunk``); each layer's ``scores`` then holds the catalyst's attention to
  every cached key.
- NuC: each layer's ``token_nll`` holds each entry's NLL, written when its chunk is fed (the
  :meth:`~lcm.cache.hooks.LayerHooks.chunk_logits` hook of :class:`CatalystAndNovelty`, :func:`record_novelty`)
  and moved with the entry by ``compress``.
- The combination is a priority (NuC picks ``+inf``, the rest their CaP score), so ``compress`` stays the one
  place that gathers.

Choices the paper leaves open, and deviations:

1. ``|C|`` vs ``|M|``: not stated in what we could read; ``budget = |C|`` and ``|M| = |C| + chunk_size`` (sweep
   ``budget`` and ``chunk_size`` to study it).
2. CaP aggregation: **sum** over the catalyst's queries and the query heads of a GQA group (what
   :func:`lcm.ops.kv_scores.attention_mass` computes, SnapKV's voting); the EpiCache baseline takes the max.
   Sum rewards keys that many catalyst tokens attend to, max a single sharp hit.
3. NuC at chunk boundaries: token ``t`` of a chunk is scored by the chunk's own logits at ``t-1`` (given the
   pot and the preceding new tokens, as the paper defines it). The first token of a chunk is scored by the
   previous chunk's last logits, i.e. given the pot *before* that chunk's CCD cycle (re-running that token
   over the distilled pot would cost a forward pass per cycle for one score). The input's first token has no
   prediction: it is scored against the uniform distribution (NLL ``log V``), so it is usually a NuC pick,
   which keeps the attention sink.
4. Retained tokens keep the NLL they had when fed (METHODS's ``-log p(c_t | c_<t)`` over the compressed pot is
   not recomputed: after the first cycle heads hold different tokens, so there is no single sequence to
   re-run).
5. NuC picks per head: once heads hold different tokens, each head gives its ``alpha * |C|`` NuC slots to the
   highest-NuC tokens *it* holds; heads holding the same tokens (every head before the first cycle, and every
   new chunk) pick the same ones, so the picks are shared exactly where the paper's "shared by all heads" is
   defined. ``alpha * |C|`` is rounded down.
6. How the catalyst's KV is discarded: ``cache.length`` is set back, so its slots count as empty (never kept)
   and the next chunk overwrites them.
7. No CCD cycle after the input's last chunk: a cycle runs only when the next chunk would overflow the pot, and
   after the last chunk there is none, so the end of the input (where a question sits) is never distilled away
   and the answer is decoded from a pot of at most ``|M|`` entries (``compress_last_chunk = False``; the other
   streaming policies compress to their budget after the last chunk too).
8. CaP-Q (the real question as catalyst) is a choice of the catalyst, not a separate policy: ``catalyst="..."``
   (from the command line ``--policy "infinipot:catalyst=What is the pass key?"``; no commas in the text) or
   ``catalyst_ids``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lcm.cache.hooks import AttentionMass
from lcm.cache.kv import KVCache, LayerCache
from lcm.cache.policies import KVPolicy

CATALYST_TEXT = "Summarize the previous context highlighting the most important parts."  # the paper's CaP

_EPS = 1e-9  # alpha * budget in float: 0.3 * 10 must give 3 slots, not 2


def token_novelty(
    tokens: Int[Array, "B C"], logits: Float[Array, "B C V"], previous_logits: Float[Array, "B V"]
) -> Float[Array, "B C"]:
    """NuC of a chunk's tokens: ``-log p(x_t | pot, x_<t)`` from the logits at ``t - 1``; the first token's
    prediction is ``previous_logits`` (the previous chunk's last position; zeros = uniform for the input's
    first token)."""
    chex.assert_shape(logits, (*tokens.shape, None))
    chex.assert_shape(previous_logits, (tokens.shape[0], logits.shape[-1]))
    predicting_BxCxV = jnp.concatenate([previous_logits[:, None], logits[:, :-1]], axis=1)
    logprobs = jax.nn.log_softmax(predicting_BxCxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]


def record_novelty(cache: KVCache, start: Int[Array, ""], nll: Float[Array, "B C"]) -> KVCache:
    """Write a chunk's NuC into every layer's ``token_nll`` at slots ``start…start+C`` of every KV head."""
    batch, num_kv_heads = cache.batch, cache.layers[0].keys.shape[1]
    chex.assert_shape(nll, (batch, None))
    block = jnp.broadcast_to(nll[:, None, :], (batch, num_kv_heads, nll.shape[1]))
    zero = jnp.zeros((), jnp.int32)
    index = (zero, zero, jnp.asarray(start, jnp.int32))
    return cache.replace_layers(
        token_nll=[jax.lax.dynamic_update_slice(layer.token_nll, block, index) for layer in cache.layers]
    )


@dataclasses.dataclass(frozen=True)
class CatalystAndNovelty(AttentionMass):
    """InfiniPot's two records: the catalyst's attention to every entry (CaP, :class:`AttentionMass` while the
    probe chunk's queries are the only observers) and every token's NLL as its chunk is fed (NuC: every position's
    logits are computed, the previous chunk's last predicting the first)."""

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
        logits_BxCxV = model.logits(hidden_BxCxD)
        cache = record_novelty(cache, start, token_novelty(tokens_BxC, logits_BxCxV, previous_logits_BxV))
        return jax.lax.dynamic_index_in_dim(logits_BxCxV, num_valid - 1, axis=1, keepdims=False), cache


@dataclasses.dataclass(frozen=True)
class InfiniPot(KVPolicy):
    """CaP + NuC distillation after every chunk, CR-RoPE positions (see the module docstring).

    ``budget`` is ``|C|`` (entries kept per layer and KV head after a CCD cycle); the pot is ``|M| = budget +
    chunk_size``. ``catalyst_ids`` is the tokenized catalyst prompt (:data:`CATALYST_TEXT` with the model's
    tokenizer, or the question for CaP-Q); ``None`` is allowed until the pot first has to be compressed.
    """

    alpha: float = 0.5  # share of |C| given to the highest-NuC tokens (the paper's default)
    catalyst: str = ""  # the catalyst prompt's text, tokenized by with_tokenizer; "" = CATALYST_TEXT (CaP)
    catalyst_ids: tuple[int, ...] | None = None  # the tokenized catalyst prompt; None = not given yet

    name: ClassVar[str] = "infinipot"
    streaming: ClassVar[bool] = True
    renumber: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = True
    compress_last_chunk: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 <= self.alpha <= 1:
            raise ValueError(f"infinipot: alpha={self.alpha!r} must be a number in [0, 1] (the paper's 0.5)")
        if not isinstance(self.catalyst, str) or (self.catalyst and not self.catalyst.strip()):
            raise ValueError(f"infinipot: catalyst={self.catalyst!r} must be text (empty: {CATALYST_TEXT!r})")
        if self.catalyst_ids is not None:
            ids = self.catalyst_ids
            if not isinstance(ids, tuple) or not ids:
                raise ValueError(
                    f"infinipot: catalyst_ids={ids!r} must be a non-empty tuple of token ids (the tokenized "
                    f"catalyst prompt, e.g. {CATALYST_TEXT!r})"
                )
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"infinipot: catalyst_ids={ids!r} must be non-negative integer token ids")
        super().__post_init__()

    def init_layer(self, layer: LayerCache, num_heads: int, head_dim: int) -> LayerCache:
        """CaP scores (``needs_scores``: the catalyst's attention, recorded by the attention-mass hook while the
        probe chunk's queries are the only observers) and each entry's NuC, per layer and KV head."""
        layer = super().init_layer(layer, num_heads, head_dim)
        return dataclasses.replace(layer, token_nll=jnp.zeros_like(layer.scores))

    def layer_hooks(self) -> CatalystAndNovelty:
        return CatalystAndNovelty()

    def rank(self, layer: LayerCache, prompt_seen: jax.Array, final: bool) -> Float[Array, "B K S"]:
        return self.priority(layer.scores, layer.length, prompt_seen, token_nll=layer.token_nll)

    def nuc_slots(self) -> int:
        """Slots per layer and head given to the highest-NuC tokens: ``alpha * budget``, rounded down."""
        return math.floor(self.alpha * self.budget + _EPS)

    def min_budget(self) -> int:
        if 0 < self.alpha < 1:  # both scores get at least one slot
            return max(2, math.ceil((1 - _EPS) / self.alpha))
        return 1

    def promised(self) -> str:
        return f"at least 1 NuC pick and 1 CaP pick at alpha={self.alpha}" if 0 < self.alpha < 1 else "1 token"

    def with_tokenizer(self, tokenizer: Any) -> InfiniPot:
        if self.catalyst_ids is not None:
            return self
        text = self.catalyst or CATALYST_TEXT
        return dataclasses.replace(self, catalyst_ids=tuple(tokenizer.encode(text, add_special=False)))

    def probe_tokens(self) -> tuple[int, ...]:
        if self.catalyst_ids is None:
            raise ValueError(
                "infinipot: catalyst_ids is needed to compress the pot; pass the tokenized catalyst prompt, e.g. "
                f"InfiniPot(budget, catalyst_ids=tuple(tokenizer.encode({CATALYST_TEXT!r})))"
            )
        return self.catalyst_ids

    def priority(
        self,
        scores: Float[Array, "B K S"],
        length: jax.Array,
        prompt_seen: jax.Array,
        token_nll: Float[Array, "B K S"] | None = None,
    ) -> Float[Array, "B K S"]:
        """``+inf`` for each head's ``alpha * budget`` highest-NuC filled slots, the CaP score for the rest,
        ``-inf`` for empty slots: ``compress`` keeps the NuC picks, then the highest CaP scores per head."""
        if token_nll is None:
            raise ValueError("infinipot: ranks by NuC and needs each layer's token_nll (Engine.new_cache allocates it)")
        filled = jnp.broadcast_to(jnp.arange(scores.shape[-1]) < length, scores.shape)
        cap = jnp.where(filled, scores, -jnp.inf)
        picks = self.nuc_slots()
        if picks == 0:
            return cap
        _, top = jax.lax.top_k(jnp.where(filled, token_nll, -jnp.inf), picks)  # [B, K, picks]
        chosen = jnp.put_along_axis(jnp.zeros(scores.shape, bool), top, True, axis=-1, inplace=False)
        return jnp.where(chosen, jnp.inf, cap)
