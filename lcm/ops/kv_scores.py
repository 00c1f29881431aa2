"""Per-key statistics of attention that KV-cache policies rank cached entries by.

``attention_mass`` is the attention probability each cached key receives, summed over a chosen set of queries
("observers") and over the query heads of its GQA group: H2O's accumulated attention score (Zhang et al. 2023,
arXiv 2306.14048, sec. 3: the column sums of the attention matrix) when every query observes, SnapKV's voting
score (Li et al. 2024, arXiv 2404.14469, Alg. 1: the observation window's attention to the prefix) when only the
last ``window`` prompt queries do. Probabilities are the model's own: softmax of ``q . k / sqrt(d)`` over the keys
each query may see under the layer's own :class:`lcm.ops.masks.Mask`, exactly what the attention layer computes.

Query blocks without an observer are skipped (``lax.cond``), so SnapKV's window costs one block per chunk, not a
second attention pass. Memory is ``O(q_block x H x S)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from lcm.ops.masks import Mask


def attention_mass(
    q: Float[Array, "B T H D"],
    keys: Float[Array, "B K S D"],
    observers: Bool[Array, "B T"],
    *,
    mask: Mask,
    scale: float | None = None,
    q_block: int = 64,
) -> Float[Array, "B K S"]:
    """``mass[b, k, s] = sum over observing queries t and heads h of group k of softmax_s(q_t,h . k_s * scale)``.

    Each query sees the keys ``mask`` (:class:`lcm.ops.masks.Mask`) lets it see: the attention layer's own mask,
    so the probabilities are the layer's. ``q`` is rotated as the attention layer rotates it; ``keys`` are the
    layer's keys as attention reads them (rotated). float32 throughout.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, capacity = keys.shape[1], keys.shape[2]
    if keys.shape != (batch, num_kv_heads, capacity, head_dim) or num_heads % num_kv_heads:
        raise ValueError(f"incompatible shapes q={q.shape} keys={keys.shape} (keys as [B, K, S, D])")
    if observers.shape != (batch, q_len):
        raise ValueError(f"observers has shape {observers.shape}; expected (B, T) = {(batch, q_len)}")
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    q_block = min(q_block, q_len)
    num_blocks = -(-q_len // q_block)
    pad = num_blocks * q_block - q_len
    q = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    observers = jnp.pad(observers, ((0, 0), (0, pad)))
    q_BxNxQxKxGxD = q.reshape(batch, num_blocks, q_block, num_kv_heads, group, head_dim)
    keys = keys.astype(jnp.float32)
    mask.check(batch, q_len, capacity)
    k_index_S = jnp.arange(capacity, dtype=jnp.int32)

    def block_mass(i: jax.Array) -> jax.Array:
        q_BxQxKxGxD = q_BxNxQxKxGxD[:, i]
        observe_BxQ = jax.lax.dynamic_slice_in_dim(observers, i * q_block, q_block, axis=1)
        q_index_Q = i * q_block + jnp.arange(q_block, dtype=jnp.int32)

        def compute() -> jax.Array:
            logits = jnp.einsum("bqkgd,bksd->bkgqs", q_BxQxKxGxD, keys) * scale
            visible_bxQxS = mask.visible(q_index_Q, k_index_S, capacity)
            logits = jnp.where(visible_bxQxS[:, None, None], logits, -jnp.inf)
            probs = jax.nn.softmax(logits, axis=-1)
            probs = jnp.where(observe_BxQ[:, None, None, :, None], probs, 0.0)
            return probs.sum(axis=(2, 3))

        return jax.lax.cond(observe_BxQ.any(), compute, lambda: jnp.zeros((batch, num_kv_heads, capacity)))

    def body(i: jax.Array, total: jax.Array) -> jax.Array:
        return total + block_mass(i)

    return jax.lax.fori_loop(0, num_blocks, body, jnp.zeros((batch, num_kv_heads, capacity), jnp.float32))


def reference_attention_mass(
    q: Float[Array, "B T H D"],
    keys: Float[Array, "B K S D"],
    observers: Bool[Array, "B T"],
    *,
    mask: Mask,
) -> Float[Array, "B K S"]:
    """The same in one dense expression (tests): repeat keys per query head, softmax, mask, sum."""
    group = q.shape[2] // keys.shape[1]
    keys_BxHxSxD = jnp.repeat(keys, group, axis=1)
    logits = jnp.einsum("bthd,bhsd->bhts", q, keys_BxHxSxD) / jnp.sqrt(q.shape[-1])
    visible = mask.dense(q.shape[1], keys.shape[2])[:, None]
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    probs = jnp.where(observers[:, None, :, None], probs, 0.0).sum(axis=2)  # [B, H, S]
    return probs.reshape(q.shape[0], keys.shape[1], group, keys.shape[2]).sum(axis=2)
