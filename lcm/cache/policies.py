"""KV-cache policies: which cached entries a layer keeps, under one interface, chosen by name.

A policy is a frozen dataclass (hashable: a static argument of the jitted compression) that answers three
questions for the generation loop (:class:`lcm.generate.Engine`):

1. **What to keep after a prefill chunk.** :meth:`KVPolicy.priority` ranks every filled slot of every layer and
   KV head; :func:`compress` keeps the ``budget`` highest, in slot order, and compacts them to slots
   ``0…budget-1``. Entries a policy promises to keep (attention sinks, the recent window, SnapKV's observation
   window) get priority ``+inf``; empty slots ``-inf``. ``streaming`` policies compress after every chunk, so the
   cache never holds more than ``budget + chunk`` prompt entries (memory bounded whatever the prompt length);
   the others compress once, after the whole prompt (SnapKV needs the full prefill, as its paper says).
2. **What a decode step attends to.** Everything kept: eviction policies select at prefill; the cache then grows
   by the generated tokens (as kvpress does: the budget is the prompt's cache).
3. **Which positions the kept entries get.** ``renumber=False``: keys are stored rotated at their original
   positions and queries keep counting from the prompt length (H2O, SnapKV, kvpress's convention).
   ``renumber=True``: keys are stored before RoPE and every entry's position is its slot, so kept entries are
   numbered contiguously from 0 and positions never exceed the cache (StreamingLLM's positions within the cache).

The statistics a policy ranks by are the model's own attention probabilities, accumulated per (layer, KV head,
slot) in ``cache.scores`` from the queries :meth:`KVPolicy.observers` selects (:func:`lcm.ops.kv_scores.
attention_mass`); they move with their entries when the cache is compacted. Budgets are tokens per layer and KV
head. Adding a policy is one dataclass here and one entry in :data:`POLICIES`.

A policy whose budget covers the context evicts nothing and computes what the full cache computes: bit for bit
for policies that collect no statistic (StreamingLLM, against the full cache stored pre-RoPE), and to float32
round-off (~1e-7 on the logits) for H2O and SnapKV, whose statistic is an extra consumer inside the layer that
changes how XLA fuses it (tested in ``tests/cache/test_policies.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lcm.cache.kv import KVCache


@dataclasses.dataclass(frozen=True)
class KVPolicy:
    """The full cache: nothing is evicted (``budget`` 0 means unbounded)."""

    budget: int = 0  # prompt tokens kept per layer and KV head; 0 = all

    name: ClassVar[str] = "full"
    streaming: ClassVar[bool] = False  # compress after every chunk (bounded memory) or once after the prompt
    renumber: ClassVar[bool] = False  # keys pre-RoPE, positions = slots (contiguous) after eviction
    compress_last_chunk: ClassVar[bool] = True  # streaming: also compress after the prompt's last chunk
    needs_scores: ClassVar[bool] = False  # accumulate attention mass in cache.scores
    needs_nll: ClassVar[bool] = False  # record each entry's token NLL in cache.token_nll (ranked by priority)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 0:
            raise ValueError(f"{self.name}: budget={self.budget!r} must be a non-negative number of tokens")
        if self.budget < self.min_budget():
            raise ValueError(
                f"{self.name}: budget={self.budget} is smaller than the {self.min_budget()} tokens it always keeps "
                f"({self.promised()}); use a budget above {self.min_budget()}"
            )

    def min_budget(self) -> int:
        return 0

    def promised(self) -> str:
        return "nothing"

    @property
    def bounded(self) -> bool:
        return self.budget > 0

    def with_tokenizer(self, tokenizer: Any) -> KVPolicy:
        """The policy with whatever it must tokenize (InfiniPot's catalyst prompt) encoded by the model's tokenizer."""
        del tokenizer
        return self

    def observers(self, positions: np.ndarray, prompt_length: int) -> np.ndarray:
        """``[T]`` bool: which of the chunk's queries (absolute prompt positions) add to the attention mass."""
        return np.zeros(positions.shape, bool)

    def probe_tokens(self) -> tuple[int, ...]:
        """Token ids the Engine feeds after the cached entries just before each compression, whose queries alone
        fill ``cache.scores`` and whose own entries are dropped again (InfiniPot's catalyst prompt); () = none."""
        return ()

    def priority(
        self, scores: Float[Array, "L B K S"], length: jax.Array, prompt_seen: jax.Array
    ) -> Float[Array, "L B K S"]:
        """Rank of every slot; the ``budget`` highest are kept. ``length`` filled slots, ``prompt_seen`` prompt
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
    ``kernel`` (stride 1, zero padding, as ``F.avg_pool1d``), top ``budget - window`` per KV head, plus the window
    itself. Once, after the whole prompt. Deviation: the official code selects per *query* head (keys repeated
    for GQA); we select per KV head, summing the group's votes (kvpress does the same), since the cache is per KV
    head."""

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
        pad = self.kernel // 2
        padded = jnp.pad(scores, [(0, 0)] * 3 + [(pad, pad)])
        pooled = sum(padded[..., i : i + scores.shape[-1]] for i in range(self.kernel)) / self.kernel
        slots = jnp.arange(scores.shape[-1])
        rank = jnp.where(slots >= length - self.window, jnp.inf, pooled)
        return jnp.where(_filled(scores, length), rank, -jnp.inf)


from lcm.cache.infinipot import InfiniPot  # noqa: E402  (it subclasses KVPolicy, so it is imported after it)

POLICIES: dict[str, type[KVPolicy]] = {
    "full": KVPolicy,
    "streamingllm": StreamingLLM,
    "snapkv": SnapKV,
    "h2o": H2O,
    "infinipot": InfiniPot,
}


def make_policy(name: str, budget: int = 0, **params: Any) -> KVPolicy:
    """A policy by registry name, with its budget in tokens and its own parameters (ints)."""
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "budget"}
    for key, value in params.items():
        if key not in fields:
            raise ValueError(f"{name}: unknown parameter {key!r}; its parameters are {sorted(fields) or 'none'}")
        kind = type(fields[key].default)
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
    params: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"policy parameter {item!r} in {spec!r} must look like key=value")
        try:
            params[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"{name}: parameter {key.strip()}={value!r} must be a number") from None
    return make_policy(name.strip(), budget, **params)


