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

A sliding-window layer (Gemma 3's local layers) holds a :class:`WindowCache`: a buffer of its ``window`` latest
entries only, whatever the sequence's length, behind the same interface (``length`` and ``capacity`` count the
whole sequence, as a full buffer's would; ``keys.shape`` is the window). A layer writes and reads its state through
:meth:`LayerCache.write` and :meth:`LayerCache.settled`, so the decoder layer never asks which kind it holds.

``hooks`` (static) is what the KV policy does inside every layer (:mod:`lcm.cache.hooks`): what it records while a
chunk passes, what a step attends to (TokenSelect: a selection, whose cache each layer's ``selection`` carries from
step to step).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lcm.ops import masks
from lcm.ops.masks import Mask
from lcm.ops.token_select import SelectionCache

UNBOUNDED = 2**31 - 1  # the capacity of a layer that takes any number of entries (a sliding window's)


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

    rewindable: ClassVar[bool] = True  # a prefix of what it holds can be kept by setting `length` back
    takes_policy: ClassVar[bool] = True  # the KV policy's state, hooks and compression act on it

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array, mask: Mask) -> tuple[LayerCache, Mask]:
        """The state with a chunk's keys/values ``[B, T, K, D]`` and positions ``[B, T]`` written after its
        ``length`` filled slots (``length`` not advanced yet), and ``mask`` placed on the buffer: the visibility of
        the chunk's queries over it (queries from slot ``length``, keys up to the chunk's end)."""
        start = self.length
        keys, values = write_layer(self.keys, self.values, start, k, v)
        zero = jnp.zeros((), jnp.int32)
        positions = jax.lax.dynamic_update_slice(self.positions, positions, (zero, start))
        state = dataclasses.replace(self, keys=keys, values=values, positions=positions)
        return state, mask & masks.offsets(q_offset=start, kv_length=start + k.shape[1])

    def settled(self, num_valid: jax.Array) -> LayerCache:
        """The state to keep after a chunk of ``num_valid`` real tokens was written and attended (a full buffer
        keeps it as it is)."""
        del num_valid
        return self

    def cut(self, capacity: int) -> LayerCache:
        """The state with room for ``capacity`` entries: the first ``capacity`` slots (the rest are empty)."""
        return map_slots(self, lambda x, axis: jax.lax.slice_in_dim(x, 0, capacity, axis=axis))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WindowCache(LayerCache):
    """A sliding-window layer's state: its first ``sinks`` entries (attention sinks, StreamingLLM's) and its
    ``window`` latest ones, so the layer's memory is ``sinks + window`` slots whatever the length.

    ``length`` counts every entry written, as a full buffer's would; ``capacity`` is unbounded (:data:`UNBOUNDED`)
    and ``keys.shape[2] == sinks + window``. A KV policy does not act on it (:attr:`takes_policy`): its state is
    bounded already. Layout: while no entry has been dropped (``length <= sinks + window``)
    every entry so far, right-aligned (empty slots first); after, the sinks in the first ``sinks`` slots and the
    latest ``window`` entries after them. While a chunk of ``T`` tokens runs, the layer attends over
    ``sinks + window + T`` slots (the buffer, then the chunk: query ``t`` sits at slot ``sinks + window + t``, its
    window reaching back inside the buffer), the mask placed on them: the empty front excluded (``kv_start``), the
    sinks kept by every query (a causal ``prefix``, where they sit); then it keeps what the layout says. The window
    and the sinks must be the layer mask's. With sinks, rows may not be left-padded and a chunk may not be longer
    than the window (a sink inside a chunk is then always inside its queries' window).
    """

    window: int = dataclasses.field(default=0, metadata={"static": True})
    sinks: int = dataclasses.field(default=0, metadata={"static": True})

    rewindable: ClassVar[bool] = False  # entries past the window are gone
    takes_policy: ClassVar[bool] = False  # bounded by its window already: a KV policy acts on the other layers

    def __post_init__(self) -> None:  # static fields only: JAX rebuilds states with placeholder leaves
        if self.window <= 0 or self.sinks < 0:
            raise ValueError(f"a window cache needs a positive window and sinks >= 0, got {self.window}, {self.sinks}")

    @property
    def capacity(self) -> int:
        """Unbounded: the layer takes any number of entries (it drops those past its window)."""
        return UNBOUNDED

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array, mask: Mask) -> tuple[LayerCache, Mask]:
        if (mask.window, mask.sinks) != (self.window, self.sinks):
            raise ValueError(
                f"a window cache of window={self.window}, sinks={self.sinks} attended with a mask of "
                f"window={mask.window}, sinks={mask.sinks}"
            )
        slots, chunk, batch = self.sinks + self.window, k.shape[1], k.shape[0]
        if self.sinks and (mask.kv_start is not None or chunk > self.window):
            raise ValueError(
                f"a window cache with sinks takes unpadded rows and chunks of at most window={self.window} tokens "
                f"(got {chunk}{', left-padded rows' if mask.kv_start is not None else ''})"
            )
        join = functools.partial(jnp.concatenate, axis=2)
        keys = join([self.keys, k.swapaxes(1, 2).astype(self.keys.dtype)])
        values = join([self.values, v.swapaxes(1, 2).astype(self.values.dtype)])
        positions = jnp.concatenate([self.positions, positions.astype(jnp.int32)], axis=1)
        empty = jnp.maximum(slots - self.length, 0)  # the empty front, before anything was dropped
        first = empty
        if mask.kv_start is not None:  # left padding: the rows' first real slot, in this buffer's slots
            first = jnp.maximum(mask.kv_start - (self.length - slots), first)
        state = dataclasses.replace(self, keys=keys, values=values, positions=positions)
        placed = dataclasses.replace(
            mask,
            q_offset=jnp.int32(slots),
            kv_length=jnp.int32(slots + chunk),
            kv_start=jnp.broadcast_to(jnp.asarray(first, jnp.int32), (batch,)),
        )
        if self.sinks:  # the sinks sit after the empty front: every query keeps them (causal prefix)
            # (not past the buffer: a sink inside the chunk is seen causally, within its queries' window)
            prefix = jnp.minimum(empty + self.sinks, slots).astype(jnp.int32)
            placed = dataclasses.replace(placed, sinks=0, prefix=prefix)
        return state, placed

    def settled(self, num_valid: jax.Array) -> LayerCache:
        """The layout after the chunk (``length`` already counts it): the latest ``sinks + window`` entries while
        none is dropped, else the sinks and the latest ``window``."""
        slots, sinks, window = self.sinks + self.window, self.sinks, self.window
        if not sinks:
            return map_slots(self, lambda x, axis: jax.lax.dynamic_slice_in_dim(x, num_valid, slots, axis=axis))
        before = self.length - num_valid  # entries before the chunk
        sink_start = jnp.maximum(slots - before, 0)

        def keep(x: jax.Array, axis: int) -> jax.Array:
            latest = jax.lax.dynamic_slice_in_dim(x, num_valid, slots, axis=axis)
            split = jnp.concatenate(
                [
                    jax.lax.dynamic_slice_in_dim(x, sink_start, sinks, axis=axis),
                    jax.lax.dynamic_slice_in_dim(x, sinks + num_valid, window, axis=axis),
                ],
                axis=axis,
            )
            return jnp.where(self.length <= slots, latest, split)

        return map_slots(self, keep)

    def cut(self, capacity: int) -> LayerCache:
        del capacity  # its buffer is its window, whatever room is asked for
        return self


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
        """Filled slots of the first layer the KV policy acts on (:attr:`LayerCache.takes_policy`; of the first layer
        if none): every such layer's when they all hold as many (see ``layer.length``)."""
        return next((layer for layer in self.layers if layer.takes_policy), self.layers[0]).length

    @property
    def rewindable(self) -> bool:
        """Whether setting ``length`` back keeps a prefix of what every layer holds (not past a window)."""
        return all(layer.rewindable for layer in self.layers)

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


def init_window_layer(
    batch: int, window: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype = jnp.float32, sinks: int = 0
) -> WindowCache:
    """A sliding-window layer's empty state: ``sinks + window`` slots, for any number of entries."""
    layer = init_layer(batch, sinks + window, num_kv_heads, head_dim, dtype)
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}
    return WindowCache(**fields, window=window, sinks=sinks)


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
