"""Causal attention over a KV cache: the plain reference and the chunked XLA path.

Both work on cache *slots*: query ``t`` of a call sits in slot ``q_offset + t`` and may see key slot ``j`` iff
``j <= q_offset + t`` (causal), ``j < kv_length`` (filled part of the cache) and, with a sliding window ``w``
(Mistral), ``q_offset + t - j < w``. Slots, not RoPE positions, decide visibility, so a KV policy may renumber
positions (TokenSelect, InfiniPot) without touching the mask.

GQA is computed without repeating keys and values: query heads are grouped as ``[kv_head, group]``, the
grouping transformers uses (query head ``h`` reads KV head ``h // (H / H_kv)``).

``chunked_attention`` processes queries in chunks of ``q_chunk`` (a ``lax.map`` over chunks) so the score
tensor is ``O(q_chunk x S)`` rather than ``O(T x S)``: a 16k prefill never materialises a 16k x 16k matrix.
Softmax statistics are kept in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_NEG_INF = -1e30  # finite, so rows with no visible key (padding) give zeros rather than NaN


def visibility_mask(
    q_slots: Int[Array, "T"], k_slots: Int[Array, "S"], kv_length: Int[Array, ""] | int, window: int | None
) -> jax.Array:
    """Boolean ``[T, S]``: may the query in slot ``q_slots[t]`` attend to key slot ``k_slots[s]``."""
    q = q_slots[:, None]
    k = k_slots[None, :]
    mask = (k <= q) & (k < kv_length)
    if window is not None:
        mask &= q - k < window
    return mask


def reference_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    *,
    q_offset: Int[Array, ""] | int = 0,
    kv_length: Int[Array, ""] | int | None = None,
    window: int | None = None,
    scale: float | None = None,
) -> Float[Array, "B T H D"]:
    """Plain masked softmax attention with repeated KV heads: the readable definition the tests compare to."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    kv_length = k.shape[1] if kv_length is None else kv_length
    scale = head_dim**-0.5 if scale is None else scale
    k_rep = jnp.repeat(k, num_heads // num_kv_heads, axis=2)
    v_rep = jnp.repeat(v, num_heads // num_kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k_rep.astype(jnp.float32)) * scale
    mask = visibility_mask(q_offset + jnp.arange(q_len), jnp.arange(k.shape[1]), kv_length, window)
    scores = jnp.where(mask[None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1) * mask[None, None].any(-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v_rep.astype(jnp.float32))
    return out.astype(q.dtype)


def _attend_block(
    q_BxTxKxGxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    q_slots_T: jax.Array,
    kv_length: jax.Array,
    window: int | None,
    scale: float,
) -> jax.Array:
    scores_BxKxGxTxS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    )
    scores_BxKxGxTxS = scores_BxKxGxTxS * scale
    mask_TxS = visibility_mask(q_slots_T, jnp.arange(k_BxSxKxD.shape[1]), kv_length, window)
    scores_BxKxGxTxS = jnp.where(mask_TxS, scores_BxKxGxTxS, _NEG_INF)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1)
    probs = jnp.where(mask_TxS.any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxSxKxD.dtype), v_BxSxKxD, preferred_element_type=jnp.float32)
    return out


def chunked_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    *,
    q_offset: Int[Array, ""] | int = 0,
    kv_length: Int[Array, ""] | int | None = None,
    window: int | None = None,
    scale: float | None = None,
    q_chunk: int = 512,
) -> Float[Array, "B T H D"]:
    """Causal GQA attention of ``T`` queries (slots ``q_offset…``) over a cache of ``S`` key slots.

    Memory is ``O(min(T, q_chunk) x S)`` per layer. ``T`` need not be a multiple of ``q_chunk``: the tail is
    padded and dropped.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"incompatible shapes q={q.shape} k={k.shape} v={v.shape}")
    group = num_heads // num_kv_heads
    kv_length = jnp.asarray(k.shape[1] if kv_length is None else kv_length, jnp.int32)
    scale = head_dim**-0.5 if scale is None else scale
    q_BxTxKxGxD = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
    q_slots = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)

    if q_len <= q_chunk:
        out = _attend_block(q_BxTxKxGxD, k, v, q_slots, kv_length, window, scale)
        return out.reshape(q.shape).astype(q.dtype)

    num_chunks = -(-q_len // q_chunk)
    pad = num_chunks * q_chunk - q_len
    q_pad = jnp.pad(q_BxTxKxGxD, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    slots_pad = jnp.concatenate([q_slots, q_slots[-1] + 1 + jnp.arange(pad, dtype=jnp.int32)])
    q_chunks = q_pad.reshape(batch, num_chunks, q_chunk, num_kv_heads, group, head_dim).swapaxes(0, 1)
    slot_chunks = slots_pad.reshape(num_chunks, q_chunk)

    def one_chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        q_c, slots_c = args
        return _attend_block(q_c, k, v, slots_c, kv_length, window, scale)

    out = jax.lax.map(one_chunk, (q_chunks, slot_chunks))
    out = out.swapaxes(0, 1).reshape(batch, num_chunks * q_chunk, num_heads, head_dim)[:, :q_len]
    return out.astype(q.dtype)
