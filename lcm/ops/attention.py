"""Attention over any :class:`lcm.ops.masks.Mask`: the plain reference and the tiled (flash) XLA path.

Both take queries ``q [B, T, H, D]`` and keys and values heads-first, ``k, v [B, K, S, D]`` (the KV cache's
layout), and follow the mask's visibility rule; neither hard-wires causality. Slots, not RoPE positions, decide
visibility, so a KV policy may renumber positions (TokenSelect, InfiniPot) without touching the mask. A query that
sees no key gets a zero output, zero gradients, and a log-sum-exp of ``-inf``.

GQA is computed without repeating keys and values: query heads are grouped as ``[kv_head, group]``, the
grouping transformers uses (query head ``h`` reads KV head ``h // (H / H_kv)``).

``normalizer`` names how scores become weights. ``"softmax"`` is the only one so far; Softplus attention
(LSSA/LSSAR) registers here later, behind the same call. ``return_lse`` also returns each row's log-sum-exp
``[B, T, H]`` (float32), what a ring attention step merges partial results with and what an attention-mass
statistic can reuse.

``chunked_attention`` is the fast XLA path: query tiles x key tiles with an online softmax (FlashAttention, Dao et
al. 2022), visiting only the tiles that :meth:`Mask.block_layout` lists as non-empty and building no mask in the
full ones, so a 16k prefill never materialises a 16k x 16k matrix and fully masked tiles cost nothing. It is
differentiable w.r.t. ``q``, ``k``, ``v`` through a custom VJP: the forward saves the output and each row's
log-sum-exp, the backward is FlashAttention-2's (Dao 2023, Algorithm 2) in plain ``jnp``. Softmax statistics and
gradient accumulators are float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lcm.ops.masks import FULL, Mask, key_blocks_to_visit

_NEG_INF = -1e30  # finite, so rows with no visible key (padding) give zeros rather than NaN
NORMALIZERS = ("softmax",)

__all__ = ["NORMALIZERS", "check_call", "chunked_attention", "reference_attention"]


def check_call(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, normalizer: str) -> None:
    """The argument checks every implementation shares: shapes, GQA divisibility, the mask, the normaliser."""
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be an lcm.ops.masks.Mask (e.g. masks.causal()), got {type(mask).__name__}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown attention normalizer {normalizer!r}; choose one of {list(NORMALIZERS)}")
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D] and k, v [B, K, S, D], got q {q.shape} k {k.shape}")
    kv = k.shape
    batch, q_len, num_heads, head_dim = q.shape
    if k.shape != v.shape or kv[0] != batch or kv[3] != head_dim:
        raise ValueError(f"incompatible shapes q={q.shape} k={k.shape} v={v.shape} (k and v as [B, K, S, D])")
    if num_heads % kv[1]:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kv[1]}")
    mask.check(batch, q_len, kv[2])


def reference_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B K S D"],
    v: Float[Array, "B K S D"],
    *,
    mask: Mask,
    scale: float | None = None,
    normalizer: str = "softmax",
    return_lse: bool = False,
) -> Float[Array, "B T H D"] | tuple[Float[Array, "B T H D"], Float[Array, "B T H"]]:
    """Plain masked softmax attention with repeated KV heads: the readable definition every kernel is tested
    against. float32 scores; a row with no visible key is zero, with log-sum-exp ``-inf``."""
    check_call(q, k, v, mask, normalizer)
    num_heads, head_dim = q.shape[2:]
    group = num_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    k_rep = jnp.repeat(k, group, axis=1).astype(jnp.float32)
    v_rep = jnp.repeat(v, group, axis=1).astype(jnp.float32)
    scores = jnp.einsum("bqhd,bhkd->bhqk", q.astype(jnp.float32), k_rep) * scale
    visible = mask.dense(q.shape[1], k.shape[2])[:, None]  # [B or 1, 1, T, S]
    scores = jnp.where(visible, scores, _NEG_INF)
    seen = visible.any(-1, keepdims=True)
    probs = jax.nn.softmax(scores, axis=-1) * seen
    out = jnp.einsum("bhqk,bhkd->bqhd", probs, v_rep).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(seen[..., 0], jax.nn.logsumexp(scores, axis=-1), -jnp.inf)  # [B, H, T]
    return out, lse.transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """The static half of a tiled call: hashable, so it is the custom VJP's non-differentiable argument."""

    q_len: int
    kv_len: int  # keys in the buffer (the cache capacity S)
    q_block: int
    kv_block: int
    group: int


