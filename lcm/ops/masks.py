"""The Mask spec: which key each query of an attention call may see, and which tiles of the call hold any.

One :class:`Mask` describes the visibility of one attention call; the dense reference, the tiled XLA path, the CPU
kernel and every later kernel read it, and none of them hard-wires causality. Its *structure* is static and
hashable (causal or not, the sliding window, attention sinks, a block-sparse layout, which optional arrays are
present): it is the pytree's treedef, so a jitted function retraces only when it changes. Its *arrays* are pytree
leaves that may change at run time without recompiling: query and key offsets, the filled length of a cache,
segment ids, left padding, a prefix length.

Query ``t`` of a call sits in slot ``q = q_offset + t``, key ``j`` in slot ``k = k_offset + j``; the key is visible iff

    j < kv_length                                        (inside the filled part of the buffer)
    and ( causal(q - k) and (in_window(q - k) or k < sinks)  or  k < prefix )
    and q_segments[b, t] == k_segments[b, j]             (documents: packed sequences)
    and (q >= kv_start[b]) == (k >= kv_start[b])         (left padding: padding and prompt as two documents)
    and layout[t // q_block][j // kv_block]              (block-sparse)
    and low <= p_q // c - p_k // c <= high               (a band of position distances)

where ``causal(d)`` is ``d >= 0`` for a causal mask and true for a bidirectional one, and ``in_window(d)`` is
``d < window`` (causal) or ``|d| < window`` (bidirectional): Mistral's sliding window, with the first ``sinks``
slots kept by every query, StreamingLLM's attention sinks (Xiao et al. 2024, §3.2). A prefix-LM mask (``prefix``,
per batch row or one for all) makes the first ``prefix`` slots visible to every query, as T5's and PaliGemma's
prefix does. Cross attention is a bidirectional mask whose query and key counts differ. A query that sees no key
gets a zero output (padding rows).

A *band* (:func:`band`) keeps the pairs whose distance in chunks of ``c`` positions, ``p_q // c - p_k // c``, lies in
``[low, high]``; ``p`` are the RoPE positions of the queries and keys (``q_positions [B, T]``, ``k_positions [B, S]``)
where given, else their slots. Complementary bands split one attention into parts that a training-free extrapolation
scheme rotates differently (:mod:`lcm.ops.position_schemes`): SelfExtend's and ReRoPE's "distance < w" and ">= w",
Dual Chunk Attention's same chunk, previous chunk and earlier chunks. Positions, not slots, because a KV policy may
have compacted the cache (slot distances are then not position distances).

Masks combine with ``&`` (the conjunction of their visibilities), each constructor naming one kind::

    causal() & sliding_window(4096, sinks=4) & offsets(q_offset=start, kv_length=start + chunk)
    causal() & documents(q_segments, k_segments)          # packed training rows
    bidirectional() & block_sparse(layout, 64, 64)

Two operands that both set the same field must agree (two windows, two sets of offsets are an error, not a
silent choice). :meth:`Mask.block_layout` classifies each (query tile, key tile) pair of a call as empty, partial
or full from interval bounds per tile, never materialising ``T x S``: kernels visit only the non-empty tiles and
skip building the mask in the full ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

EMPTY, PARTIAL, FULL = 0, 1, 2  # the values of a block layout
_FAR = 2**30  # an unreachable distance, for the open ends of the distance conditions

_STATIC = ("causal", "window", "sinks", "sparse", "band")
_ARRAYS = (
    "q_offset",
    "k_offset",
    "kv_length",
    "q_segments",
    "k_segments",
    "kv_start",
    "prefix",
    "q_positions",
    "k_positions",
)


@dataclasses.dataclass(frozen=True)
class BlockSparse:
    """A static block-sparse layout: ``layout[r][c]`` says whether query block ``r`` (``q_block`` queries of the
    call, by index) may see key block ``c`` (``kv_block`` keys). Hashable: part of the mask's structure."""

    layout: tuple[tuple[bool, ...], ...]
    q_block: int
    kv_block: int

    def __post_init__(self) -> None:
        rows = tuple(tuple(bool(x) for x in row) for row in self.layout)
        if not rows or not rows[0] or len({len(r) for r in rows}) != 1:
            raise ValueError(f"a block-sparse layout must be a non-empty rectangle of booleans, got {self.layout!r}")
        if self.q_block < 1 or self.kv_block < 1:
            raise ValueError(f"block-sparse blocks must be >= 1, got q_block={self.q_block} kv_block={self.kv_block}")
        object.__setattr__(self, "layout", rows)

    def array(self) -> np.ndarray:
        return np.asarray(self.layout, bool)


