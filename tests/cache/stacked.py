"""Test helpers: a cache built from stacked ``[L, ...]`` arrays, and a field of every layer stacked back."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lcm.cache.kv import KVCache, LayerCache


def tagged_cache(
    layers: int,
    heads: int,
    capacity: int,
    length: int,
    *,
    scores: np.ndarray | None = None,
    nll: np.ndarray | None = None,
    first_position: int = 0,
    keys_pre_rope: bool = False,
) -> KVCache:
    """A batch-1 cache whose every key is tagged with its slot (``keys[..., 0] = slot``, values ``slot + 100``), so
    the slots a compression keeps can be read back from the keys; ``scores``/``nll`` broadcast to
    ``[L, 1, K, S]``; slot ``s`` at position ``first_position + s``."""
    shape = (layers, 1, heads, capacity)
    slots = np.broadcast_to(np.arange(capacity, dtype=np.float32)[:, None], (*shape, 4))
    per_entry = {
        name: None if value is None else np.broadcast_to(np.asarray(value, np.float32), shape)
        for name, value in (("scores", scores), ("token_nll", nll))
    }
    return KVCache(
        layers=tuple(
            LayerCache(
                keys=jnp.asarray(slots[layer]),
                values=jnp.asarray(slots[layer] + 100.0),
                positions=jnp.arange(capacity, dtype=jnp.int32)[None] + first_position,
                length=jnp.int32(length),
                **{k: None if v is None else jnp.asarray(v[layer]) for k, v in per_entry.items()},
            )
            for layer in range(layers)
        ),
        keys_pre_rope=keys_pre_rope,
    )


def stacked(cache: KVCache, field: str) -> np.ndarray:
    """``field`` of every layer stacked on a leading axis (layers of one capacity)."""
    return np.stack([np.asarray(getattr(layer, field)) for layer in cache.layers])


def kept(cache: KVCache, layer: int = 0, head: int = 0) -> list[int]:
    """The slots (tags) a layer's KV head holds, in slot order."""
    state = cache.layers[layer]
    return [int(x) for x in np.asarray(state.keys[0, head, : int(state.length), 0])]