def _num_key_blocks(tiling: _Tiling) -> int:
    return -(-tiling.kv_len // tiling.kv_block)


def _block_start(tiling: _Tiling, j: jax.Array) -> jax.Array:
    """First key of key block ``j``. The last block of a buffer that is not a whole number of blocks is shifted
    back to end at the last key (no padded copy of the cache); its keys before ``j * kv_block`` belong to block
    ``j - 1`` and are masked out in block ``j``."""
    return jnp.minimum(j * tiling.kv_block, tiling.kv_len - tiling.kv_block)


def _key_block(tiling: _Tiling, x_BxKxSxD: jax.Array, j: jax.Array) -> jax.Array:
    """Key block ``j``, ``[B, K, kv_block, D]``, of a heads-first buffer: one slice inside the loop, so the cache
    is never copied out (XLA would materialise a reshaped or sliced cache, a copy per decode step)."""
    batch, heads, _, dim = x_BxKxSxD.shape
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, _block_start(tiling, j), zero)
    return jax.lax.dynamic_slice(x_BxKxSxD, start, (batch, heads, tiling.kv_block, dim))


def _add_key_block(tiling: _Tiling, acc_BxKxSxD: jax.Array, block_BxKxSxD: jax.Array, j: jax.Array) -> jax.Array:
    """``acc[:, :, block j] += block`` for a heads-first accumulator (in place inside the loop)."""
    old = _key_block(tiling, acc_BxKxSxD, j)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, _block_start(tiling, j), zero)
    return jax.lax.dynamic_update_slice(acc_BxKxSxD, old + block_BxKxSxD, start)


