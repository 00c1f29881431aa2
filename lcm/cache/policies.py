"""KV-cache policies: which cached entries a layer keeps, under one interface, chosen by name.

A policy is a frozen dataclass (hashable: a static argument of the jitted compression) that answers three
questions for the generation loop (:class:`lcm.generate.Engine`), through hooks the Engine calls and never branches
around (:meth:`KVPolicy.prompt_capacity`, :meth:`KVPolicy.first_position`, :meth:`KVPolicy.after_chunk`,
:meth:`KVPolicy.rank`, :meth:`KVPolicy.layer_budget`, ...; the class flags below only configure their defaults):

1. **What to keep after a prefill chunk.** :meth:`KVPolicy.priority` ranks every filled slot of every layer and
   KV head; :func:`compress` keeps the ``budget`` highest, in slot order, and compacts them to slots
   ``0…budget-1``. Entries a policy promises to keep (attention sinks, the recent window, SnapKV's observation
   window) get priority ``+inf``; empty slots ``-inf``. ``streaming`` policies compress after every chunk, so the
   cache never holds more than ``budget + chunk`` prompt entries (memory bounded whatever the prompt length);
   the others compress once, after the whole prompt (SnapKV needs the full prefill, as its paper says).
2. **What an attention step reads.** Everything kept, for eviction policies: they select at prefill and the cache
   then grows by the generated tokens (as kvpress does: the budget is the prompt's cache). A selection policy
   (TokenSelect, ``evicts = False``) keeps every entry and gives each layer an ``attend`` hook
   (:meth:`KVPolicy.layer_hooks`, :mod:`lcm.cache.hooks`): at every prefill chunk and decode step the layer attends
   to the ``budget`` entries its rule picks.
3. **Which positions the kept entries get.** ``renumber=False``: keys are stored rotated at their original
   positions and queries keep counting from the prompt length (H2O, SnapKV, kvpress's convention).
   ``renumber=True``: keys are stored before RoPE and every entry's position is its slot, so kept entries are
   numbered contiguously from 0 and positions never exceed the cache (StreamingLLM's positions within the cache).

Each layer owns its state (:class:`lcm.cache.kv.LayerCache`); a policy declares what it keeps there beside the
entries (:meth:`KVPolicy.init_layer`: attention-mass ``scores``, InfiniPot's ``token_nll``, TokenSelect's selection
cache), and :func:`compress` ranks and compacts each layer on its own. The statistics a policy ranks by are the
model's own attention probabilities, accumulated per (KV head, slot) in each layer's ``scores`` from the queries
:meth:`KVPolicy.observers` selects (:func:`lcm.ops.kv_scores.attention_mass`); they move with their entries when
the cache is compacted. Budgets are tokens per layer and KV head. Adding a policy is one dataclass (here or in your
own module) and one registration (:data:`POLICIES`, :func:`register_policy`).

A policy whose budget covers the context evicts nothing and computes what the full cache computes: bit for bit
for policies that collect no statistic (StreamingLLM, against the full cache stored pre-RoPE), and to float32
round-off (~1e-7 on the logits) for H2O and SnapKV, whose statistic is an extra consumer inside the layer that
changes how XLA fuses it (tested in ``tests/cache/test_policies.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lcm.cache.hooks import AttentionMass, LayerHooks, LayerView
from lcm.cache.kv import KVCache, LayerCache, map_slots, with_scores
from lcm.kernels.token_select import api as token_select_api
from lcm.ops.token_select import (
    DEFAULT_N_INIT,
    DEFAULT_N_LOCAL,
    DEFAULT_THRESHOLD,
    SelectionCache,
    TokenSelectRule,
    init_selection_cache,
)


@dataclasses.dataclass(frozen=True)
class ChunkDone:
    """What the Engine tells a policy after a prefill chunk (host integers): the entries layer 0 holds, the prompt
    tokens fed so far, whether this was the last chunk before the never-evicted tail or one of the tail's."""

    filled: int
    prompt_seen: int
    last: bool
    in_tail: bool
    num_layers: int


