"""Attention visibility: which key slot each query slot may see, and which key blocks a query block must visit.

One description read by the plain reference, the chunked XLA path (``lcm.ops.attention``) and, later, every
kernel. Query ``t`` of a call sits in slot ``q = q_offset + t`` and may see key slot ``j`` iff

    j <= q  and  j < kv_length  and  (window is None or q - j < window or j < sinks)  and  q_seg[t] == k_seg[j]

— causal; inside the filled part of the cache; inside a sliding window ``w`` (Mistral) unless ``j`` is one of the
first ``sinks`` slots, the "attention sinks" every query keeps in StreamingLLM (Xiao et al. 2024, §3.2); and, with
document masks (packed sequences; ``q_segments``/``k_segments``, per batch row), in the same document.

Left padding (a batch of prompts of different lengths, right-aligned) is the document mask of two documents per
row: the slots below ``kv_start[b]`` (padding) and the rest (the prompt). :func:`left_padding_segments` builds
it; the CPU kernel takes ``kv_start`` itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


def check_segments(
    q_segments: jax.Array | None, k_segments: jax.Array | None, q_len: int, kv_len: int, batch: int | None = None
) -> None:
    """Document masks come as a pair: ``q_segments`` ``[B, T]`` and ``k_segments`` ``[B, S]``, or neither."""
    if (q_segments is None) != (k_segments is None):
        given, missing = ("q_segments", "k_segments") if k_segments is None else ("k_segments", "q_segments")
        raise ValueError(f"{given} was given without {missing}; pass both document masks or neither")
    if q_segments is None or k_segments is None:
        return
    batch = q_segments.shape[0] if batch is None else batch
    if q_segments.shape != (batch, q_len):
        raise ValueError(f"q_segments has shape {q_segments.shape}; expected (B, T) = {(batch, q_len)}")
    if k_segments.shape != (batch, kv_len):
        raise ValueError(f"k_segments has shape {k_segments.shape}; expected (B, S) = {(batch, kv_len)}")


def check_kv_start(kv_start: jax.Array, batch: int | None = None) -> None:
    """Left padding comes as one integer first-prompt slot per batch row: ``kv_start`` ``[B]``."""
    expected = "[B]" if batch is None else f"[B] = [{batch}]"
    shape_ok = kv_start.ndim == 1 if batch is None else kv_start.shape == (batch,)
    if not shape_ok or not jnp.issubdtype(kv_start.dtype, jnp.integer):
        raise ValueError(f"kv_start must be integer {expected}, got {kv_start.dtype}{list(kv_start.shape)}")


def left_padding_segments(
    kv_start: Int[Array, " B"], q_offset: Int[Array, ""] | int, q_len: int, kv_len: int
) -> tuple[Int[Array, "B T"], Int[Array, "B S"]]:
    """``(q_segments, k_segments)`` of left-padded rows: slot ``j`` of row ``b`` is in document 1 if
    ``j >= kv_start[b]`` (the prompt) and 0 otherwise (padding); queries sit in slots ``q_offset…``."""
    check_kv_start(kv_start)
    q_slots = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)
    k_slots = jnp.arange(kv_len, dtype=jnp.int32)
    start = kv_start.astype(jnp.int32)[:, None]
    return (q_slots[None] >= start).astype(jnp.int32), (k_slots[None] >= start).astype(jnp.int32)


def padding_as_segments(
    kv_start: jax.Array | None,
    q_segments: jax.Array | None,
    k_segments: jax.Array | None,
    q_offset: Int[Array, ""] | int,
    q_len: int,
    kv_len: int,
) -> tuple[jax.Array | None, jax.Array | None]:
    """The document masks an attention call applies: its own, or those of its left padding (not both)."""
    if kv_start is None:
        return q_segments, k_segments
    if q_segments is not None or k_segments is not None:
        raise ValueError("pass kv_start (left padding) or q_segments/k_segments (document masks), not both")
    return left_padding_segments(kv_start, q_offset, q_len, kv_len)


def visibility_mask(
    q_slots: Int[Array, " T"],
    k_slots: Int[Array, " S"],
    kv_length: Int[Array, ""] | int,
    window: int | None,
    *,
    sinks: int = 0,
    q_segments: Int[Array, "B T"] | None = None,
    k_segments: Int[Array, "B S"] | None = None,
) -> Bool[Array, "T S"] | Bool[Array, "B T S"]:
    """May the query in slot ``q_slots[t]`` attend to key slot ``k_slots[s]`` (the module docstring's rule).

    ``[T, S]``; ``[B, T, S]`` with document masks, which differ per batch row.
    """
    q = q_slots[:, None]
    k = k_slots[None, :]
    mask = (k <= q) & (k < kv_length)
    if window is not None:
        in_window = q - k < window
        mask &= (in_window | (k < sinks)) if sinks else in_window
    check_segments(q_segments, k_segments, q_slots.shape[0], k_slots.shape[0])
    if q_segments is None or k_segments is None:
        return mask
    return mask[None] & (q_segments[:, :, None] == k_segments[:, None, :])


def key_blocks_to_visit(
    query_block: Int[Array, ""] | int,
    *,
    q_offset: Int[Array, ""] | int,
    q_len: int,
    kv_length: Int[Array, ""] | int,
    q_block: int,
    kv_block: int,
    num_key_blocks: int,
    window: int | None = None,
    sinks: int = 0,
    q_segment_min: Int[Array, ""] | None = None,
    k_segment_max: Int[Array, " N"] | None = None,
) -> tuple[Int[Array, " N"], Int[Array, ""]]:
    """The key blocks query block ``query_block`` must visit: ``block_ids[:count]``, ascending, each once.

    The query block holds the real queries ``t in [query_block * q_block, min(+ q_block, q_len))``, slots
    ``[first, end)``. Over those queries the visible keys are ``[0, min(sinks, end, kv_length))`` (the sinks, with
    a window) and ``[max(first - window + 1, 0), min(end, kv_length))`` (causal, filled, in the window; contiguous
    for ``window >= 1``): two ranges whose union is listed exactly — every listed block holds a visible entry, every
    block holding one is listed.
    With document masks, ``q_segment_min`` is the smallest segment id of the block's queries (over the batch) and
    ``k_segment_max[n]`` the largest id in key block ``n``; a key block whose largest id is below the query block's
    smallest matches none of its queries, whatever the order of the segments, and is dropped. For sorted (packed)
    documents that drops every block before the query block's first document.

    Mapping the loop counter through ``block_ids`` walks both ranges in one ``fori_loop`` with a dynamic trip count
    ``count``, no block twice and none in between; a list rather than arithmetic on the two ranges, so the blocks
    that documents rule out are dropped wherever they lie, not only as a prefix. The forward and the backward of
    :func:`chunked_attention` share it.
    """
    first = q_offset + query_block * q_block
    end = q_offset + jnp.minimum((query_block + 1) * q_block, q_len)
    hi = jnp.minimum(end, kv_length)
    lo = 0 if window is None else jnp.maximum(first - window + 1, 0)
    block_start = jnp.arange(num_key_blocks, dtype=jnp.int32) * kv_block
    visit = (lo < hi) & (block_start < hi) & (block_start + kv_block > lo)
    if window is not None and sinks:
        visit |= block_start < jnp.minimum(sinks, hi)
    if q_segment_min is not None and k_segment_max is not None:
        visit &= k_segment_max >= q_segment_min
    # a stable sort on "not visited" puts the visited blocks first, in ascending order
    block_ids = jnp.argsort(~visit, stable=True).astype(jnp.int32)
    return block_ids, visit.sum(dtype=jnp.int32)
