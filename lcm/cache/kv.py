"""The KV cache: an explicit pytree passed into and returned from the model, one :class:`LayerCache` per layer.

Each layer owns its state: ``keys``/``values`` ``[batch, kv_heads, capacity, head_dim]`` buffers of its own fixed
capacity (static shapes inside ``jax.jit``; layers of one cache may differ, e.g. a policy with per-layer budgets),
heads-major as in transformers' cache (a block of one head's keys is contiguous, so attention reads key blocks
straight from the buffer), ``positions [batch, capacity]`` the RoPE position of each slot and ``length`` the number
of filled slots (a traced scalar, the same for every row of the batch), plus whatever statistic its KV policy keeps
(``scores``, ``token_nll``, TokenSelect's ``selection``).

A batch of prompts of different lengths is left-padded to a common length: ``starts[b]`` is the first real slot
of row ``b`` (shared by the layers); the slots before it hold padding that no real query may see (the model turns
``starts`` into a two-segment document mask), and positions count from the first real slot, so each row computes
what it would alone.

With ``keys_pre_rope=True`` keys are stored *before* rotation and rotated at read time from ``positions``: a
policy that renumbers positions (TokenSelect, InfiniPot, Locret, CLEX when its scale changes) then edits
``positions`` only. With ``False`` (the default, what transformers does) keys are stored rotated.

``hooks`` (static) is what the KV policy does inside every layer (:mod:`lcm.cache.hooks`): what it records while a
chunk passes, what a step attends to (TokenSelect: a selection, whose cache each layer's ``selection`` carries from
step to step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lcm.ops.token_select import SelectionCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's attention state: its KV buffer of its own capacity, and what its policy keeps per entry."""

    keys: jax.Array  # [B, K, S, D]
    values: jax.Array  # [B, K, S, D]
    positions: jax.Array  # [B, S] int32: the RoPE position of each slot
    length: jax.Array  # [] int32, filled slots
    scores: jax.Array | None = None  # [B, K, S] float32: attention mass (or retaining-head score) per entry
    token_nll: jax.Array | None = None  # [B, K, S] float32: each entry's token NLL when fed (InfiniPot's NuC)
    selection: SelectionCache | None = None  # TokenSelect's selection cache of this layer

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


# Every array a layer holds per slot, with its logical axes ("length" is the slot axis): the one list that gathers,
# cuts, moves (map_slots) and sharding (lcm.parallel.mesh) go through. A new per-entry field goes here and above.
SLOT_FIELDS: dict[str, tuple[str, ...]] = {
    "keys": ("batch", "kv_heads", "length", "head_dim"),
    "values": ("batch", "kv_heads", "length", "head_dim"),
    "positions": ("batch", "length"),
    "scores": ("batch", "kv_heads", "length"),
    "token_nll": ("batch", "kv_heads", "length"),
}


def map_slots(layer: LayerCache, fn: Callable[[jax.Array, int], jax.Array]) -> LayerCache:
    """``layer`` with ``fn(array, slot_axis)`` applied to every per-slot array it holds (:data:`SLOT_FIELDS`: keys,
    values, positions and what its policy keeps per entry); ``None`` fields stay ``None``."""
    changed = {}
    for name, axes in SLOT_FIELDS.items():
        value = getattr(layer, name)
        if value is not None:
            changed[name] = fn(value, axes.index("length"))
    return dataclasses.replace(layer, **changed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerCache, ...]
    starts: jax.Array | None = None  # [B] int32: first real slot of each left-padded row; None = all rows start at 0
    # what the KV policy does inside each layer (lcm.cache.hooks.LayerHooks; None: nothing); static
    hooks: Any = dataclasses.field(default=None, metadata={"static": True})
    keys_pre_rope: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def batch(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(layer.capacity for layer in self.layers)

    @property
    def capacity(self) -> int:
        """The capacity every layer has; an error for a cache whose layers differ (read :attr:`capacities`)."""
        if len(set(self.capacities)) != 1:
            raise ValueError(f"the layers of this cache hold different capacities {self.capacities}; read .capacities")
        return self.capacities[0]

    @property
    def length(self) -> jax.Array:
        """Filled slots of the first layer: every layer's when they all hold as many (see ``layer.length``)."""
        return self.layers[0].length

    @property
    def num_bytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves((self.layers, self.starts)))

    def replace_layers(self, **fields: Sequence[jax.Array | None] | jax.Array | None) -> KVCache:
        """A copy with each named field of every layer replaced: a sequence gives one value per layer, anything
        else the same value to each (e.g. ``length=jnp.int32(3)``), an array copied per layer so that no two
        layers share a buffer (a jitted step donating the cache would donate it twice)."""

        def each(value: Any) -> list[Any]:
            if isinstance(value, list | tuple):
                return list(value)
            return [jnp.copy(value) if isinstance(value, jax.Array) else value for _ in self.layers]

        per_layer = {name: each(value) for name, value in fields.items()}
        for name, values in per_layer.items():
            if len(values) != len(self.layers):
                raise ValueError(f"{name}: {len(values)} values for {len(self.layers)} layers")
        return dataclasses.replace(
            self,
            layers=tuple(
                dataclasses.replace(layer, **{name: values[i] for name, values in per_layer.items()})
                for i, layer in enumerate(self.layers)
            ),
        )


def with_scores(layer: LayerCache) -> LayerCache:
    """``layer`` with zeroed per-entry ``scores [B, K, S]`` (attention mass, or retaining-head scores)."""
    return dataclasses.replace(layer, scores=jnp.zeros(layer.keys.shape[:3], jnp.float32))


def init_layer(
    batch: int, capacity: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype = jnp.float32
) -> LayerCache:
    """One layer's empty state with room for ``capacity`` tokens per row."""
    if capacity <= 0 or batch <= 0:
        raise ValueError(f"cache capacity and batch must be positive, got capacity={capacity}, batch={batch}")
    shape = (batch, num_kv_heads, capacity, head_dim)
    return LayerCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        positions=jnp.zeros((batch, capacity), jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


def init_cache(
    num_layers: int,
    batch: int,
    capacity: int | Sequence[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype = jnp.float32,
    keys_pre_rope: bool = False,
) -> KVCache:
    """An empty cache: ``capacity`` tokens per row in every layer, or one capacity per layer."""
    capacities = [capacity] * num_layers if isinstance(capacity, int) else list(capacity)
    if len(capacities) != num_layers:
        raise ValueError(f"{len(capacities)} capacities given for {num_layers} layers")
    layers = tuple(init_layer(batch, c, num_kv_heads, head_dim, dtype) for c in capacities)
    return KVCache(layers=layers, keys_pre_rope=keys_pre_rope)


def write_layer(
    cache_keys: jax.Array, cache_values: jax.Array, start: jax.Array, k: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Write ``k``/``v`` ``[B, T, K, D]`` into slots ``start…start+T`` of one layer's buffers (in place under
    donation)."""
    zero = jnp.zeros((), jnp.int32)
    index = (zero, zero, jnp.asarray(start, jnp.int32), zero)
    cache_keys = jax.lax.dynamic_update_slice(cache_keys, k.swapaxes(1, 2).astype(cache_keys.dtype), index)
    cache_values = jax.lax.dynamic_update_slice(cache_values, v.swapaxes(1, 2).astype(cache_values.dtype), index)
    return cache_keys, cache_values