def compress(policy: KVPolicy, cache: KVCache, prompt_seen: jax.Array) -> KVCache:
    """Keep the ``policy.budget`` highest-priority filled slots of every layer and KV head, compacted in slot order.

    Pure and jit-able: indices come from ``lax.top_k`` over a fixed capacity, so shapes never depend on the prompt.
    Call it only when ``cache.length > budget`` (the Engine knows the length on the host): a policy whose budget
    covers the context then never compresses and computes exactly what the full cache computes.
    """
    budget = policy.budget
    scores = cache.scores if cache.scores is not None else jnp.zeros(cache.keys.shape[:4], jnp.float32)
    extra = {"token_nll": cache.token_nll} if policy.needs_nll else {}
    priority = policy.priority(scores, cache.length, prompt_seen, **extra)
    _, top = jax.lax.top_k(priority, budget)  # [L, B, K, budget]
    kept = jnp.sort(top, axis=-1)  # slot order = original order: causality by slot still holds

    def gather(x: jax.Array) -> jax.Array:
        index = kept[..., None] if x.ndim == 5 else kept
        head = jnp.take_along_axis(x, index, axis=3)
        pad = [(0, 0)] * x.ndim
        pad[3] = (0, x.shape[3] - budget)
        return jnp.pad(head, pad)

    capacity = cache.keys.shape[3]
    if policy.renumber:
        positions = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), cache.positions.shape)
    else:  # entries keep their rotation; a per-head choice has no single position per slot any more
        positions = jnp.full(cache.positions.shape, -1, jnp.int32)
    compacted = dataclasses.replace(
        cache,
        keys=gather(cache.keys),
        values=gather(cache.values),
        scores=gather(cache.scores) if cache.scores is not None else None,
        token_nll=gather(cache.token_nll) if cache.token_nll is not None else None,
        positions=positions,
        length=jnp.minimum(cache.length, budget),
    )
    return compacted
