"""Attention over a KV cache: the plain reference and the chunked (flash) XLA path.

Both work on cache *slots* and follow the visibility rule of :mod:`lcm.ops.masks` (causal, filled length,
sliding window with attention sinks, document masks). Slots, not RoPE positions, decide visibility, so a KV policy
may renumber positions (TokenSelect, InfiniPot) without touching the mask. A query that sees no key gets a zero
output and zero gradients.

GQA is computed without repeating keys and values: query heads are grouped as ``[kv_head, group]``, the
grouping transformers uses (query head ``h`` reads KV head ``h // (H / H_kv)``).

``chunked_attention`` is the fast XLA path: query blocks x key blocks with an online softmax (FlashAttention, Dao
et al. 2022), visiting only the key blocks that :func:`key_blocks_to_visit` lists, so a 16k prefill never
materialises a 16k x 16k matrix and fully masked blocks cost nothing. It is differentiable w.r.t. ``q``, ``k``,
``v`` through a custom VJP: the forward saves the output and each row's log-sum-exp, the backward is
FlashAttention-2's (Dao 2023, Algorithm 2) in plain ``jnp``. Softmax statistics and gradient accumulators are
float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lcm.ops.masks import check_segments, key_blocks_to_visit, padding_as_segments, visibility_mask

_NEG_INF = -1e30  # finite, so rows with no visible key (padding) give zeros rather than NaN

__all__ = ["chunked_attention", "key_blocks_to_visit", "reference_attention", "stacked_cache", "visibility_mask"]


def _per_head(mask: jax.Array) -> jax.Array:
    """``[T, S]`` or ``[B, T, S]`` as ``[B or 1, 1, T, S]``, to broadcast over heads."""
    return mask[None, None] if mask.ndim == 2 else mask[:, None]


def reference_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    *,
    q_offset: Int[Array, ""] | int = 0,
    kv_length: Int[Array, ""] | int | None = None,
    window: int | None = None,
    sinks: int = 0,
    q_segments: Int[Array, "B T"] | None = None,
    k_segments: Int[Array, "B S"] | None = None,
    kv_start: Int[Array, " B"] | None = None,
    scale: float | None = None,
) -> Float[Array, "B T H D"]:
    """Plain masked softmax attention with repeated KV heads: the readable definition the tests compare to."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q_segments, k_segments = padding_as_segments(kv_start, q_segments, k_segments, q_offset, q_len, k.shape[1])
    check_segments(q_segments, k_segments, q_len, k.shape[1], batch)
    kv_length = k.shape[1] if kv_length is None else kv_length
    scale = head_dim**-0.5 if scale is None else scale
    k_rep = jnp.repeat(k, num_heads // num_kv_heads, axis=2)
    v_rep = jnp.repeat(v, num_heads // num_kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k_rep.astype(jnp.float32)) * scale
    mask = visibility_mask(
        q_offset + jnp.arange(q_len),
        jnp.arange(k.shape[1]),
        kv_length,
        window,
        sinks=sinks,
        q_segments=q_segments,
        k_segments=k_segments,
    )
    mask = _per_head(mask)
    scores = jnp.where(mask, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1) * mask.any(-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v_rep.astype(jnp.float32))
    return out.astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """The static half of a chunked call: hashable, so it is the custom VJP's non-differentiable argument."""

    q_len: int
    kv_len: int  # the cache capacity S
    q_block: int
    kv_block: int
    group: int
    window: int | None
    sinks: int


class _Masks(NamedTuple):
    """The traced integer half of a chunked call; it gets no gradient."""

    q_offset: jax.Array
    kv_length: jax.Array  # clamped to the cache capacity
    q_segments: jax.Array | None  # [nq, B, G*qb]: the segment of each grouped query row
    k_segments: jax.Array | None  # [B, S]
    k_segment_max: jax.Array | None  # [nk]: the largest segment id in each key block, over the batch
    layer: jax.Array  # which layer of the stacked [L, B, K, S, D] keys and values to read


def _visited(tiling: _Tiling, masks: _Masks, i: jax.Array, num_key_blocks: int) -> tuple[jax.Array, jax.Array]:
    """:func:`key_blocks_to_visit` for query block ``i`` of a chunked call."""
    segment_bounds = {}
    if masks.q_segments is not None and masks.k_segments is not None:
        segment_bounds = {"q_segment_min": masks.q_segments[i].min(), "k_segment_max": masks.k_segment_max}
    return key_blocks_to_visit(
        i,
        q_offset=masks.q_offset,
        q_len=tiling.q_len,
        kv_length=masks.kv_length,
        q_block=tiling.q_block,
        kv_block=tiling.kv_block,
        num_key_blocks=num_key_blocks,
        window=tiling.window,
        sinks=tiling.sinks,
        **segment_bounds,
    )


def _block_start(tiling: _Tiling, j: jax.Array) -> jax.Array:
    """First slot of key block ``j``. The last block of a cache that is not a whole number of blocks is shifted
    back to end at the last slot (no padded copy of the cache); its slots before ``j * kv_block`` belong to block
    ``j - 1`` and are masked out in block ``j``."""
    return jnp.minimum(j * tiling.kv_block, tiling.kv_len - tiling.kv_block)


def _block_index(tiling: _Tiling, masks: _Masks, j: jax.Array) -> tuple[jax.Array, ...]:
    """Start index of key block ``j`` of layer ``masks.layer`` in a stacked ``[L, B, K, S, D]`` buffer."""
    zero = jnp.zeros((), jnp.int32)
    return (masks.layer, zero, zero, _block_start(tiling, j), zero)


def _key_block(tiling: _Tiling, masks: _Masks, x_LxBxKxSxD: jax.Array, j: jax.Array) -> jax.Array:
    """Key block ``j``, ``[B, K, kv_block, D]``, of layer ``masks.layer`` of a stacked heads-first cache.

    One slice of the whole ``[L, B, K, S, D]`` buffer: neither the layer nor the cache is ever copied out (XLA
    would materialise a layer sliced outside the loop, a copy of the whole layer per decode step).
    """
    _, batch, heads, _, dim = x_LxBxKxSxD.shape
    size = (1, batch, heads, tiling.kv_block, dim)
    return jax.lax.dynamic_slice(x_LxBxKxSxD, _block_index(tiling, masks, j), size)[0]


def _fully_visible(tiling: _Tiling, masks: _Masks, i: jax.Array, j: jax.Array) -> jax.Array:
    """Does every query row of block ``i`` see every key of block ``j``? Then the block needs no mask at all."""
    if masks.q_segments is not None:
        return jnp.asarray(False)
    first_q = masks.q_offset + i * tiling.q_block
    last_q = first_q + tiling.q_block - 1
    start = j * tiling.kv_block
    end = start + tiling.kv_block  # one past the block's last slot
    visible = (end <= tiling.kv_len) & (end - 1 <= first_q) & (end <= masks.kv_length)
    if tiling.window is not None:
        visible &= (last_q - start < tiling.window) | (end <= tiling.sinks)
    return visible


def _block_scores(
    tiling: _Tiling, masks: _Masks, q_BxKxRxD: jax.Array, k_BxKxSxD: jax.Array, i: jax.Array, j: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """float32 scores of query block ``i`` against key block ``j``, invisible entries at -1e30; and the mask."""
    scores = jnp.einsum("bkrd,bksd->bkrs", q_BxKxRxD, k_BxKxSxD, preferred_element_type=jnp.float32)
    rows_R = jnp.tile(jnp.arange(tiling.q_block, dtype=jnp.int32), tiling.group)  # rows are (group, query)
    q_slots_R = masks.q_offset + i * tiling.q_block + rows_R
    k_slots_S = _block_start(tiling, j) + jnp.arange(tiling.kv_block, dtype=jnp.int32)
    # slots that belong to the previous block (the shifted last block) get a slot no query can see
    k_slots_S = jnp.where(k_slots_S >= j * tiling.kv_block, k_slots_S, jnp.iinfo(jnp.int32).max)
    segments = {}
    if masks.q_segments is not None and masks.k_segments is not None:
        k_segments = jax.lax.dynamic_slice_in_dim(masks.k_segments, _block_start(tiling, j), tiling.kv_block, axis=1)
        segments = {"q_segments": masks.q_segments[i], "k_segments": k_segments}
    mask = visibility_mask(q_slots_R, k_slots_S, masks.kv_length, tiling.window, sinks=tiling.sinks, **segments)
    mask = _per_head(mask)
    return jnp.where(mask, scores, _NEG_INF), mask


def _num_key_blocks(tiling: _Tiling) -> int:
    return -(-tiling.kv_len // tiling.kv_block)


def _flash_forward(
    tiling: _Tiling, q_blocks: jax.Array, k: jax.Array, v: jax.Array, masks: _Masks
) -> tuple[jax.Array, jax.Array]:
    """Output ``[nq, B, K, R, D]`` (input dtype) and float32 log-sum-exp ``[nq, B, K, R]`` (0 for rows with no key)."""
    _, batch, num_kv_heads, rows, head_dim = q_blocks.shape

    def one_query_block(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        q_BxKxRxD = q_blocks[i]
        block_ids, count = _visited(tiling, masks, i, _num_key_blocks(tiling))

        def update(carry: tuple[jax.Array, ...], scores: jax.Array, mask: jax.Array | None, j: jax.Array):
            max_BxKxR, sum_BxKxR, acc_BxKxRxD = carry
            new_max = jnp.maximum(max_BxKxR, scores.max(-1))
            probs = jnp.exp(scores - new_max[..., None])
            if mask is not None:  # zeroed explicitly: a row with no visible key yet has new_max = -1e30 too
                probs = jnp.where(mask, probs, 0.0)
            correction = jnp.exp(max_BxKxR - new_max)
            new_sum = sum_BxKxR * correction + probs.sum(-1)
            v_BxKxSxD = _key_block(tiling, masks, v, j)
            pv = jnp.einsum("bkrs,bksd->bkrd", probs.astype(v.dtype), v_BxKxSxD, preferred_element_type=jnp.float32)
            return new_max, new_sum, acc_BxKxRxD * correction[..., None] + pv

        def masked_block(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            scores, mask = _block_scores(tiling, masks, q_BxKxRxD, _key_block(tiling, masks, k, j), i, j)
            return update(carry, scores, mask, j)

        def visible_block(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            k_BxKxSxD = _key_block(tiling, masks, k, j)
            scores = jnp.einsum("bkrd,bksd->bkrs", q_BxKxRxD, k_BxKxSxD, preferred_element_type=jnp.float32)
            return update(carry, scores, None, j)

        def one_key_block(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            # blocks wholly inside the visible region (most of a long causal prefill) skip building the mask
            j = block_ids[t]
            return jax.lax.cond(_fully_visible(tiling, masks, i, j), visible_block, masked_block, j, carry)

        init = (
            jnp.full((batch, num_kv_heads, rows), _NEG_INF, jnp.float32),
            jnp.zeros((batch, num_kv_heads, rows), jnp.float32),
            jnp.zeros((batch, num_kv_heads, rows, head_dim), jnp.float32),
        )
        row_max, total, acc = jax.lax.fori_loop(0, count, one_key_block, init)
        # a row that saw no key (padding) has total 0: zeros, as the reference gives; its log-sum-exp is set to 0 so
        # that the backward's exp(-1e30 - lse) of its (all masked) scores is 0
        seen = total > 0
        total = jnp.where(seen, total, 1.0)
        lse = jnp.where(seen, row_max + jnp.log(total), 0.0)
        return (acc / total[..., None]).astype(q_blocks.dtype), lse

    return jax.lax.map(one_query_block, jnp.arange(q_blocks.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_attention(tiling: _Tiling, q_blocks: jax.Array, k: jax.Array, v: jax.Array, masks: _Masks) -> jax.Array:
    return _flash_forward(tiling, q_blocks, k, v, masks)[0]


def _flash_attention_fwd(
    tiling: _Tiling, q_blocks: jax.Array, k: jax.Array, v: jax.Array, masks: _Masks
) -> tuple[jax.Array, tuple[jax.Array | _Masks, ...]]:
    out, lse = _flash_forward(tiling, q_blocks, k, v, masks)
    return out, (q_blocks, k, v, masks, out, lse)


def _flash_attention_bwd(
    tiling: _Tiling, residuals: tuple, d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    """FlashAttention-2's backward (Dao 2023, Algorithm 2) over the same visited blocks as the forward.

    ``q_blocks`` are already scaled, so ``dS K`` here is the gradient of the scaled queries (the ``* scale`` of the
    paper's ``dQ`` comes from differentiating the scaling outside) and ``dS^T Q`` includes the scale. Deviation:
    Algorithm 2 loops over key blocks outside and query blocks inside (``dQ`` by atomic adds); here query blocks
    are outside, so the same :func:`key_blocks_to_visit` list drives both passes, ``dQ`` of a block stays in the
    inner loop's carry, and ``dK``/``dV`` for the whole cache are a float32 carry updated in place.
    """
    q_blocks, k, v, masks, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # D = rowsum(dO * O)

    def one_query_block(carry: tuple[jax.Array, jax.Array], i: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        q_BxKxRxD, d_out_BxKxRxD, lse_BxKxR, delta_BxKxR = q_blocks[i], d_out[i], lse[i], delta[i]
        block_ids, count = _visited(tiling, masks, i, _num_key_blocks(tiling))

        def one_key_block(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            dq_BxKxRxD, dk, dv = carry
            j = block_ids[t]
            k_BxKxSxD, v_BxKxSxD = _key_block(tiling, masks, k, j), _key_block(tiling, masks, v, j)
            scores, _ = _block_scores(tiling, masks, q_BxKxRxD, k_BxKxSxD, i, j)
            probs = jnp.exp(scores - lse_BxKxR[..., None])  # masked scores are -1e30: probability 0
            dv_j = jnp.einsum(
                "bkrs,bkrd->bksd", probs.astype(d_out.dtype), d_out_BxKxRxD, preferred_element_type=jnp.float32
            )
            d_probs = jnp.einsum("bkrd,bksd->bkrs", d_out_BxKxRxD, v_BxKxSxD, preferred_element_type=jnp.float32)
            d_scores = probs * (d_probs - delta_BxKxR[..., None])
            dq_BxKxRxD += jnp.einsum(
                "bkrs,bksd->bkrd", d_scores.astype(k.dtype), k_BxKxSxD, preferred_element_type=jnp.float32
            )
            # the rows of a grouped block are (group, query): summing over them sums over the query group (GQA)
            dk_j = jnp.einsum(
                "bkrs,bkrd->bksd", d_scores.astype(q_blocks.dtype), q_BxKxRxD, preferred_element_type=jnp.float32
            )
            # the shifted last block overlaps its predecessor; entries of the overlap are masked, their grads 0
            return dq_BxKxRxD, _add_key_block(tiling, masks, dk, dk_j, j), _add_key_block(tiling, masks, dv, dv_j, j)

        dq_init = jnp.zeros(q_BxKxRxD.shape, jnp.float32)
        dq_BxKxRxD, dk, dv = jax.lax.fori_loop(0, count, one_key_block, (dq_init, *carry))
        return (dk, dv), dq_BxKxRxD

    dkv_init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(one_query_block, dkv_init, jnp.arange(q_blocks.shape[0]))
    return dq.astype(q_blocks.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


def _add_key_block(
    tiling: _Tiling, masks: _Masks, acc_LxBxKxSxD: jax.Array, block_BxKxSxD: jax.Array, j: jax.Array
) -> jax.Array:
    """``acc[layer, :, :, block j] += block`` for a stacked heads-first accumulator (in place inside the loop)."""
    old = _key_block(tiling, masks, acc_LxBxKxSxD, j)
    return jax.lax.dynamic_update_slice(acc_LxBxKxSxD, (old + block_BxKxSxD)[None], _block_index(tiling, masks, j))


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def stacked_cache(
    q: jax.Array, k: jax.Array, v: jax.Array, *, heads_first: bool, layer: jax.Array | int | None, sinks: int
) -> tuple[jax.Array, jax.Array, jax.Array | int]:
    """Keys and values as the stacked heads-first cache ``[L, B, K, S, D]`` and the layer to read, after the
    argument checks every attention implementation shares (GQA divisibility, shapes, ``sinks >= 0``)."""
    if layer is None:
        if not heads_first:
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        k, v, layer = k[None], v[None], 0
    elif not heads_first or k.ndim != 5:
        raise ValueError(f"layer={layer} needs heads_first=True and a stacked [L, B, K, S, D] cache, got k {k.shape}")
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if k.shape != v.shape or k.shape[1] != batch or k.shape[4] != head_dim:
        layout = "[B, K, S, D]" if heads_first else "[B, S, K, D]"
        raise ValueError(f"incompatible shapes q={q.shape} k={k.shape} v={v.shape} (k and v as {layout})")
    if sinks < 0:
        raise ValueError(f"sinks={sinks} must be >= 0")
    return k, v, layer


def chunked_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    *,
    q_offset: Int[Array, ""] | int = 0,
    kv_length: Int[Array, ""] | int | None = None,
    window: int | None = None,
    sinks: int = 0,
    q_segments: Int[Array, "B T"] | None = None,
    k_segments: Int[Array, "B S"] | None = None,
    kv_start: Int[Array, " B"] | None = None,
    scale: float | None = None,
    q_block: int = 256,
    kv_block: int = 256,
    heads_first: bool = False,
    layer: Int[Array, ""] | int | None = None,
) -> Float[Array, "B T H D"]:
    """GQA attention of ``T`` queries (slots ``q_offset…``) over ``S`` cached key slots, flash-style.

    Visibility is the module docstring's rule (causal, ``kv_length``, ``window`` with ``sinks``, document masks;
    ``kv_start [B]``, left padding, is the document mask :func:`lcm.ops.masks.left_padding_segments` builds).
    Queries are processed in blocks of ``q_block`` (``lax.map``); for each, an online softmax (Milakov &
    Gimelshein 2018; Dao et al. 2022) runs over the key blocks of ``kv_block`` that :func:`key_blocks_to_visit`
    lists, with a *dynamic* trip count, so key blocks that are entirely masked — beyond the causal diagonal, beyond
    ``kv_length`` (the empty tail of the cache), between the sinks and the sliding window, or of earlier documents
    — cost nothing. Tiles stay small enough for the CPU's cache; a query block of 256 rows x 3 grouped heads
    against 256 keys is a 768 KiB score tile. Memory is ``O(q_block x S)`` at most; the backward adds float32
    ``dK``/``dV`` buffers the size of the cache.
    Differentiable w.r.t. ``q``, ``k`` and ``v`` (FlashAttention-2 backward, see the module docstring); the
    integer arguments get no gradient.

    ``heads_first=True`` takes ``k``/``v`` as ``[B, K, S, D]``, the KV cache's layout: key blocks are then
    sliced from the cache in place. With the default ``[B, S, K, D]`` they are transposed once per call (a copy of
    ``k`` and ``v``), which a decode step over a long cache cannot afford. ``layer=l`` (heads-first only) takes
    ``k``/``v`` as the whole stacked cache ``[L, B, K, S, D]`` and reads layer ``l`` of it where it lies.
    """
    k, v, layer = stacked_cache(q, k, v, heads_first=heads_first, layer=layer, sinks=sinks)
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, cap = k.shape[2], k.shape[3]
    q_segments, k_segments = padding_as_segments(kv_start, q_segments, k_segments, q_offset, q_len, cap)
    check_segments(q_segments, k_segments, q_len, cap, batch)
    group = num_heads // num_kv_heads
    kv_length = jnp.asarray(cap if kv_length is None else kv_length, jnp.int32)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    scale = head_dim**-0.5 if scale is None else scale
    q_block = min(q_block, q_len)
    kv_block = min(kv_block, cap)
    tiling = _Tiling(q_len, cap, q_block, kv_block, group, window, sinks)
    num_q = -(-q_len // q_block)
    num_k = _num_key_blocks(tiling)
    kv_length = jnp.minimum(kv_length, cap)
    # queries are padded to whole blocks (padded rows are dropped); the cache is never padded or copied: key
    # blocks are sliced from it in the loop, the last one shifted back when S is not a multiple of kv_block
    q = jnp.pad(q, ((0, 0), (0, num_q * q_block - q_len), (0, 0), (0, 0)))

    # [nq, B, K, G*qb, D]: rows of a query block ordered (group, query) so each KV head is one matmul
    q_blocks = (q * jnp.asarray(scale, q.dtype)).reshape(batch, num_q, q_block, num_kv_heads, group, head_dim)
    q_blocks = q_blocks.transpose(1, 0, 3, 4, 2, 5).reshape(num_q, batch, num_kv_heads, group * q_block, head_dim)
    layer = jnp.asarray(layer, jnp.int32)
    masks = _Masks(q_offset, kv_length, None, None, None, layer)
    if q_segments is not None and k_segments is not None:
        # edge padding repeats a real id of the same (last) block, so per-block min/max over rows stay exact
        q_seg = jnp.pad(q_segments, ((0, 0), (0, num_q * q_block - q_len)), mode="edge")
        q_seg = jnp.tile(q_seg.reshape(batch, num_q, q_block).transpose(1, 0, 2), (1, 1, group))
        k_seg_max = jnp.pad(k_segments, ((0, 0), (0, num_k * kv_block - cap)), mode="edge")
        k_seg_max = k_seg_max.reshape(batch, num_k, kv_block).max((0, 2))
        if cap % kv_block:  # the shifted last block also holds the end of the previous one
            k_seg_max = k_seg_max.at[-1].max(k_segments[:, cap - kv_block :].max())
        masks = _Masks(q_offset, kv_length, q_seg, k_segments, k_seg_max, layer)

    out = _flash_attention(tiling, q_blocks, k, v, masks)  # [nq, B, K, G*qb, D]
    out = out.reshape(num_q, batch, num_kv_heads, group, q_block, head_dim).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(batch, num_q * q_block, num_heads, head_dim)[:, :q_len]