def _fully_visible(tiling: _Tiling, layout: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """Does every query row of tile ``i`` see every key of block ``j``? Then the tile needs no mask at all. The
    shifted last block also holds keys of its predecessor, which must be masked."""
    return (layout[i, j] == FULL) & ((j + 1) * tiling.kv_block <= tiling.kv_len)


def _block_scores(
    tiling: _Tiling, mask: Mask, q_BxKxRxD: jax.Array, k_BxKxSxD: jax.Array, i: jax.Array, j: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """float32 scores of query tile ``i`` against key block ``j``, invisible entries at -1e30; and the mask."""
    scores = jnp.einsum("bkrd,bksd->bkrs", q_BxKxRxD, k_BxKxSxD, preferred_element_type=jnp.float32)
    rows_R = jnp.tile(jnp.arange(tiling.q_block, dtype=jnp.int32), tiling.group)  # rows are (group, query)
    q_index_R = i * tiling.q_block + rows_R
    k_index_S = _block_start(tiling, j) + jnp.arange(tiling.kv_block, dtype=jnp.int32)
    # keys that belong to the previous block (the shifted last block) get an index no query can see
    k_index_S = jnp.where(k_index_S >= j * tiling.kv_block, k_index_S, jnp.iinfo(jnp.int32).max)
    visible = mask.visible(q_index_R, k_index_S, tiling.kv_len)[:, None]  # [B or 1, 1, R, S]
    return jnp.where(visible, scores, _NEG_INF), visible


def _flash_forward(
    tiling: _Tiling, q_blocks: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, layout: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Output ``[nq, B, K, R, D]`` (input dtype), float32 log-sum-exp ``[nq, B, K, R]`` (0 for rows with no key)
    and whether each row saw a key."""
    _, batch, num_kv_heads, rows, head_dim = q_blocks.shape

    def one_query_block(i: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q_BxKxRxD = q_blocks[i]
        block_ids, count = key_blocks_to_visit(layout[i])

        def update(carry: tuple[jax.Array, ...], scores: jax.Array, visible: jax.Array | None, j: jax.Array):
            max_BxKxR, sum_BxKxR, acc_BxKxRxD = carry
            new_max = jnp.maximum(max_BxKxR, scores.max(-1))
            probs = jnp.exp(scores - new_max[..., None])
            if visible is not None:  # zeroed explicitly: a row with no visible key yet has new_max = -1e30 too
                probs = jnp.where(visible, probs, 0.0)
            correction = jnp.exp(max_BxKxR - new_max)
            new_sum = sum_BxKxR * correction + probs.sum(-1)
            v_BxKxSxD = _key_block(tiling, v, j)
            pv = jnp.einsum("bkrs,bksd->bkrd", probs.astype(v.dtype), v_BxKxSxD, preferred_element_type=jnp.float32)
            return new_max, new_sum, acc_BxKxRxD * correction[..., None] + pv

        def masked_block(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            scores, visible = _block_scores(tiling, mask, q_BxKxRxD, _key_block(tiling, k, j), i, j)
            return update(carry, scores, visible, j)

        def visible_block(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            k_BxKxSxD = _key_block(tiling, k, j)
            scores = jnp.einsum("bkrd,bksd->bkrs", q_BxKxRxD, k_BxKxSxD, preferred_element_type=jnp.float32)
            return update(carry, scores, None, j)

        def one_key_block(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            # tiles wholly inside the visible region (most of a long causal prefill) skip building the mask
            j = block_ids[t]
            return jax.lax.cond(_fully_visible(tiling, layout, i, j), visible_block, masked_block, j, carry)

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
        return (acc / total[..., None]).astype(q_blocks.dtype), lse, seen

    return jax.lax.map(one_query_block, jnp.arange(q_blocks.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_attention(tiling: _Tiling, q_blocks, k, v, mask: Mask, layout) -> tuple[jax.Array, jax.Array]:
    out, lse, seen = _flash_forward(tiling, q_blocks, k, v, mask, layout)
    return out, jnp.where(seen, lse, -jnp.inf)


def _flash_attention_fwd(tiling: _Tiling, q_blocks, k, v, mask: Mask, layout):
    out, lse, seen = _flash_forward(tiling, q_blocks, k, v, mask, layout)
    return (out, jnp.where(seen, lse, -jnp.inf)), (q_blocks, k, v, mask, layout, out, lse)


def _flash_attention_bwd(tiling: _Tiling, residuals: tuple, cotangents: tuple[jax.Array, jax.Array]):
    """FlashAttention-2's backward (Dao 2023, Algorithm 2) over the same visited tiles as the forward.

    ``q_blocks`` are already scaled, so ``dS K`` here is the gradient of the scaled queries (the ``* scale`` of the
    paper's ``dQ`` comes from differentiating the scaling outside) and ``dS^T Q`` includes the scale. The
    log-sum-exp's own cotangent adds ``d_lse * P`` to ``dS`` (``d lse / d s = softmax(s)``), folded into ``D``.
    Deviation: Algorithm 2 loops over key blocks outside and query blocks inside (``dQ`` by atomic adds); here
    query blocks are outside, so the same :func:`key_blocks_to_visit` list drives both passes, ``dQ`` of a block
    stays in the inner loop's carry, and ``dK``/``dV`` for the whole buffer are a float32 carry updated in place.
    """
    q_blocks, k, v, mask, layout, out, lse = residuals
    d_out, d_lse = cotangents
    # D = rowsum(dO * O) - d_lse; rows that saw no key have lse -inf and no gradient
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse.astype(jnp.float32)

    def one_query_block(carry: tuple[jax.Array, jax.Array], i: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        q_BxKxRxD, d_out_BxKxRxD, lse_BxKxR, delta_BxKxR = q_blocks[i], d_out[i], lse[i], delta[i]
        block_ids, count = key_blocks_to_visit(layout[i])

        def one_key_block(t: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            dq_BxKxRxD, dk, dv = carry
            j = block_ids[t]
            k_BxKxSxD, v_BxKxSxD = _key_block(tiling, k, j), _key_block(tiling, v, j)
            scores, _ = _block_scores(tiling, mask, q_BxKxRxD, k_BxKxSxD, i, j)
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
            return dq_BxKxRxD, _add_key_block(tiling, dk, dk_j, j), _add_key_block(tiling, dv, dv_j, j)

        dq_init = jnp.zeros(q_BxKxRxD.shape, jnp.float32)
        dq_BxKxRxD, dk, dv = jax.lax.fori_loop(0, count, one_key_block, (dq_init, *carry))
        return (dk, dv), dq_BxKxRxD

    dkv_init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(one_query_block, dkv_init, jnp.arange(q_blocks.shape[0]))
    return dq.astype(q_blocks.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def as_arrays(mask: Mask, kv_len: int) -> Mask:
    """The mask with every array an int32 ``jax.Array`` and ``kv_length`` set (clamped to the ``kv_len`` keys): the
    form a custom call or custom VJP takes."""
    kv_length = kv_len if mask.kv_length is None else jnp.minimum(jnp.asarray(mask.kv_length, jnp.int32), kv_len)
    offsets = {name: jnp.asarray(getattr(mask, name), jnp.int32) for name in ("q_offset", "k_offset")}
    mask = dataclasses.replace(mask, kv_length=jnp.asarray(kv_length, jnp.int32), **offsets)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), mask)


def chunked_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B K S D"],
    v: Float[Array, "B K S D"],
    *,
    mask: Mask,
    scale: float | None = None,
    normalizer: str = "softmax",
    return_lse: bool = False,
    q_block: int = 256,
    kv_block: int = 256,
) -> Float[Array, "B T H D"] | tuple[Float[Array, "B T H D"], Float[Array, "B T H"]]:
    """GQA attention of ``T`` queries over ``S`` keys under ``mask``, flash-style.

    Queries are processed in tiles of ``q_block`` (``lax.map``); for each, an online softmax (Milakov & Gimelshein
    2018; Dao et al. 2022) runs over the key blocks of ``kv_block`` that the mask's block layout lists, with a
    *dynamic* trip count, so key blocks that are entirely masked — beyond the causal diagonal, beyond
    ``kv_length`` (the empty tail of a cache), between the sinks and the sliding window, of other documents, or
    empty in a block-sparse layout — cost nothing. Tiles stay small enough for the CPU's cache; a query tile of 256
    rows x 3 grouped heads against 256 keys is a 768 KiB score tile. Memory is ``O(q_block x S)`` at most; the
    backward adds float32 ``dK``/``dV`` buffers the size of ``k`` and ``v``. Differentiable w.r.t. ``q``, ``k``
    and ``v`` (and through the log-sum-exp when returned); the mask gets no gradient.
    """
    check_call(q, k, v, mask, normalizer)
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, cap = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    q_block, kv_block = min(q_block, q_len), min(kv_block, cap)
    tiling = _Tiling(q_len, cap, q_block, kv_block, group)
    num_q = -(-q_len // q_block)
    mask = as_arrays(mask, cap)
    layout = mask.block_layout(q_len, cap, q_block, kv_block)
    # queries are padded to whole tiles (padded rows are dropped); the cache is never padded or copied: key
    # blocks are sliced from it in the loop, the last one shifted back when S is not a multiple of kv_block
    q = jnp.pad(q, ((0, 0), (0, num_q * q_block - q_len), (0, 0), (0, 0)))

    # [nq, B, K, G*qb, D]: rows of a query tile ordered (group, query) so each KV head is one matmul
    q_blocks = (q * jnp.asarray(scale, q.dtype)).reshape(batch, num_q, q_block, num_kv_heads, group, head_dim)
    q_blocks = q_blocks.transpose(1, 0, 3, 4, 2, 5).reshape(num_q, batch, num_kv_heads, group * q_block, head_dim)
    out, lse = _flash_attention(tiling, q_blocks, k, v, mask, layout)
    out = out.reshape(num_q, batch, num_kv_heads, group, q_block, head_dim).transpose(1, 0, 4, 2, 3, 5)
    out = out.reshape(batch, num_q * q_block, num_heads, head_dim)[:, :q_len]
    if not return_lse:
        return out
    lse = lse.reshape(num_q, batch, num_kv_heads, group, q_block).transpose(1, 0, 4, 2, 3)
    return out, lse.reshape(batch, num_q * q_block, num_heads)[:, :q_len]