class CacheOps(Protocol):
    """The jitted programs a policy's :meth:`KVPolicy.after_chunk` may run (the Engine provides them)."""

    def compress(self, policy: KVPolicy, cache: KVCache, prompt_seen: int, final: bool) -> KVCache:
        """:func:`compress` (jitted, the policy static)."""
        ...

    def probe(self, cache: KVCache, tokens: tuple[int, ...], first_position: int) -> KVCache:
        """``tokens`` fed after the filled slots at positions from ``first_position`` on zeroed scores, their
        queries the only observers, their entries dropped again (:func:`lcm.steps.probe_chunk`)."""
        ...


@dataclasses.dataclass(frozen=True)
class KVPolicy:
    """The full cache: nothing is evicted (``budget`` 0 means unbounded)."""

    budget: int = 0  # prompt tokens kept per layer and KV head; 0 = all

    name: ClassVar[str] = "full"
    # what the default hooks below are built from; the Engine never reads these (it calls the hooks)
    streaming: ClassVar[bool] = False  # compress after every chunk (bounded memory) or once after the prompt
    renumber: ClassVar[bool] = False  # keys pre-RoPE, positions = slots (contiguous) after eviction
    compress_last_chunk: ClassVar[bool] = True  # streaming: also compress after the prompt's last chunk
    needs_scores: ClassVar[bool] = False  # accumulate attention mass in each layer's scores
    evicts: ClassVar[bool] = True  # a bounded policy compresses the cache (False: it selects what attention reads)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 0:
            raise ValueError(f"{self.name}: budget={self.budget!r} must be a non-negative number of tokens")
        if self.budget < self.min_budget():
            raise ValueError(
                f"{self.name}: budget={self.budget} is smaller than the {self.min_budget()} tokens it always keeps "
                f"({self.promised()}); use a budget of at least {self.min_budget()}"
            )

    def min_budget(self) -> int:
        return 0

    def promised(self) -> str:
        return "nothing"

    @property
    def bounded(self) -> bool:
        return self.budget > 0

    def init_layer(self, layer: LayerCache, num_heads: int, head_dim: int) -> LayerCache:
        """One layer's empty state with what this policy keeps beside the entries (its statistics, a selection
        cache); the model's ``num_heads`` and ``head_dim`` for state shaped by the queries. By default the
        ``scores`` that ``needs_scores`` asks for, else nothing."""
        del num_heads, head_dim
        return with_scores(layer) if self.needs_scores else layer

    def layer_hooks(self) -> LayerHooks | None:
        """What the policy does inside each layer (:mod:`lcm.cache.hooks`): records a statistic, selects what a
        step attends to. By default the attention mass that ``needs_scores`` asks for, else ``None``: nothing (the
        layer attends to every entry it holds)."""
        return AttentionMass() if self.needs_scores else None

    def check_model(self, model: Any) -> None:
        """Raise a one-line ``ValueError`` if ``model`` lacks what the policy needs (Locret: retaining heads).

        On a model with sliding-window layers (Gemma 3) a policy acts on the other (global) layers, the window layers
        keeping their window; one that renumbers positions or probes the cache is refused there: its positions and
        probe entries would have to be shared by layers it does not manage."""
        scheme = getattr(getattr(model, "config", None), "position_scheme", None)
        if scheme is not None:
            self.check_position_scheme(scheme.name)
        windows = list(getattr(model, "window_layers", tuple)())
        if windows and (self.renumber or self.probe_tokens()):
            raise ValueError(
                f"KV policy {self.name!r} renumbers positions or probes the cache, which lcm does not do on a model "
                f"whose layers {windows} keep their sliding window; evicting policies that keep positions (h2o, "
                "snapkv, knorm, tova, pyramidkv) act on its global layers"
            )

    def check_position_scheme(self, scheme: str) -> None:
        """One-line ``ValueError`` if the policy cannot run under the position scheme named ``scheme``
        (:mod:`lcm.ops.position_schemes`): one that renumbers positions, probes the cache, ranks by attention or
        selects what a step attends to would rank or number by plain-RoPE attention, not the scheme's."""
        if self.renumber or self.probe_tokens() or self.needs_scores or self.layer_hooks() is not None:
            raise ValueError(
                f"KV policy {self.name!r} renumbers positions, ranks by attention or selects what a step attends to, "
                f"which lcm does not combine with the position scheme {scheme!r} (its statistics would come from "
                "plain-RoPE attention, not the scheme's); use the full cache or a policy that ranks without "
                "attention (knorm)"
            )

    def with_tokenizer(self, tokenizer: Any) -> KVPolicy:
        """The policy with whatever it must tokenize (InfiniPot's catalyst prompt) encoded by the model's tokenizer."""
        del tokenizer
        return self

    def observers(self, positions: np.ndarray, prompt_length: int) -> np.ndarray:
        """``[T]`` bool: which of the chunk's queries (absolute prompt positions) add to the attention mass."""
        return np.zeros(positions.shape, bool)

    def max_prefill_chunk(self) -> int | None:
        """The largest prefill chunk the policy works with (the Engine prefills in smaller chunks if needed)."""
        return None

    def tail_tokens(self) -> int:
        """Prompt tokens at the end prefilled after the last compression, never evicted (Locret's ``n_loc``)."""
        return 0

    def probe_tokens(self) -> tuple[int, ...]:
        """Token ids the Engine feeds after the cached entries just before each compression, whose queries alone
        fill each layer's ``scores`` and whose own entries are dropped again (InfiniPot's catalyst prompt);
        () = none."""
        return ()

    # --- the Engine's questions (lcm.generate.Engine calls these hooks; it never tests a flag) -------------------

    def stores_keys_pre_rope(self, requested: bool) -> bool:
        """Whether the cache stores keys before RoPE: when ``requested``, or when the policy renumbers positions
        (a kept entry is rotated at its new position when read)."""
        return requested or self.renumber

    def keeps_everything(self) -> bool:
        """Whether the cache holds every entry as the model computed it, at its own position, and every step reads
        all of them (the full cache): what per-token NLLs and reusing a prompt's prefix need."""
        return not self.bounded and not self.renumber and self.layer_hooks() is None

    def accepts_padded_rows(self) -> bool:
        """Whether left-padded rows (a batch of prompts of different lengths) may share the cache; eviction ranks
        slots, and a padded row's slots are not its tokens."""
        return not self.bounded

    def prompt_capacity(self, length: int, chunk_size: int) -> int:
        """Cache slots the prefill of ``length`` tokens in chunks of ``chunk_size`` needs (before any generated
        token): a streaming policy holds at most its budget plus one chunk (or its never-evicted tail), whatever
        the prompt's length, plus room for the transient entries of its probe chunk if it has one."""
        if not (self.bounded and self.evicts and length > self.budget):
            return length
        probe = len(self.probe_tokens())
        tail = max(chunk_size, -(-self.tail_tokens() // chunk_size) * chunk_size)  # the last chunk or the tail
        return (self.budget + tail if self.streaming else length) + probe

    def rope_length(self, length: int, capacity: int) -> int:
        """The sequence length a length-dependent RoPE (dynamic NTK, LongRoPE) is scaled for, for a prompt of
        ``length`` tokens prefilled into ``capacity`` slots: the prompt's, as one transformers forward; a policy that
        renumbers never gives a position beyond the cache."""
        return min(length, capacity) if self.renumber else length

    def first_position(self, prompt_seen: int, filled: int) -> int:
        """The RoPE position of the next token fed after ``prompt_seen`` prompt tokens when the cache holds
        ``filled`` entries: its place in the prompt, or its slot for a policy that renumbers."""
        return filled if self.renumber else prompt_seen

    def evictable(self, length: int) -> int:
        """Prompt tokens (of ``length``) fed before the last compression; the rest is never evicted (Locret's
        ``n_loc``). The Engine's chunks end there and start anew."""
        return length - min(self.tail_tokens(), length) if self.bounded else length

    def layer_budget(self, index: int, num_layers: int, prompt_seen: jax.Array) -> int | jax.Array:
        """Entries layer ``index`` (of ``num_layers``) keeps per KV head when compressed after ``prompt_seen``
        prompt tokens (traced inside :func:`compress`): the same ``budget`` for every layer by default. A policy
        whose budgets differ by layer keeps ``budget`` as their mean (PyramidKV's fall with depth); a traced
        budget (one that depends on the prompt's length) is honoured without recompiling per length."""
        del index, num_layers, prompt_seen
        return self.budget

    def decode_capacity(self, held: int, new_tokens: int) -> int:
        """Slots a layer holding ``held`` entries needs to decode ``new_tokens`` more (the Engine cuts each layer's
        buffer to it after the prompt): all of them, unless the policy evicts while decoding."""
        return held + new_tokens

    def after_chunk(self, cache: KVCache, chunk: ChunkDone, run: CacheOps) -> tuple[KVCache, int]:
        """What happens after a prefill chunk: the cache and the entries it then holds (counted on the host, what
        renumbered positions continue from; a policy that renumbers keeps its budget in every layer). By default a
        bounded, evicting policy compresses (:meth:`CacheOps.compress`, each layer to its :meth:`layer_budget`)
        once it holds more than its budget: after every chunk if ``streaming`` (also the
        last unless ``compress_last_chunk``), else after the last; a probe chunk (:meth:`probe_tokens`) is fed
        first, at the positions the next token would take."""
        over = self.bounded and self.evicts and chunk.filled > self.budget and not chunk.in_tail
        when = (not chunk.last or self.compress_last_chunk) if self.streaming else chunk.last
        if not (over and when):
            return cache, chunk.filled
        probe = self.probe_tokens()
        if probe:
            cache = run.probe(cache, probe, self.first_position(chunk.prompt_seen, chunk.filled))
        cache = run.compress(self, cache, chunk.prompt_seen, chunk.last)
        return cache, self.budget

    def rank(self, layer: LayerCache, prompt_seen: jax.Array, final: bool) -> Float[Array, "B K S"]:
        """Rank of every slot of one layer per row and KV head, from whatever the policy needs of the layer's state
        (its statistics, its keys, ...); the layer's budget highest are kept. ``final`` (static) marks the
        compression after the prompt's last evictable chunk. By default :meth:`priority` of the layer's ``scores``
        (zeros if it keeps none)."""
        del final
        scores = layer.scores if layer.scores is not None else jnp.zeros(layer.keys.shape[:3], jnp.float32)
        return self.priority(scores, layer.length, prompt_seen)

    def priority(
        self, scores: Float[Array, "B K S"], length: jax.Array, prompt_seen: jax.Array
    ) -> Float[Array, "B K S"]:
        """Rank of every slot of one layer, per row and KV head; the ``budget`` highest are kept. ``scores`` is
        the layer's statistic (attention mass, or zeros), ``length`` its filled slots, ``prompt_seen`` the prompt
        tokens fed so far (its last ``length`` … are the newest slots)."""
        slots = jnp.arange(scores.shape[-1])
        return jnp.broadcast_to(jnp.where(slots < length, 0.0, -jnp.inf), scores.shape)


def _filled(scores: jax.Array, length: jax.Array) -> jax.Array:
    return jnp.arange(scores.shape[-1]) < length


@dataclasses.dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    """Attention sinks + a recent window (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
    Sinks", arXiv 2309.17453, sec. 3.2): the first ``sinks`` tokens and the ``budget - sinks`` most recent ones.
    Positions are assigned within the cache (sec. 3.2, "Rolling KV cache with attention sinks"): keys pre-RoPE,
    renumbered contiguously. Evicts after every chunk, so memory is bounded for any prompt length."""

    sinks: int = 4  # initial tokens always kept (the paper's 4)

    name: ClassVar[str] = "streamingllm"
    streaming: ClassVar[bool] = True
    renumber: ClassVar[bool] = True

    def min_budget(self) -> int:
        return self.sinks + 1

    def promised(self) -> str:
        return f"{self.sinks} sinks and at least 1 recent token"

    def priority(self, scores: jax.Array, length: jax.Array, prompt_seen: jax.Array) -> jax.Array:
        slots = jnp.arange(scores.shape[-1], dtype=jnp.float32)
        rank = jnp.where(slots < self.sinks, jnp.inf, slots)  # later = more recent = higher
        return jnp.broadcast_to(jnp.where(_filled(scores, length), rank, -jnp.inf), scores.shape)


@dataclasses.dataclass(frozen=True)
class H2O(KVPolicy):
    """Heavy hitters + recent tokens (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", arXiv 2306.14048, Alg. 1):
    the ``recent`` newest tokens, and the rest of the budget to the tokens with the largest accumulated attention
    (column sums of the attention of every query seen so far, per layer and KV head; the query heads of a GQA
    group are summed). The paper splits the budget half and half (``recent = budget // 2`` by default). Evicts
    after every prefill chunk, as H2O evicts greedily while tokens stream in; keys keep their positions."""

    recent: int = -1  # newest tokens always kept; -1 = budget // 2

    name: ClassVar[str] = "h2o"
    streaming: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = True

    @property
    def recent_tokens(self) -> int:
        return self.budget // 2 if self.recent < 0 else self.recent

    def min_budget(self) -> int:
        return self.recent_tokens + 1 if self.recent >= 0 else 2

    def promised(self) -> str:
        return f"{self.recent_tokens} recent tokens and at least 1 heavy hitter"

    def observers(self, positions: np.ndarray, prompt_length: int) -> np.ndarray:
        return np.ones(positions.shape, bool)

    def priority(self, scores: jax.Array, length: jax.Array, prompt_seen: jax.Array) -> jax.Array:
        slots = jnp.arange(scores.shape[-1])
        rank = jnp.where(slots >= length - self.recent_tokens, jnp.inf, scores)
        return jnp.where(_filled(scores, length), rank, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class SnapKV(KVPolicy):
    """Observation-window voting (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
    Generation", arXiv 2404.14469, Alg. 1; official FasterDecoding/SnapKV ``snapkv_utils.py``): the last ``window``
    prompt queries' attention to every earlier token, summed over the window, smoothed by a 1-D average pool of
    ``kernel`` over the tokens before the window (stride 1, zero padding, as ``F.avg_pool1d`` on
    ``attn[..., -window:, :-window]``), top ``budget - window`` per KV head, plus the window itself. Once, after
    the whole prompt. Deviation: the official code selects per *query* head (keys repeated for GQA); we select per
    KV head, summing the group's votes (kvpress does the same), since the cache is per KV head. Kept entries match
    kvpress's ``SnapKVPress`` on a tiny model (``tests/cache/test_kvpress_parity.py``)."""

    window: int = 32  # observation window (the paper's 32)
    kernel: int = 5  # pooling kernel (the official default)

    name: ClassVar[str] = "snapkv"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: kernel={self.kernel!r} must be an odd positive integer")
        super().__post_init__()

    def min_budget(self) -> int:
        return self.window + 1

    def promised(self) -> str:
        return f"the {self.window}-token observation window and at least 1 voted token"

    def observers(self, positions: np.ndarray, prompt_length: int) -> np.ndarray:
        return positions >= prompt_length - self.window

    def priority(self, scores: jax.Array, length: jax.Array, prompt_seen: jax.Array) -> jax.Array:
        # the votes for the tokens before the window only, pooled with zeros past both ends (the official code
        # pools attn[..., -window:, :-window]; so does kvpress): the window's own votes never raise its neighbours
        slots = jnp.arange(scores.shape[-1])
        before = slots < length - self.window
        pad = self.kernel // 2
        padded = jnp.pad(jnp.where(before, scores, 0.0), [(0, 0)] * (scores.ndim - 1) + [(pad, pad)])
        pooled = sum(padded[..., i : i + scores.shape[-1]] for i in range(self.kernel)) / self.kernel
        rank = jnp.where(before, pooled, jnp.inf)
        return jnp.where(_filled(scores, length), rank, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class TokenSelect(KVPolicy):
    """Dynamic token-level selection (Wu et al. 2024, arXiv 2411.02886; METHODS §5; the math and every deviation
    from the official code are in :mod:`lcm.ops.token_select`). Nothing is evicted: the cache keeps every entry,
    pre-RoPE, and each layer's attention reads the first ``n_init``, the soft vote's top ``k`` and the last
    ``n_local`` entries, rotated at contiguous positions, once the cache holds more than ``budget = n_init + k +
    n_local``; per prefill chunk and per decode step, with the selection cache (reuse while the query
    fingerprints' cosine similarity is ``>= threshold``).

    ``budget`` is what attention reads, not what memory holds: TokenSelect saves compute, not memory (the cost
    table reports its full cache). The paper's split is 128 + 2048 + 512 = 2688 (5% + 76% + 19%); other budgets
    keep its proportions: ``n_init = min(128, budget // 16)``, ``n_local = min(512, budget // 4)``, ``k`` the rest
    (at 1024: 64 + 704 + 256; at 2688 the paper's split). A prefill chunk must fit in the local window (the
    official chunk is ``n_local`` = 512), so the Engine prefills in chunks of at most ``n_local``. (A first split
    that kept ``n_local`` at 512 left only k = 384 at budget 1024 and missed the 8k passkey that the paper's split
    finds.)"""

    n_init: int = -1  # first tokens always attended; -1 = min(128, budget // 16)
    n_local: int = -1  # last tokens always attended (>= the prefill chunk); -1 = min(512, budget // 4)
    threshold: float = DEFAULT_THRESHOLD  # cosine similarity to reuse the last selection; > 1 = never reuse

    name: ClassVar[str] = "tokenselect"
    renumber: ClassVar[bool] = True  # keys stored pre-RoPE; below the budget positions are slots
    evicts: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for field in ("n_init", "n_local"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                raise ValueError(f"tokenselect: {field}={value!r} must be a number of tokens >= 0 (or -1 = default)")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"tokenselect: threshold={self.threshold!r} must be a number (a cosine similarity)")
        if self.n_local == 0:
            raise ValueError("tokenselect: n_local=0 leaves the current token out; use n_local >= 1")
        super().__post_init__()

    @property
    def init_tokens(self) -> int:
        return min(DEFAULT_N_INIT, self.budget // 16) if self.n_init < 0 else self.n_init

    @property
    def local_tokens(self) -> int:
        return max(1, min(DEFAULT_N_LOCAL, self.budget // 4)) if self.n_local < 0 else self.n_local

    def min_budget(self) -> int:
        return self.init_tokens + self.local_tokens + 1

    def promised(self) -> str:
        return f"{self.init_tokens} initial and {self.local_tokens} local tokens, and at least 1 selected"

    def layer_hooks(self) -> TokenSelectAttention:
        return TokenSelectAttention(self.attention_rule())

    def init_layer(self, layer: LayerCache, num_heads: int, head_dim: int) -> LayerCache:
        selection = init_selection_cache(layer.keys.shape[0], num_heads, head_dim, self.attention_rule().k)
        return dataclasses.replace(layer, selection=selection)

    def attention_rule(self) -> TokenSelectRule:
        k = self.budget - self.init_tokens - self.local_tokens
        return TokenSelectRule(n_init=self.init_tokens, k=k, n_local=self.local_tokens, threshold=self.threshold)

    def max_prefill_chunk(self) -> int:
        return self.local_tokens

    def rope_length(self, length: int, capacity: int) -> int:
        """Positions never exceed what a step attends to: the budget."""
        return min(length, self.budget)


@dataclasses.dataclass(frozen=True)
class TokenSelectAttention(LayerHooks):
    """TokenSelect's step (:func:`lcm.kernels.token_select.api.token_select_attention`): a layer attends to its
    whole buffer while it holds at most ``rule.budget`` entries, and to the selection beyond (a ``lax.cond``: one
    branch runs), carrying its selection cache in the layer's ``selection``. Keys are stored pre-RoPE: the
    selected entries are rotated at contiguous positions."""

    rule: TokenSelectRule

    def attend(
        self, view: LayerView, state: LayerCache, attend_all: Callable[[], jax.Array]
    ) -> tuple[jax.Array, LayerCache]:
        rule = self.rule
        if not view.keys_pre_rope or state.selection is None:
            raise ValueError("TokenSelect needs keys stored pre-RoPE and a selection cache (Engine.new_cache)")
        if rule.budget >= view.stored_keys.shape[2]:  # a buffer no larger than the budget is always attended fully
            return attend_all(), state
        filled = view.start + view.num_valid

        def selected() -> tuple[jax.Array, SelectionCache]:
            out, new_selection, _ = token_select_api.token_select_attention(
                view.q_pre,
                view.stored_keys,
                view.values,
                filled,
                state.selection,
                inv_freq=view.inv_freq,
                attention_factor=view.attention_factor,
                n_init=rule.n_init,
                k=rule.k,
                n_local=rule.n_local,
                # the selection cache serves decode steps only: 512-query means of prefill chunks are alike
                # (cosine >= 0.9) whatever they attend to, and reusing them kept stale selections (lcm.ops.token_select)
                threshold=rule.threshold if view.q.shape[1] == 1 else jnp.inf,
                num_valid=view.num_valid,
            )
            return out.astype(view.q.dtype), new_selection

        attn, selection = jax.lax.cond(filled <= rule.budget, lambda: (attend_all(), state.selection), selected)
        return attn, dataclasses.replace(state, selection=selection)


from lcm.cache.infinipot import InfiniPot  # noqa: E402  (these subclass KVPolicy, so they are imported after it)
from lcm.cache.knorm import Knorm  # noqa: E402
from lcm.cache.locret import Locret  # noqa: E402
from lcm.cache.pyramidkv import PyramidKV  # noqa: E402
from lcm.cache.tova import TOVA  # noqa: E402

POLICIES: dict[str, type[KVPolicy]] = {
    "full": KVPolicy,
    "streamingllm": StreamingLLM,
    "snapkv": SnapKV,
    "h2o": H2O,
    "infinipot": InfiniPot,
    "tokenselect": TokenSelect,
    "locret": Locret,
    "knorm": Knorm,
    "tova": TOVA,
    "pyramidkv": PyramidKV,
}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Register a KV policy from any module (usable as a class decorator): ``cls.name`` becomes a name that
    ``make_policy``, ``parse_policy``, the CLI's ``--policy NAME:k=v`` and the eval grid accept.

    ``cls`` must be a frozen dataclass subclassing :class:`KVPolicy` (a static argument of the jitted programs);
    registering a second class under a taken name is an error, re-registering the same class is not."""
    if not (isinstance(cls, type) and issubclass(cls, KVPolicy)):
        raise TypeError(f"register_policy takes a KVPolicy subclass, got {cls!r}")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(f"KV policy {cls.__name__} must be a frozen dataclass: @dataclasses.dataclass(frozen=True)")
    name = cls.name
    if not isinstance(name, str) or not name or ":" in name or "," in name or name != name.strip():
        raise ValueError(f"KV policy {cls.__name__}: name={name!r} must be non-empty text without ':' or ','")
    taken = POLICIES.get(name)
    if taken is not None and taken is not cls:
        raise ValueError(f"KV policy name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    POLICIES[name] = cls
    return cls


def make_policy(name: str, budget: int = 0, **params: Any) -> KVPolicy:
    """A policy by registry name, with its budget in tokens and its own parameters (numbers, or text)."""
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "budget"}
    for key, value in params.items():
        if key not in fields:
            raise ValueError(f"{name}: unknown parameter {key!r}; its parameters are {sorted(fields) or 'none'}")
        kind = type(fields[key].default)
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{name}: parameter {key}={value!r} must be text")
        if kind in (int, float) and (
            isinstance(value, bool) or not isinstance(value, int if kind is int else int | float)
        ):
            raise ValueError(f"{name}: parameter {key}={value!r} must be {'an integer' if kind is int else 'a number'}")
    if name == "full" and budget:
        raise ValueError(f"full: budget={budget} makes no sense for the full cache; use 0 or another policy")
    if name != "full" and budget <= 0:
        raise ValueError(f"{name}: needs a positive budget in tokens, got {budget}")
    return cls(budget=budget, **params)


def parse_policy(spec: str, budget: int = 0) -> KVPolicy:
    """``NAME[:k=v,...]`` as the CLI takes it, e.g. ``streamingllm:sinks=4``."""
    name, _, rest = spec.partition(":")
    cls = POLICIES.get(name.strip())
    text_fields = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, str)} if cls else set()
    params: dict[str, int | float | str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"policy parameter {item!r} in {spec!r} must look like key=value")
        if key.strip() in text_fields:  # text parameters (InfiniPot's catalyst) are taken as written
            if not value.strip():
                raise ValueError(f"{name}: parameter {key.strip()}={value!r} must be non-empty text")
            params[key.strip()] = value.strip()
            continue
        try:
            params[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"{name}: parameter {key.strip()}={value!r} must be a number") from None
    return make_policy(name.strip(), budget, **params)


def compress(policy: KVPolicy, cache: KVCache, prompt_seen: jax.Array, final: bool = False) -> KVCache:
    """Keep the highest-priority filled slots of every layer and KV head (its :meth:`KVPolicy.layer_budget`),
    compacted in slot order.

    Pure and jit-able: indices come from ``lax.top_k`` over a fixed capacity, so shapes never depend on the prompt.
    Call it only when the cache holds more than the budget (the Engine knows the length on the host): a policy
    whose budget covers the context then never compresses and computes exactly what the full cache computes.
    ``final`` (static) marks the compression after the prompt's last evictable chunk, for policies that treat it
    apart (Locret). Each layer is compressed on its own (:func:`compress_layer`).
    """
    n = len(cache.layers)
    layers = tuple(
        compress_layer(policy, layer, prompt_seen, final, policy.layer_budget(i, n, prompt_seen))
        if layer.takes_policy
        else layer
        for i, layer in enumerate(cache.layers)
    )
    return dataclasses.replace(cache, layers=layers)


def compress_layer(
    policy: KVPolicy,
    layer: LayerCache,
    prompt_seen: jax.Array,
    final: bool = False,
    budget: int | jax.Array | None = None,
) -> LayerCache:
    """One layer's :func:`compress`: its ``budget`` (default ``policy.budget``, at most its capacity; a traced
    budget too) highest-ranked filled slots per KV head (:meth:`KVPolicy.rank`), in slot order, in slots
    ``0…budget-1``; whatever the layer keeps per slot moves with its entry, and renumbering policies number them by
    slot."""
    budget = policy.budget if budget is None else budget
    priority = policy.rank(layer, prompt_seen, final)
    if priority.shape != layer.keys.shape[:3]:
        raise ValueError(
            f"{policy.name}: rank() returned shape {tuple(priority.shape)}; it must rank every slot of the layer, "
            f"[B, K, S] = {tuple(layer.keys.shape[:3])}"
        )
    if isinstance(budget, int):
        budget = min(budget, layer.capacity)
        _, top = jax.lax.top_k(priority, budget)  # [B, K, budget]
        kept = jnp.sort(top, axis=-1)  # slot order = original order: causality by slot still holds
    else:  # a traced budget: every slot by rank, the first `budget` kept, in slot order, the rest after them
        budget = jnp.clip(budget, 0, layer.capacity).astype(jnp.int32)
        _, top = jax.lax.top_k(priority, layer.capacity)
        top = jnp.where(jnp.arange(layer.capacity) < budget, top, layer.capacity)
        kept = jnp.minimum(jnp.sort(top, axis=-1), layer.capacity - 1)  # slots past `budget` count as empty

    def gather(x: jax.Array, axis: int) -> jax.Array:
        if axis != 2:  # positions [B, S]: a per-head choice has no single position per slot (set below)
            return x
        index = kept[..., None] if x.ndim == 4 else kept
        head = jnp.take_along_axis(x, index, axis=2)
        pad = [(0, 0)] * x.ndim
        pad[2] = (0, x.shape[2] - head.shape[2])
        return jnp.pad(head, pad)

    if policy.renumber:
        positions = jnp.broadcast_to(jnp.arange(layer.capacity, dtype=jnp.int32), layer.positions.shape)
    else:  # entries keep their rotation; a per-head choice has no single position per slot any more
        positions = jnp.full(layer.positions.shape, -1, jnp.int32)
    layer = map_slots(layer, gather)
    return dataclasses.replace(layer, positions=positions, length=jnp.minimum(layer.length, budget))
