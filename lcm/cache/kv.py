"""The KV cache: an explicit pytree passed into and returned from the model.

Layout: ``keys``/``values`` are ``[layers, batch, kv_heads, capacity, head_dim]`` buffers of fixed capacity
(static shapes inside ``jax.jit``), heads-major as in transformers' cache: a block of one head's keys is
contiguous, so attention reads key blocks straight from the cache without a transposed copy. ``positions``
``[batch, capacity]`` holds the RoPE position of each slot and ``length`` the number of filled slots (a traced
scalar, the same for every row of the batch).

A batch of prompts of different lengths is left-padded to a common length: ``starts[b]`` is the first real slot
of row ``b``; the slots before it hold padding that no real query may see (the model turns ``starts`` into a
two-segment document mask), and positions count from the first real slot, so each row computes what it would
alone.

With ``keys_pre_rope=True`` keys are stored *before* rotation and rotated at read time from ``positions``: a
policy that renumbers positions (TokenSelect, InfiniPot, Locret, CLEX when its scale changes) then edits
``positions`` only. With ``False`` (the default, what transformers does) keys are stored rotated.

With ``select`` (a :class:`~lcm.ops.token_select.TokenSelectRule`, static) every layer attends only to the entries
TokenSelect picks once the cache holds more than ``select.budget`` (keys must be stored pre-RoPE: the picked
entries are rotated at contiguous positions); ``selection`` then carries each layer's selection cache from step to
step.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lcm.ops.token_select import SelectionCache, TokenSelectRule


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: jax.Array  # [L, B, K, S, D]
    values: jax.Array  # [L, B, K, S, D]
    positions: jax.Array  # [B, S] int32
    length: jax.Array  # [] int32, filled slots
    scores: jax.Array | None = None  # [L, B, K, S] float32: attention mass per entry, for KV policies that rank by it
    token_nll: jax.Array | None = None  # [L, B, K, S] float32: each entry's token NLL when fed (InfiniPot's NuC)
    starts: jax.Array | None = None  # [B] int32: first real slot of each left-padded row; None = all rows start at 0
    # TokenSelect's per-layer selection cache ([L, ...] arrays) and the rule attention selects by (static)
    selection: SelectionCache | None = None
    select: TokenSelectRule | None = dataclasses.field(default=None, metadata={"static": True})
    keys_pre_rope: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def num_bytes(self) -> int:
        arrays = (self.keys, self.values, self.positions, self.scores, self.token_nll, self.selection)
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(arrays))


def init_cache(
    num_layers: int,
    batch: int,
    capacity: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype = jnp.float32,
    keys_pre_rope: bool = False,
) -> KVCache:
    """An empty cache with room for ``capacity`` tokens per row."""
    if capacity <= 0 or batch <= 0:
        raise ValueError(f"cache capacity and batch must be positive, got capacity={capacity}, batch={batch}")
    shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        positions=jnp.zeros((batch, capacity), jnp.int32),
        length=jnp.zeros((), jnp.int32),
        keys_pre_rope=keys_pre_rope,
    )


def write_layer(
    cache_keys: jax.Array, cache_values: jax.Array, layer: int, start: jax.Array, k: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Write ``k``/``v`` ``[B, T, K, D]`` into slots ``start…start+T`` of ``layer`` (in place under donation)."""
    zero = jnp.zeros((), jnp.int32)
    index = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(start, jnp.int32), zero)
    cache_keys = jax.lax.dynamic_update_slice(cache_keys, k.swapaxes(1, 2)[None].astype(cache_keys.dtype), index)
    cache_values = jax.lax.dynamic_update_slice(cache_values, v.swapaxes(1, 2)[None].astype(cache_values.dtype), index)
    return cache_keys, cache_values


# --- per-entry token NLL (policies with needs_nll: InfiniPot's novelty under compression) ------------------------


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
    """Write a chunk's NuC into ``cache.token_nll`` at slots ``start…start+C`` of every layer and KV head."""
    num_layers, batch, num_kv_heads, _ = cache.token_nll.shape
    chex.assert_shape(nll, (batch, None))
    block = jnp.broadcast_to(nll[None, :, None, :], (num_layers, batch, num_kv_heads, nll.shape[1]))
    zero = jnp.zeros((), jnp.int32)
    token_nll = jax.lax.dynamic_update_slice(cache.token_nll, block, (zero, zero, zero, jnp.asarray(start, jnp.int32)))
    return dataclasses.replace(cache, token_nll=token_nll)