@dataclasses.dataclass(frozen=True)
class Band:
    """A static band of distances: a query at position ``p_q`` sees a key at ``p_k`` iff
    ``low <= p_q // chunk - p_k // chunk <= high`` (``high=None``: no upper end). Hashable: part of the structure."""

    low: int
    high: int | None = None
    chunk: int = 1

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int | np.integer) for v in (self.low, self.chunk))
        if not ints or (self.high is not None and not isinstance(self.high, int | np.integer)):
            raise ValueError(f"a band's low, high and chunk must be integers, got {self}")
        if self.chunk < 1:
            raise ValueError(f"a band's chunk must be >= 1, got {self.chunk}")
        if self.high is not None and self.high < self.low:
            raise ValueError(f"a band's high={self.high} is below its low={self.low}: it would see nothing")

    def holds(self, distance: jax.Array) -> jax.Array:
        inside = distance >= self.low
        return inside if self.high is None else inside & (distance <= self.high)


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True, eq=False)
class Mask:
    """The visibility of one attention call (the module docstring's rule). Build it with the constructors below
    and ``&``; every field has the value that restricts nothing, so ``Mask()`` sees every key."""

    causal: bool = False  # static: key slot <= query slot
    window: int | None = None  # static: sliding window in slots (q - k < window; |q - k| if bidirectional)
    sinks: int = 0  # static: the first slots every query keeps outside its window (needs a window)
    sparse: BlockSparse | None = None  # static: a block-sparse layout over query and key indices
    q_offset: Int[Array, ""] | int = 0  # slot of the call's first query
    k_offset: Int[Array, ""] | int = 0  # slot of the call's first key (a ring step's shard, a cache window)
    kv_length: Int[Array, ""] | int | None = None  # keys [0, kv_length) of the call are filled; None: all
    q_segments: Int[Array, "B T"] | None = None  # document id of each query
    k_segments: Int[Array, "B S"] | None = None  # document id of each key
    kv_start: Int[Array, " B"] | None = None  # left padding: row b's prompt starts at slot kv_start[b]
    prefix: Int[Array, "*B"] | int | None = None  # prefix-LM: slots below it are visible to every query
    band: Band | None = None  # static: a band of (chunked) position distances
    q_positions: Int[Array, "B T"] | None = None  # the band's query positions (default: the slots)
    k_positions: Int[Array, "B S"] | None = None  # the band's key positions (default: the slots)

    def __post_init__(self) -> None:
        # only the static half is checked here: JAX rebuilds masks with tracers or placeholders as leaves
        if self.window is not None and (not isinstance(self.window, int | np.integer) or self.window < 1):
            raise ValueError(f"window={self.window!r} must be a positive number of slots (or None for no window)")
        if not isinstance(self.sinks, int | np.integer) or self.sinks < 0:
            raise ValueError(f"sinks={self.sinks!r} must be >= 0")
        if self.sinks and self.window is None:
            raise ValueError(f"sinks={self.sinks} are the slots kept outside a sliding window; give a window too")

    @property
    def structure(self) -> tuple:
        """The static half, hashable: what a compiled program depends on (with which arrays are present)."""
        present = tuple(name for name in _ARRAYS if getattr(self, name) is not None)
        return (self.causal, self.window, self.sinks, self.sparse, self.band, present)

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        default = Mask()
        merged: dict[str, Any] = {"causal": self.causal or other.causal}
        for name in ("window", "sinks", "sparse", "band", *_ARRAYS):
            mine, theirs, unset = getattr(self, name), getattr(other, name), getattr(default, name)
            if _unset(mine, unset):
                merged[name] = theirs
            elif _unset(theirs, unset) or mine is theirs:
                merged[name] = mine
            else:
                raise ValueError(
                    f"both masks set {name} ({_show(mine)} and {_show(theirs)}); combine masks that set it once"
                )
        return Mask(**merged)

    # -- checks ---------------------------------------------------------------------------------------------------

    def check(self, batch: int, q_len: int, kv_len: int) -> None:
        """One-line ``ValueError`` for arrays of the wrong shape or dtype, and for masks no query can use."""
        for name in ("q_offset", "k_offset", "kv_length"):
            value = getattr(self, name)
            if value is None:
                continue
            if np.ndim(value) != 0 or not jnp.issubdtype(jnp.asarray(value).dtype, jnp.integer):
                raise ValueError(f"{name} must be an integer scalar, got {_show(value)}")
            if _is_concrete(value) and int(value) < 0:
                raise ValueError(f"{name}={int(value)} must be >= 0")
        if (self.q_segments is None) != (self.k_segments is None):
            given, missing = ("q_segments", "k_segments") if self.k_segments is None else ("k_segments", "q_segments")
            raise ValueError(f"{given} was given without {missing}; pass both document masks or neither")
        if self.q_segments is not None and self.kv_start is not None:
            raise ValueError("pass kv_start (left padding) or q_segments/k_segments (document masks), not both")
        for name, axes, shape in (("q_segments", "(B, T)", (batch, q_len)), ("k_segments", "(B, S)", (batch, kv_len))):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {axes} = {shape}")
        if self.kv_start is not None:
            start = self.kv_start
            if tuple(start.shape) != (batch,) or not jnp.issubdtype(start.dtype, jnp.integer):
                raise ValueError(f"kv_start must be integer [B] = [{batch}], got {start.dtype}{list(start.shape)}")
        if self.prefix is not None:
            shape = tuple(np.shape(self.prefix))
            if shape not in ((), (batch,)) or not jnp.issubdtype(jnp.asarray(self.prefix).dtype, jnp.integer):
                raise ValueError(f"prefix must be an integer scalar or [B] = [{batch}], got {_show(self.prefix)}")
            if self.window is not None and not self.causal:
                raise ValueError(
                    "a bidirectional prefix-LM mask with a sliding window is not defined; use one or the other "
                    "(causal: the prefix slots are kept by every query, the rest within the window)"
                )
        if (self.q_positions is None) != (self.k_positions is None):
            given, missing = (
                ("q_positions", "k_positions") if self.k_positions is None else ("k_positions", "q_positions")
            )
            raise ValueError(f"{given} was given without {missing}; pass both position arrays or neither")
        if self.q_positions is not None and self.band is None:
            raise ValueError("q_positions/k_positions are the positions of a band; give the band too")
        for name, axes, shape in (
            ("q_positions", "(B, T)", (batch, q_len)),
            ("k_positions", "(B, S)", (batch, kv_len)),
        ):
            value = getattr(self, name)
            if value is not None and (tuple(value.shape) != shape or not jnp.issubdtype(value.dtype, jnp.integer)):
                raise ValueError(f"{name} must be integer {axes} = {shape}, got {value.dtype}{list(value.shape)}")
        if self.sparse is not None:
            rows, cols = self.sparse.array().shape
            need = (-(-q_len // self.sparse.q_block), -(-kv_len // self.sparse.kv_block))
            if rows < need[0] or cols < need[1]:
                raise ValueError(
                    f"the block-sparse layout has {rows}x{cols} blocks; {q_len} queries x {kv_len} keys in blocks of "
                    f"{self.sparse.q_block}x{self.sparse.kv_block} need {need[0]}x{need[1]}"
                )
        if self.causal and _is_concrete(self.q_offset) and _is_concrete(self.k_offset) and self.prefix is None:
            last_query = int(self.q_offset) + q_len - 1
            if last_query < int(self.k_offset):
                raise ValueError(
                    f"a causal mask with queries at slots {int(self.q_offset)}..{last_query} sees none of the keys at "
                    f"slots {int(self.k_offset)}..; check q_offset and k_offset (or use a bidirectional mask)"
                )

    # -- the rule -------------------------------------------------------------------------------------------------

    def visible(self, q_index: Int[Array, " T"], k_index: Int[Array, " S"], kv_len: int) -> Bool[Array, "b T S"]:
        """May query ``q_index[t]`` of the call see key ``k_index[s]``: ``[B or 1, T, S]``.

        Indices are the call's (0 = its first query or key); ``kv_len`` is the number of keys of the call, and an
        index at or past it (a tile's padding) is never visible."""
        q = jnp.asarray(self.q_offset, jnp.int32) + q_index[:, None]
        k = jnp.asarray(self.k_offset, jnp.int32) + k_index[None, :]
        limit = kv_len if self.kv_length is None else jnp.minimum(jnp.asarray(self.kv_length, jnp.int32), kv_len)
        mask = (k_index < limit)[None, :]
        distance = q - k
        near = distance >= 0 if self.causal else jnp.ones_like(distance, bool)
        if self.window is not None:
            in_window = distance < self.window if self.causal else jnp.abs(distance) < self.window
            near &= (in_window | (k < self.sinks)) if self.sinks else in_window
        mask = mask[None]  # [1, T, S]: batch-dependent terms broadcast it to [B, T, S]
        if self.prefix is not None:
            prefix = jnp.asarray(self.prefix, jnp.int32).reshape(-1, 1, 1)
            mask = mask & (near[None] | (k[None] < prefix))
        else:
            mask = mask & near[None]
        if self.q_segments is not None and self.k_segments is not None:
            q_seg = jnp.take(self.q_segments, q_index, axis=1, mode="clip")
            k_seg = jnp.take(self.k_segments, k_index, axis=1, mode="clip")
            mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
        if self.kv_start is not None:
            start = self.kv_start.astype(jnp.int32)[:, None, None]
            mask = mask & ((q[None] >= start) == (k[None] >= start))
        if self.sparse is not None:
            layout = jnp.asarray(self.sparse.array())
            rows = jnp.minimum(q_index // self.sparse.q_block, layout.shape[0] - 1)
            cols = jnp.minimum(k_index // self.sparse.kv_block, layout.shape[1] - 1)
            mask = mask & layout[rows[:, None], cols[None, :]][None]
        if self.band is not None:
            if self.q_positions is not None and self.k_positions is not None:
                q_pos = jnp.take(self.q_positions, q_index, axis=1, mode="clip")[:, :, None].astype(jnp.int32)
                k_pos = jnp.take(self.k_positions, k_index, axis=1, mode="clip")[:, None, :].astype(jnp.int32)
            else:
                q_pos, k_pos = q[None], k[None]
            chunk = self.band.chunk
            mask = mask & self.band.holds(q_pos // chunk - k_pos // chunk)
        return mask

    def dense(self, q_len: int, kv_len: int) -> Bool[Array, "b T S"]:
        """The whole ``[B or 1, T, S]`` mask (references and tests; kernels use :meth:`block_layout`)."""
        return self.visible(jnp.arange(q_len, dtype=jnp.int32), jnp.arange(kv_len, dtype=jnp.int32), kv_len)

    def block_layout(self, q_len: int, kv_len: int, q_block: int, kv_block: int) -> Int[Array, "nq nk"]:
        """``EMPTY``, ``PARTIAL`` or ``FULL`` for each (query tile, key tile) pair of a call, over every batch row.

        Tiles are ``[i * q_block, (i + 1) * q_block)`` queries by ``[j * kv_block, (j + 1) * kv_block)`` keys, the
        last of each cut at ``q_len`` / ``kv_len``. Computed from per-tile bounds: the slot distances ``q - k`` of
        a tile form one interval of integers, so the causal, window, sink and prefix terms are classified exactly;
        documents are compared by the range of ids in each tile, and a block-sparse layout by the blocks a tile
        overlaps. A tile is listed ``EMPTY`` only if it holds no visible entry (its skip is safe), and ``FULL`` only
        if every entry is visible (its mask may be skipped); a term combination classified conservatively
        (documents whose id ranges overlap without a common id) costs a visited tile, never a wrong result.
        """
        num_q, num_k = -(-q_len // q_block), -(-kv_len // kv_block)
        t0 = jnp.arange(num_q, dtype=jnp.int32) * q_block
        t1 = jnp.minimum(t0 + q_block, q_len) - 1
        j0 = jnp.arange(num_k, dtype=jnp.int32) * kv_block
        j1 = jnp.minimum(j0 + kv_block, kv_len) - 1
        limit = kv_len if self.kv_length is None else jnp.minimum(jnp.asarray(self.kv_length, jnp.int32), kv_len)
        j1_filled = jnp.minimum(j1, limit - 1)
        q_offset = jnp.asarray(self.q_offset, jnp.int32)
        k_offset = jnp.asarray(self.k_offset, jnp.int32)
        # [1 or B, nq, nk] bounds: query slots [qa, qb], filled key slots [ka, kb]
        qa, qb = (q_offset + t0)[None, :, None], (q_offset + t1)[None, :, None]
        ka, kb = (k_offset + j0)[None, None, :], (k_offset + j1_filled)[None, None, :]
        has_keys = (j1_filled >= j0)[None, None, :]
        all_filled = (j1_filled == j1)[None, None, :]

        low = 0 if self.causal else -_FAR
        high = _FAR if self.window is None else self.window - 1
        if self.window is not None and not self.causal:
            low = -(self.window - 1)
        any_visible, all_visible = _distance_part(qa, qb, ka, kb, low, high)
        if self.window is not None and self.sinks:
            # sinks: the keys below `sinks` need only causality; the rest the window too
            sink_any, sink_all = _distance_part(qa, qb, ka, jnp.minimum(kb, self.sinks - 1), low, _FAR)
            rest_any, rest_all = _distance_part(qa, qb, jnp.maximum(ka, self.sinks), kb, low, high)
            sink_keys, rest_keys = ka <= jnp.minimum(kb, self.sinks - 1), jnp.maximum(ka, self.sinks) <= kb
            any_visible = (sink_keys & sink_any) | (rest_keys & rest_any)
            all_visible = (~sink_keys | sink_all) & (~rest_keys | rest_all)
        if self.prefix is not None:
            prefix = jnp.asarray(self.prefix, jnp.int32).reshape(-1, 1, 1)
            in_prefix, past_prefix = ka <= jnp.minimum(kb, prefix - 1), jnp.maximum(ka, prefix) <= kb
            rest_any, rest_all = _distance_part(qa, qb, jnp.maximum(ka, prefix), kb, low, high)
            any_visible = in_prefix | (past_prefix & rest_any)
            all_visible = ~past_prefix | rest_all
        any_visible &= has_keys
        all_visible &= has_keys & all_filled

        segments = self._segment_ranges(t0, t1, j0, j1, q_offset, k_offset, q_len, kv_len, q_block, kv_block)
        if segments is not None:
            (q_min, q_max), (k_min, k_max) = segments  # [B, nq, 1] and [B, 1, nk]
            any_visible &= (q_min <= k_max) & (k_min <= q_max)
            all_visible &= (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        if self.band is not None:
            if self.q_positions is not None and self.k_positions is not None:
                q_lo, q_hi = _tile_range(self.q_positions.astype(jnp.int32), q_len, q_block, axis=1)
                k_lo, k_hi = _tile_range(self.k_positions.astype(jnp.int32), kv_len, kv_block, axis=2)
            else:
                q_lo, q_hi, k_lo, k_hi = qa, qb, ka, kb
            chunk, high = self.band.chunk, _FAR if self.band.high is None else self.band.high
            # chunk indices are monotone in positions: a tile's range of them is its ends' (its distances a
            # superset of the attained ones where positions are not contiguous, which only costs a visited tile)
            band_any, band_all = _distance_part(
                q_lo // chunk, q_hi // chunk, k_lo // chunk, k_hi // chunk, self.band.low, high
            )
            any_visible &= band_any
            all_visible &= band_all
        if self.sparse is not None:
            sparse_any, sparse_all = _sparse_tiles(self.sparse, q_len, kv_len, q_block, kv_block)
            any_visible &= jnp.asarray(sparse_any)[None]
            all_visible &= jnp.asarray(sparse_all)[None]
        layout = jnp.where(all_visible.all(0), FULL, jnp.where(any_visible.any(0), PARTIAL, EMPTY))
        return layout.astype(jnp.int8)

    def _segment_ranges(self, t0, t1, j0, j1, q_offset, k_offset, q_len, kv_len, q_block, kv_block):
        """Per tile and batch row, the smallest and largest document id of its queries and of its keys."""
        if self.kv_start is not None:  # left padding: document (slot >= kv_start) of each end of the tile
            start = self.kv_start.astype(jnp.int32)[:, None, None]
            q_ids = (q_offset + t0[None, :, None] >= start, q_offset + t1[None, :, None] >= start)
            k_ids = (k_offset + j0[None, None, :] >= start, k_offset + j1[None, None, :] >= start)
            return tuple(tuple(x.astype(jnp.int32) for x in ids) for ids in (q_ids, k_ids))
        if self.q_segments is None or self.k_segments is None:
            return None
        return (
            _tile_range(self.q_segments, q_len, q_block, axis=1),
            _tile_range(self.k_segments, kv_len, kv_block, axis=2),
        )


def _distance_part(qa, qb, ka, kb, low, high):
    """Over queries ``[qa, qb]`` and keys ``[ka, kb]``: does some / every pair have ``low <= q - k <= high``?
    The distances fill the interval ``[qa - kb, qb - ka]``, every integer of it attained."""
    some = jnp.maximum(qa - kb, low) <= jnp.minimum(qb - ka, high)
    every = (qa - kb >= low) & (qb - ka <= high)
    return some, every


def _tile_range(ids: jax.Array, length: int, block: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """Min and max id per tile of ``block`` along the last axis of ``ids [B, length]``, placed on ``axis``."""
    num = -(-length // block)
    padded = jnp.pad(ids, ((0, 0), (0, num * block - length)), mode="edge").reshape(ids.shape[0], num, block)
    lo, hi = padded.min(-1), padded.max(-1)
    return (lo[:, :, None], hi[:, :, None]) if axis == 1 else (lo[:, None, :], hi[:, None, :])


def _sparse_tiles(sparse: BlockSparse, q_len: int, kv_len: int, q_block: int, kv_block: int):
    """Any and all of the block-sparse layout over each (query tile, key tile) pair; numpy, at trace time."""
    layout = sparse.array()
    num_q, num_k = -(-q_len // q_block), -(-kv_len // kv_block)
    some, every = np.zeros((num_q, num_k), bool), np.zeros((num_q, num_k), bool)
    for i in range(num_q):
        rows = slice(i * q_block // sparse.q_block, (min((i + 1) * q_block, q_len) - 1) // sparse.q_block + 1)
        for j in range(num_k):
            cols = slice(j * kv_block // sparse.kv_block, (min((j + 1) * kv_block, kv_len) - 1) // sparse.kv_block + 1)
            some[i, j], every[i, j] = layout[rows, cols].any(), layout[rows, cols].all()
    return some, every


def key_blocks_to_visit(layout_row: Int[Array, " nk"]) -> tuple[Int[Array, " nk"], Int[Array, ""]]:
    """The non-empty key tiles of one query tile: ``block_ids[:count]``, ascending, each once.

    Mapping a ``fori_loop`` counter through ``block_ids`` walks exactly the listed tiles with a dynamic trip
    count, wherever they lie (sinks and a window, documents); the forward and backward of the tiled XLA path
    share it."""
    visit = layout_row != EMPTY
    # a stable sort on "not visited" puts the visited blocks first, in ascending order
    return jnp.argsort(~visit, stable=True).astype(jnp.int32), visit.sum(dtype=jnp.int32)


def _unset(value: Any, default: Any) -> bool:
    return value is None if default is None else (not isinstance(value, jax.Array) and value is default)


def _show(value: Any) -> str:
    if hasattr(value, "shape") and np.ndim(value):
        return f"{getattr(value, 'dtype', '')}{list(value.shape)}"
    return repr(value) if not isinstance(value, jax.core.Tracer) else "a traced value"


def _flatten(mask: Mask) -> tuple[tuple[tuple[jax.tree_util.GetAttrKey, Any], ...], tuple]:
    """Leaves: the arrays that are set. An unset one (its restricting-nothing default, 0 or None) stays in the
    structure, so a mask passed through ``jax.jit`` keeps its unset offsets unset and can be combined again."""
    default = Mask()
    present = tuple(name for name in _ARRAYS if not _unset(getattr(mask, name), getattr(default, name)))
    children = tuple((jax.tree_util.GetAttrKey(name), getattr(mask, name)) for name in present)
    return children, (*(getattr(mask, name) for name in _STATIC), present)


def _unflatten(aux: tuple, children: Any) -> Mask:
    *static, present = aux
    mask = object.__new__(Mask)  # JAX rebuilds masks with placeholders as leaves: no validation here
    for name, value in zip(_STATIC, static, strict=True):
        object.__setattr__(mask, name, value)
    default = Mask()
    for name in _ARRAYS:
        object.__setattr__(mask, name, getattr(default, name))
    for name, value in zip(present, children, strict=True):
        object.__setattr__(mask, name, value)
    return mask


jax.tree_util.register_pytree_with_keys(Mask, _flatten, _unflatten)


# -- constructors: one kind each, combined with & --------------------------------------------------------------------


def causal() -> Mask:
    """Each query sees the keys at its own slot and before."""
    return Mask(causal=True)


def bidirectional() -> Mask:
    """Every query sees every key (an encoder; cross attention when query and key counts differ)."""
    return Mask()


def sliding_window(window: int, sinks: int = 0) -> Mask:
    """Keys within ``window`` slots (``q - k < window`` under a causal mask), plus the first ``sinks`` slots."""
    return Mask(window=window, sinks=sinks)


def offsets(
    q_offset: Int[Array, ""] | int = 0,
    kv_length: Int[Array, ""] | int | None = None,
    k_offset: Int[Array, ""] | int = 0,
) -> Mask:
    """Where the call's queries and keys sit: queries from slot ``q_offset``, keys from ``k_offset``, the first
    ``kv_length`` keys filled (a cache's empty tail is never seen)."""
    return Mask(q_offset=q_offset, k_offset=k_offset, kv_length=kv_length)


def documents(q_segments: Int[Array, "B T"], k_segments: Int[Array, "B S"]) -> Mask:
    """Queries see only keys of their own document (packed sequences: segment ids per row)."""
    return Mask(q_segments=q_segments, k_segments=k_segments)


def left_padding(kv_start: Int[Array, " B"]) -> Mask:
    """Right-aligned prompts: row ``b``'s prompt starts at slot ``kv_start[b]``; padding and prompt never mix."""
    return Mask(kv_start=kv_start)


def prefix_lm(prefix: Int[Array, "*B"] | int) -> Mask:
    """The first ``prefix`` slots (per row, or one for all) are visible to every query, in both directions."""
    return Mask(prefix=prefix)


def band(
    low: int,
    high: int | None = None,
    *,
    chunk: int = 1,
    q_positions: Int[Array, "B T"] | None = None,
    k_positions: Int[Array, "B S"] | None = None,
) -> Mask:
    """Pairs whose distance in chunks, ``p_q // chunk - p_k // chunk``, lies in ``[low, high]`` (``high=None``: no
    end); positions are ``q_positions``/``k_positions`` where given (a compacted cache), else the slots.
    ``band(0, w - 1)`` and ``band(w)`` split a causal mask at distance ``w``."""
    return Mask(band=Band(low, high, chunk), q_positions=q_positions, k_positions=k_positions)


def block_sparse(layout: Any, q_block: int, kv_block: int) -> Mask:
    """A static block-sparse layout (a nested sequence or numpy array of booleans over query x key blocks)."""
    return Mask(sparse=BlockSparse(tuple(tuple(bool(x) for x in row) for row in np.asarray(layout)), q_block, kv_block))
