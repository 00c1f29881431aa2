"""Causal attention over a KV cache: the plain reference and the chunked XLA path.

Both work on cache *slots*: query ``t`` of a call sits in slot ``q_offset + t`` and may see key slot ``j`` iff
``j <= q_offset + t`` (causal), ``j < kv_length`` (filled part of the cache) and, with a sliding window ``w``
(Mistral), ``q_offset + t - j < w``. Slots, not RoPE positions, decide visibility, so a KV policy may renumber
positions (TokenSelect, InfiniPot) without touching the mask.

GQA is computed without repeating keys and values: query heads are grouped as ``[kv_head, group]``, the
grouping transformers uses (query head ``h`` reads KV head ``h // (H / H_kv)``).

``chunked_attention`` is the fast XLA path: query blocks x key blocks with an online softmax, fully masked key
blocks skipped; a 16k prefill never materialises a 16k x 16k matrix. Softmax statistics are kept in float32
whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_NEG_INF = -1e30  # finite, so rows with no visible key (padding) give zeros rather than NaN


def visibility_mask(
    q_slots: Int[Array, " T"], k_slots: Int[Array, " S"], kv_length: Int[Array, ""] | int, window: int | None
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


def chunked_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    *,
    q_offset: Int[Array, ""] | int = 0,
    kv_length: Int[Array, ""] | int | None = None,
    window: int | None = None,
    scale: float | None = None,
    q_block: int = 256,
    kv_block: int = 256,
) -> Float[Array, "B T H D"]:
    """Causal GQA attention of ``T`` queries (slots ``q_offset…``) over ``S`` cached key slots, flash-style.

    Queries are processed in blocks of ``q_block`` (``lax.map``); for each, an online softmax (Milakov &
    Gimelshein 2018; Dao et al. 2022) runs over key blocks of ``kv_block`` with a *dynamic* trip count, so key
    blocks that are entirely masked — beyond the causal diagonal, beyond ``kv_length`` (the empty tail of the
    cache) or before a sliding window — cost nothing. Tiles stay small enough for the CPU's cache; a query block
    of 256 rows x 3 grouped heads against 256 keys is a 768 KiB score tile. Memory is ``O(q_block x S)`` at
    most. Inference only: the dynamic loop has no reverse-mode derivative (use :func:`reference_attention` to
    differentiate).
    """
    batch, q_len, num_heads, head_dim = q.shape
    cap = k.shape[1]
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"incompatible shapes q={q.shape} k={k.shape} v={v.shape}")
    group = num_heads // num_kv_heads
    kv_length = jnp.asarray(cap if kv_length is None else kv_length, jnp.int32)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    scale = head_dim**-0.5 if scale is None else scale
    q_block = min(q_block, q_len)
    kv_block = min(kv_block, cap)
    num_q = -(-q_len // q_block)
    num_k = -(-cap // kv_block)
    # pad to whole blocks; padded queries are dropped, padded keys lie beyond kv_length and are never read
    q = jnp.pad(q, ((0, 0), (0, num_q * q_block - q_len), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, num_k * kv_block - cap), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, num_k * kv_block - cap), (0, 0), (0, 0)))
    kv_length = jnp.minimum(kv_length, cap)

    # [nq, B, K, G*qb, D]: rows of a query block ordered (group, query) so each KV head is one matmul
    q_blocks = (q * jnp.asarray(scale, q.dtype)).reshape(batch, num_q, q_block, num_kv_heads, group, head_dim)
    q_blocks = q_blocks.transpose(1, 0, 3, 4, 2, 5).reshape(num_q, batch, num_kv_heads, group * q_block, head_dim)
    k_blocks = k.reshape(batch, num_k, kv_block, num_kv_heads, head_dim).transpose(1, 0, 3, 2, 4)
    v_blocks = v.reshape(batch, num_k, kv_block, num_kv_heads, head_dim).transpose(1, 0, 3, 2, 4)
    rows = group * q_block

    def one_query_block(i: jax.Array) -> jax.Array:
        q_BxKxRxD = q_blocks[i]
        first_slot = q_offset + i * q_block
        q_slots_R = first_slot + jnp.tile(jnp.arange(q_block, dtype=jnp.int32), group)
        end = jnp.minimum(first_slot + q_block, kv_length)  # keys at slots >= end are invisible to the block
        stop = (end + kv_block - 1) // kv_block
        begin = 0 if window is None else jnp.maximum(first_slot - window + 1, 0) // kv_block

        def one_key_block(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            max_BxKxR, sum_BxKxR, acc_BxKxRxD = carry
            scores = jnp.einsum("bkrd,bksd->bkrs", q_BxKxRxD, k_blocks[j], preferred_element_type=jnp.float32)
            k_slots = j * kv_block + jnp.arange(kv_block, dtype=jnp.int32)
            mask_RxS = visibility_mask(q_slots_R, k_slots, kv_length, window)
            scores = jnp.where(mask_RxS[None, None], scores, _NEG_INF)
            new_max = jnp.maximum(max_BxKxR, scores.max(-1))
            # masked entries are zeroed explicitly: a row with no visible key yet has new_max = -1e30 too
            probs = jnp.where(mask_RxS[None, None], jnp.exp(scores - new_max[..., None]), 0.0)
            correction = jnp.exp(max_BxKxR - new_max)
            new_sum = sum_BxKxR * correction + probs.sum(-1)
            pv = jnp.einsum("bkrs,bksd->bkrd", probs.astype(v.dtype), v_blocks[j], preferred_element_type=jnp.float32)
            return new_max, new_sum, acc_BxKxRxD * correction[..., None] + pv

        init = (
            jnp.full((batch, num_kv_heads, rows), _NEG_INF, jnp.float32),
            jnp.zeros((batch, num_kv_heads, rows), jnp.float32),
            jnp.zeros((batch, num_kv_heads, rows, head_dim), jnp.float32),
        )
        _, total, acc = jax.lax.fori_loop(begin, stop, one_key_block, init)
        # a row that saw no key (padding) has total 0: return zeros, as the reference does
        return acc / jnp.where(total > 0, total, 1.0)[..., None]

    out = jax.lax.map(one_query_block, jnp.arange(num_q))  # [nq, B, K, G*qb, D]
    out = out.reshape(num_q, batch, num_kv_heads, group, q_block, head_dim).transpose(1, 0, 4, 2, 3, 5)
    out = out.reshape(batch, num_q * q_block, num_heads, head_dim)[:, :q_len]
    return out.astype(q.dtype)
