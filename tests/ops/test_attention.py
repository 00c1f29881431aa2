"""Tests for lcm.ops.attention.

``reference_attention`` against a float64 numpy loop written from the module docstring's visibility rule
(query slot ``q = q_offset + t`` sees key slot ``j`` iff ``j <= q``, ``j < kv_length``, with a window ``w``
``q - j < w`` or ``j < sinks``, and with document masks ``q_segments[b, t] == k_segments[b, j]``; query head ``h``
reads KV head ``h // (H / K)``); then ``chunked_attention`` against ``reference_attention`` over a seeded grid
(GQA groups 1/2/3, ragged T and S, q_offset > 0, an empty cache tail, sliding windows, attention sinks, packed
and shuffled documents, decode, tiny blocks), jitted and eager, float32 and bfloat16: outputs, and gradients
w.r.t. q, k, v of a random linear functional (the custom VJP). ``key_blocks_to_visit`` against the key blocks
that hold a visible entry of the dense numpy mask. Hypothesis searches the same space.
"""

import functools
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.ops import masks
from lcm.ops.attention import chunked_attention, reference_attention
from lcm.ops.masks import key_blocks_to_visit

# float32: the online softmax rescales partial sums by exp(m_old - m_new) and divides once at the end, the
# reference normalises directly; both accumulate in float32, so outputs (weighted means of N(0, 1) values, |x| < 4)
# agree to a few ulp. Measured worst case on this grid is ~5e-7; 1e-5 leaves ~20x headroom.
F32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# bfloat16 (8 significant bits): the chunked path rounds q * scale and the probabilities to bfloat16 before its
# matmuls (relative error 2^-9 each) and rounds the output to bfloat16 (2^-9 more, 1 ulp = 2^-7 for |x| in
# [1, 2)). Against a float32 reference on the same bfloat16 inputs that is a few bfloat16 ulp at |x| < 4:
# atol 3e-2 (~4 ulp at 1) plus rtol 2^-6.
BF16_TOL = {"atol": 3e-2, "rtol": 1.6e-2}


def _mask(
    q_offset: Any,
    kv_length: Any,
    window: int | None = None,
    sinks: int = 0,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
) -> masks.Mask:
    """The causal mask these tests describe by (offset, filled length, window, sinks, documents); sinks without a
    window change nothing (the case tables keep such a case to check that)."""
    mask = masks.causal() & masks.offsets(q_offset=q_offset, kv_length=kv_length)
    if window is not None:
        mask &= masks.sliding_window(window, sinks)
    if q_segments is not None:
        mask &= masks.documents(q_segments, k_segments)
    return mask


def _visibility(first_slot: int, q_len: int, kv_len: int, kv_length: int, window: int | None, **kwargs: Any):
    """The dense mask of queries at slots ``first_slot…`` over ``kv_len`` keys: ``[T, S]``, ``[B, T, S]`` with
    documents."""
    dense = _mask(first_slot, kv_length, window, **kwargs).dense(q_len, kv_len)
    return dense if "q_segments" in kwargs else dense[0]


def _attend(fn: Any, q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any) -> jax.Array:
    """``fn`` (reference or chunked) on keys and values given as ``[B, S, K, D]``, the layout the cases are drawn in."""
    mask_args = {name: kwargs.pop(name) for name in list(kwargs) if name in _MASK_ARGS}
    return fn(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=_mask(**mask_args), **kwargs)


_MASK_ARGS = ("q_offset", "kv_length", "window", "sinks", "q_segments", "k_segments")


def _numpy_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    q_offset: int,
    kv_length: int,
    window: int | None,
    sinks: int = 0,
    q_segments: np.ndarray | None = None,
    k_segments: np.ndarray | None = None,
) -> np.ndarray:
    """``[B, T, S]``: the docstring's rule, one entry at a time, with no shared code."""
    mask = np.zeros((batch, q_len, kv_len), bool)
    for b in range(batch):
        for t in range(q_len):
            slot = q_offset + t
            for j in range(kv_len):
                mask[b, t, j] = (
                    j <= slot
                    and j < kv_length
                    and (window is None or slot - j < window or j < sinks)
                    and (q_segments is None or q_segments[b, t] == k_segments[b, j])
                )
    return mask


def _numpy_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_offset: int,
    kv_length: int,
    window: int | None,
    sinks: int = 0,
    q_segments: np.ndarray | None = None,
    k_segments: np.ndarray | None = None,
) -> np.ndarray:
    """Float64 loops over (batch, head, query) on the numpy mask."""
    batch, q_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    mask = _numpy_mask(batch, q_len, k.shape[1], q_offset, kv_length, window, sinks, q_segments, k_segments)
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape, np.float64)
    for b in range(batch):
        for h in range(num_heads):
            for t in range(q_len):
                visible = np.flatnonzero(mask[b, t])
                if not visible.size:  # nothing to attend to: zeros, the convention both implementations document
                    continue
                scores = np.array([q[b, t, h] @ k[b, j, h // group] for j in visible]) / np.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, t, h] = sum(w * v[b, j, h // group] for w, j in zip(weights, visible, strict=True))
    return out


def _qkv(
    seed: int, batch: int, q_len: int, kv_len: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, num_heads, head_dim))
    k = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim))
    v = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _segments(
    seed: int, batch: int, q_len: int, kv_len: int, q_offset: int, layout: str | None
) -> tuple[jax.Array | None, jax.Array | None]:
    """Document ids per slot, ``(q_segments, k_segments)``: queries take the ids of their own slots.

    ``"packed"``: sorted ids (documents packed one after another); ``"shuffled"``: ids in any order, which the
    chunked path must get right too (it may skip fewer blocks, never a visible one).
    """
    if layout is None:
        return None, None
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4 if layout == "packed" else 3, (batch, max(kv_len, q_offset + q_len)))
    ids = np.sort(ids, axis=1) if layout == "packed" else ids
    return jnp.asarray(ids[:, q_offset : q_offset + q_len], jnp.int32), jnp.asarray(ids[:, :kv_len], jnp.int32)


# Compiling dominates these tests on a CPU: the reference is always jitted (it is the comparator, not the code
# under test), jitted functions are built once per static configuration so equal shapes reuse a compilation, and
# q_offset/kv_length/segments are traced arguments.
_reference = jax.jit(functools.partial(_attend, reference_attention), static_argnames=("window", "sinks"))


@functools.cache
def _chunked(window: int | None, q_block: int, kv_block: int, jit: bool, sinks: int = 0):
    """``chunked_attention`` with static blocks, window and sinks; the rest is traced under jit."""

    def run(
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        q_offset: Any,
        kv_length: Any,
        q_segments: jax.Array | None = None,
        k_segments: jax.Array | None = None,
    ) -> jax.Array:
        return _attend(
            chunked_attention,
            q,
            k,
            v,
            q_offset=q_offset,
            kv_length=kv_length,
            window=window,
            sinks=sinks,
            q_segments=q_segments,
            k_segments=k_segments,
            q_block=q_block,
            kv_block=kv_block,
        )

    return jax.jit(run) if jit else run


@functools.cache
def _with_grads(chunked: bool, window: int | None, sinks: int, q_block: int, kv_block: int, *, jit: bool = True):
    """``(out, dq, dk, dv)``: the output and the gradients of ``sum(d_out * out)`` w.r.t. q, k, v in one program.

    The VJP with a random cotangent ``d_out`` is ``jax.grad`` of that random linear functional; ``chunked=False``
    differentiates the reference by plain autodiff (the blocks are then unused).
    """

    def run(
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        d_out: jax.Array,
        q_offset: Any,
        kv_length: Any,
        q_segments: jax.Array | None = None,
        k_segments: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        mask_args = {"q_offset": q_offset, "kv_length": kv_length, "q_segments": q_segments, "k_segments": k_segments}

        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            if chunked:
                return _attend(
                    chunked_attention,
                    q,
                    k,
                    v,
                    **mask_args,
                    window=window,
                    sinks=sinks,
                    q_block=q_block,
                    kv_block=kv_block,
                )
            return _attend(reference_attention, q, k, v, **mask_args, window=window, sinks=sinks)

        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run) if jit else run


# (batch, T, S, H, K, D, q_offset, kv_length, window, q_block, kv_block)
CASES = {
    "mha_prefill_ragged": (2, 13, 13, 4, 4, 8, 0, 13, None, 4, 5),
    "gqa2_offset_empty_tail": (1, 7, 29, 4, 2, 16, 9, 16, None, 3, 8),
    "gqa3_window": (2, 11, 24, 6, 2, 8, 5, 16, 4, 4, 4),
    "gqa3_window_wider_than_blocks": (1, 17, 40, 6, 2, 8, 20, 37, 13, 5, 3),
    "decode_t1": (2, 1, 21, 6, 3, 8, 14, 15, None, 256, 256),
    "decode_t1_window_small_blocks": (1, 1, 33, 4, 1, 8, 30, 31, 6, 1, 2),
    "single_blocks_cover_all": (1, 9, 12, 2, 1, 8, 3, 12, None, 256, 256),
    "block_size_one": (1, 5, 7, 3, 1, 4, 2, 7, 3, 1, 1),
    "rows_with_no_visible_key": (1, 4, 16, 2, 1, 8, 10, 6, 3, 2, 4),
}
# (batch, T, S, H, K, D, q_offset, kv_length, window, sinks, segments, q_block, kv_block); segments: see _segments
MASK_CASES = {
    "sinks_window_gap_gqa3": (2, 11, 32, 6, 2, 8, 9, 28, 5, 3, None, 4, 3),
    "sinks_straddle_a_block_mha": (1, 17, 40, 4, 4, 8, 20, 37, 6, 5, None, 5, 3),
    "sinks_past_window": (1, 6, 16, 3, 1, 8, 8, 16, 3, 12, None, 2, 4),
    "sinks_without_window": (1, 7, 12, 2, 1, 8, 3, 10, None, 4, None, 4, 4),
    "decode_sinks_window": (2, 1, 33, 6, 3, 8, 30, 31, 6, 4, None, 1, 2),
    "packed_docs_gqa2_offset": (2, 13, 24, 4, 2, 8, 6, 19, None, 0, "packed", 4, 5),
    "packed_docs_prefill_mha": (2, 16, 16, 2, 2, 8, 0, 16, None, 0, "packed", 4, 4),
    "shuffled_docs_gqa2": (1, 9, 20, 4, 2, 8, 4, 20, None, 0, "shuffled", 4, 3),
    "docs_sinks_window_gqa3": (2, 12, 30, 3, 1, 8, 10, 27, 6, 2, "packed", 5, 4),
}
# every case in the long form: the CASES have no sinks and no documents
ALL_CASES = {name: (*c[:9], 0, None, *c[9:]) for name, c in CASES.items()} | MASK_CASES


def test_reference_attention_matches_numpy_loops() -> None:
    for name, (batch, t, s, h, kh, d, q_offset, kv_length, window, sinks, layout, _, _) in ALL_CASES.items():
        q, k, v = _qkv(1, batch, t, s, h, kh, d, jnp.float32)
        segments = _segments(1, batch, t, s, q_offset, layout)
        if name in MASK_CASES:  # the output of the reference's VJP program, which the gradient tests reuse
            with_grads = _with_grads(False, window, sinks, 0, 0)
            ours = with_grads(q, k, v, jnp.zeros_like(q), q_offset, kv_length, *segments)[0]
        else:
            ours = _reference(q, k, v, q_offset=q_offset, kv_length=kv_length, window=window)
        segments_np = [None if x is None else np.asarray(x) for x in segments]
        expected = _numpy_attention(
            np.asarray(q), np.asarray(k), np.asarray(v), q_offset, kv_length, window, sinks, *segments_np
        )
        # float32 einsum + softmax vs float64 loops: a few float32 ulp on values |x| < 4
        chex.assert_trees_all_close(np.asarray(ours, np.float64), expected, **F32_TOL, custom_message=name)


def test_rows_with_no_visible_key_are_zero() -> None:
    # slots 10..13 with window 3 could only see keys 8..13, all beyond kv_length = 6
    batch, t, s, h, kh, d, q_offset, kv_length, window, q_block, kv_block = CASES["rows_with_no_visible_key"]
    q, k, v = _qkv(0, batch, t, s, h, kh, d, jnp.float32)
    for out in (
        _reference(q, k, v, q_offset=q_offset, kv_length=kv_length, window=window),
        _chunked(window, q_block, kv_block, jit=False)(q, k, v, q_offset, kv_length),
    ):
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out, 0.0)


# Every case jitted; eager (op-by-op, ~2x the compile time here) on a subset covering GQA, windows and decode.
EAGER_CASES = ("gqa2_offset_empty_tail", "gqa3_window", "decode_t1_window_small_blocks")
MODES = [(case, True) for case in sorted(CASES)] + [(case, False) for case in EAGER_CASES]


@pytest.mark.parametrize("case,jit", MODES, ids=[f"{case}-{'jit' if jit else 'eager'}" for case, jit in MODES])
def test_chunked_matches_reference_float32(case: str, jit: bool) -> None:
    batch, t, s, h, kh, d, q_offset, kv_length, window, q_block, kv_block = CASES[case]
    q, k, v = _qkv(2, batch, t, s, h, kh, d, jnp.float32)
    out = _chunked(window, q_block, kv_block, jit)(q, k, v, q_offset, kv_length)
    expected = _reference(q, k, v, q_offset=q_offset, kv_length=kv_length, window=window)
    chex.assert_shape(out, (batch, t, h, d))
    chex.assert_type(out, jnp.float32)
    chex.assert_trees_all_close(out, expected, **F32_TOL)


BF16_MODES = [("gqa2_offset_empty_tail", True), ("gqa3_window", True), ("decode_t1", True), ("gqa3_window", False)]


@pytest.mark.parametrize(
    "case,jit", BF16_MODES, ids=[f"{case}-{'jit' if jit else 'eager'}" for case, jit in BF16_MODES]
)
def test_chunked_matches_reference_bfloat16(case: str, jit: bool) -> None:
    batch, t, s, h, kh, d, q_offset, kv_length, window, q_block, kv_block = CASES[case]
    q, k, v = _qkv(3, batch, t, s, h, kh, d, jnp.bfloat16)
    out = _chunked(window, q_block, kv_block, jit)(q, k, v, q_offset, kv_length)
    chex.assert_type(out, jnp.bfloat16)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    expected = _reference(q32, k32, v32, q_offset=q_offset, kv_length=kv_length, window=window)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, **BF16_TOL)


def test_default_kv_length_is_the_whole_buffer() -> None:
    q, k, v = _qkv(4, 1, 6, 10, 4, 2, 8, jnp.float32)
    out = jax.jit(
        lambda q, k, v: _attend(chunked_attention, q, k, v, q_offset=4, kv_length=None, q_block=4, kv_block=4)
    )(q, k, v)
    chex.assert_trees_all_close(out, _reference(q, k, v, q_offset=4, kv_length=10), **F32_TOL)


def test_kv_length_beyond_capacity_is_clamped() -> None:
    # kv_length > S must behave as S: the padded key block past the buffer must never be read
    q, k, v = _qkv(5, 1, 5, 10, 2, 1, 8, jnp.float32)
    out = _chunked(None, 2, 4, jit=True)(q, k, v, 5, 64)
    chex.assert_trees_all_close(out, _reference(q, k, v, q_offset=5, kv_length=10), **F32_TOL)


def test_chunked_rejects_bad_shapes() -> None:
    q, k, v = _qkv(6, 1, 3, 5, 3, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="num_heads=3 is not a multiple of num_kv_heads=2"):
        chunked_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=masks.causal())
    q, k, v = _qkv(6, 1, 3, 5, 4, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="incompatible shapes"):
        chunked_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2)[..., :4], mask=masks.causal())


def test_visibility_mask_small_case() -> None:
    # query slots 2, 3 over keys 0..4 filled up to 4, window 2: slot 2 sees {1, 2}, slot 3 sees {2, 3}
    mask = _visibility(2, 2, 5, 4, 2)
    expected = np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


# Hypothesis varies what is traced (q_offset, kv_length, the data) freely and the static configuration over three
# settings — (T, (kv_heads, group), window, (q_block, kv_block)) — so the examples share three compilations.
STATIC_SETTINGS = [(7, (2, 1), None, (3, 4)), (7, (1, 3), 5, (8, 5)), (1, (1, 3), 1, (3, 4))]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    static=st.sampled_from(STATIC_SETTINGS),
    q_offset=st.integers(0, 17),
    kv_length=st.integers(0, 26),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_reference_hypothesis(static: tuple, q_offset: int, kv_length: int, seed: int) -> None:
    # a 24-slot buffer; kv_length may fall short of the queries' own slots, or run past the buffer (clamped)
    q_len, (num_kv_heads, group), window, blocks = static
    q, k, v = _qkv(seed, 1, q_len, 24, num_kv_heads * group, num_kv_heads, 4, jnp.float32)
    out = _chunked(window, *blocks, jit=True)(q, k, v, q_offset, kv_length)
    expected = _reference(q, k, v, q_offset=q_offset, kv_length=min(kv_length, 24), window=window)
    chex.assert_trees_all_close(out, expected, **F32_TOL)


def test_rows_without_keys_in_a_processed_block_are_zero() -> None:
    # slots 0..6, window 5, only slot 0 filled: slots 0..4 see key 0, slots 5 and 6 see nothing, but their query
    # block (all 7 rows) still processes key block 0
    q, k, v = _qkv(7, 1, 7, 10, 3, 1, 4, jnp.float32)
    out = _chunked(5, 8, 5, jit=True)(q, k, v, 0, 1)
    expected = _reference(q, k, v, q_offset=0, kv_length=1, window=5)
    np.testing.assert_array_equal(expected[:, 5:], 0.0)
    chex.assert_trees_all_close(out, expected, **F32_TOL)


# ---- sinks, documents and gradients ----

# Gradients, float32: both sides sum float32 products of N(0, 1) data, but in different orders (the chunked backward
# adds dK/dV block by block over query blocks and dQ over key blocks, the reference does dense matmuls) and the
# chunked side recomputes the probabilities as exp(s - lse) from the saved log-sum-exp, so they differ by a few ulp
# of the largest terms (|g| < 7 here). Measured worst case on the gradient grid over 12 seeds (half with random
# q_offset/kv_length): |diff| / (1 + |ref|) = 1.2e-6; atol = rtol = 1e-5 leaves ~8x headroom.
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-5}

# Gradients on causal and windowed CASES plus every MASK_CASE, jitted; eagerly (op by op around the custom VJP) on
# the case that combines every option.
GRAD_MODES = [(case, True) for case in ("mha_prefill_ragged", "gqa3_window_wider_than_blocks")]
GRAD_MODES += [(case, True) for case in sorted(MASK_CASES)] + [("docs_sinks_window_gqa3", False)]


def _compare_with_grads(case: str, ours: tuple[jax.Array, ...], expected: tuple[jax.Array, ...]) -> None:
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected, strict=True):
        chex.assert_trees_all_close(
            got, want, **(F32_TOL if name == "out" else GRAD_TOL), custom_message=f"{case}: {name}"
        )


@pytest.mark.parametrize(
    "case,jit", GRAD_MODES, ids=[f"{case}-{'jit' if jit else 'eager'}" for case, jit in GRAD_MODES]
)
def test_chunked_matches_reference_with_gradients(case: str, jit: bool) -> None:
    batch, t, s, h, kh, d, q_offset, kv_length, window, sinks, layout, q_block, kv_block = ALL_CASES[case]
    q, k, v = _qkv(8, batch, t, s, h, kh, d, jnp.float32)
    d_out = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)
    segments = _segments(10, batch, t, s, q_offset, layout)
    ours = _with_grads(True, window, sinks, q_block, kv_block, jit=jit)(q, k, v, d_out, q_offset, kv_length, *segments)
    expected = _with_grads(False, window, sinks, 0, 0)(q, k, v, d_out, q_offset, kv_length, *segments)
    chex.assert_shape(ours, (q.shape, q.shape, k.shape, v.shape))
    _compare_with_grads(case, ours, expected)


def test_rows_with_no_visible_key_have_zero_gradients() -> None:
    # slots 0..6, window 5, only slot 0 filled: slots 5, 6 see nothing; slot 3 is in document 9, which no key is
    # in. Their outputs and query gradients are zero, and keys past kv_length get no gradient.
    q, k, v = _qkv(11, 1, 7, 10, 3, 1, 4, jnp.float32)
    d_out = jnp.asarray(np.random.default_rng(12).standard_normal(q.shape), jnp.float32)
    q_segments = jnp.array([[0, 0, 0, 9, 0, 0, 0]], jnp.int32)
    k_segments = jnp.zeros((1, 10), jnp.int32)
    out, dq, dk, dv = _with_grads(True, 5, 0, 4, 5, jit=True)(q, k, v, d_out, 0, 1, q_segments, k_segments)
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(x))
    blind = [3, 5, 6]
    for x in (out, dq):
        np.testing.assert_array_equal(x[:, blind], 0.0)
    for x in (dk, dv):
        np.testing.assert_array_equal(x[:, 1:], 0.0)
    assert np.any(dq[:, :3] != 0) and np.any(dv[:, 0] != 0)


def test_visibility_mask_sinks_and_window() -> None:
    # slots 5, 6 over keys 0..7 filled up to 7, window 2, sinks 2: both keep the sinks {0, 1}; slot 5 adds {4, 5},
    # slot 6 adds {5, 6}
    mask = _visibility(5, 2, 8, 7, 2, sinks=2)
    expected = np.array([[1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1, 1, 0]], bool)
    np.testing.assert_array_equal(mask, expected)
    # causality and kv_length still bind the sinks: slot 0 sees key 0 only; with kv_length 1 slot 5 sees key 0 only
    np.testing.assert_array_equal(_visibility(0, 1, 4, 4, 1, sinks=3), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(_visibility(5, 1, 6, 1, 2, sinks=3), [[1, 0, 0, 0, 0, 0]])
    # sinks are kept outside a window: a mask with sinks and no window is an error, not a silent no-op
    with pytest.raises(ValueError, match="sinks=2 are the slots kept outside a sliding window; give a window too"):
        masks.Mask(causal=True, sinks=2)


def test_visibility_mask_segments() -> None:
    # two batch rows, query slots 2, 3 over keys 0..3, all filled. Row 0: slot 2 (document 0) sees keys 0, 1 and
    # slot 3 (document 1) sees 2, 3; row 1: slot 2 (document 1) sees 1, 2 and slot 3 (document 1) sees 1, 2, 3.
    q_segments = jnp.array([[0, 1], [1, 1]])
    k_segments = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    mask = _visibility(2, 2, 4, 4, None, q_segments=q_segments, k_segments=k_segments)
    expected = np.array([[[1, 1, 0, 0], [0, 0, 1, 1]], [[0, 1, 1, 0], [0, 1, 1, 1]]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_segments_come_in_pairs_of_the_right_shape() -> None:
    q, k, v = _qkv(6, 2, 3, 5, 2, 1, 8, jnp.float32)
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    q_segments, k_segments = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 5), jnp.int32)
    for attention in (chunked_attention, reference_attention):
        with pytest.raises(ValueError, match="q_segments was given without k_segments"):
            attention(q, k, v, mask=masks.Mask(q_segments=q_segments))
        with pytest.raises(ValueError, match="k_segments was given without q_segments"):
            attention(q, k, v, mask=masks.Mask(k_segments=k_segments))
        with pytest.raises(ValueError, match=re.escape("q_segments has shape (2, 5); expected (B, T) = (2, 3)")):
            attention(q, k, v, mask=masks.documents(k_segments, k_segments))
        with pytest.raises(ValueError, match=re.escape("k_segments has shape (1, 5); expected (B, S) = (2, 5)")):
            attention(q, k, v, mask=masks.documents(q_segments, k_segments[:1]))
    with pytest.raises(ValueError, match="sinks=-1 must be >= 0"):
        masks.sliding_window(2, sinks=-1)


def _listed_blocks(
    q_offset: int,
    q_len: int,
    kv_len: int,
    kv_length: int,
    window: int | None,
    sinks: int,
    q_block: int,
    kv_block: int,
    q_segments: np.ndarray | None = None,
    k_segments: np.ndarray | None = None,
) -> list[list[int]]:
    """``key_blocks_to_visit`` of the mask's block layout for every query block, as lists."""
    segments = (
        {} if q_segments is None else {"q_segments": jnp.asarray(q_segments), "k_segments": jnp.asarray(k_segments)}
    )
    layout = _mask(q_offset, kv_length, window, sinks, **segments).block_layout(q_len, kv_len, q_block, kv_block)
    listed = []
    for row in layout:
        block_ids, count = key_blocks_to_visit(row)
        listed.append(np.asarray(block_ids)[: int(count)].tolist())
    return listed


def _needed_blocks(mask_BxTxS: np.ndarray, q_block: int, kv_block: int) -> list[list[int]]:
    """Per query block, the key blocks in which the dense mask has a visible entry (any batch row)."""
    _, q_len, kv_len = mask_BxTxS.shape
    return [
        [
            n
            for n in range(-(-kv_len // kv_block))
            if mask_BxTxS[:, i : i + q_block, n * kv_block : (n + 1) * kv_block].any()
        ]
        for i in range(0, q_len, q_block)
    ]


# (q_offset, T, S, kv_length, window, sinks, q_block, kv_block)
BLOCK_CASES = {
    "causal_prefill": (0, 10, 10, 10, None, 0, 4, 3),
    "causal_offset_empty_tail": (9, 7, 29, 16, None, 0, 3, 8),
    "window": (20, 17, 40, 37, 13, 0, 5, 3),
    "sinks_window_gap": (9, 11, 32, 28, 5, 3, 4, 3),
    "sinks_straddle_a_block": (20, 17, 40, 37, 6, 5, 5, 3),
    "sinks_past_window": (8, 6, 16, 16, 3, 12, 2, 4),
    "sinks_without_window": (3, 7, 12, 10, None, 4, 4, 4),
    "no_visible_key": (10, 4, 16, 6, 3, 0, 2, 4),
    "only_sinks_visible": (10, 4, 16, 6, 3, 2, 2, 4),
    "empty_cache": (0, 5, 8, 0, None, 0, 2, 4),
    "decode": (30, 1, 33, 31, 6, 4, 1, 2),
    "window_one_blocks_of_one": (2, 5, 7, 7, 1, 1, 1, 1),
}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_key_blocks_to_visit_lists_exactly_the_blocks_with_a_visible_entry(case: str) -> None:
    q_offset, q_len, kv_len, kv_length, window, sinks, q_block, kv_block = BLOCK_CASES[case]
    listed = _listed_blocks(q_offset, q_len, kv_len, kv_length, window, sinks, q_block, kv_block)
    mask = _numpy_mask(1, q_len, kv_len, q_offset, kv_length, window, sinks)
    # equal lists: ascending, each block once, no fully masked block, no block with a visible entry missing
    assert listed == _needed_blocks(mask, q_block, kv_block)


def test_key_blocks_to_visit_sinks_and_window_by_hand() -> None:
    # slots 9..19 in query blocks of 4 (9-12, 13-16, 17-19), key blocks of 3, window 5, sinks 3, kv_length 28.
    # Every block keeps the sinks (key block 0); query block 0 sees slots 5..12 (key blocks 1-4), block 1 sees
    # 9..16 (3-5), block 2 sees 13..19 (4-6): key blocks 1, 2 lie between the sinks and the window of blocks 1, 2.
    assert _listed_blocks(*BLOCK_CASES["sinks_window_gap"]) == [[0, 1, 2, 3, 4], [0, 3, 4, 5], [0, 4, 5, 6]]


def test_key_blocks_to_visit_skips_earlier_documents() -> None:
    # a 12-slot prefill packing documents 0 (slots 0-4), 1 (5-8), 2 (9-11), blocks of 4 both ways. Query block 2
    # (documents 1, 2) skips key block 0 (document 0 only), which causality alone would visit; block 1 (documents 0,
    # 1) must still visit it. The second batch row has document 1 start at slot 4, which changes nothing here.
    k_segments = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]])
    listed = _listed_blocks(0, 12, 12, 12, None, 0, 4, 4, k_segments, k_segments)
    assert listed == [[0], [0, 1], [1, 2]]


# a 24-slot buffer: the helper's shapes then depend on kv_block alone, so eager calls reuse their kernels
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    q_offset=st.integers(0, 12),
    q_len=st.integers(1, 12),
    kv_length=st.integers(0, 24),
    window=st.one_of(st.none(), st.integers(1, 8)),
    sinks=st.integers(0, 6),
    blocks=st.tuples(st.integers(1, 5), st.sampled_from([1, 3, 5])),
    layout=st.sampled_from([None, "packed", "shuffled"]),
    seed=st.integers(0, 2**16),
)
def test_key_blocks_to_visit_hypothesis(
    q_offset: int,
    q_len: int,
    kv_length: int,
    window: int | None,
    sinks: int,
    blocks: tuple[int, int],
    layout: str | None,
    seed: int,
) -> None:
    # exact without documents; with them, never a block with a visible entry missing and never more than without
    q_block, kv_block = min(blocks[0], q_len), blocks[1]
    segments = [None if x is None else np.asarray(x) for x in _segments(seed, 2, q_len, 24, q_offset, layout)]
    args = (q_offset, q_len, 24, kv_length, window, sinks, q_block, kv_block)
    listed = _listed_blocks(*args, *segments)
    mask = _numpy_mask(2, q_len, 24, q_offset, kv_length, window, sinks, *segments)
    needed = _needed_blocks(mask, q_block, kv_block)
    if layout is None:
        assert listed == needed
        return
    without_documents = _listed_blocks(*args)
    for got, need, bound in zip(listed, needed, without_documents, strict=True):
        assert got == sorted(set(got)) and set(need) <= set(got) <= set(bound)


# Hypothesis over the new options, outputs and gradients: it varies what is traced (q_offset, kv_length, the data,
# the documents) on the static configuration and shapes of three MASK_CASES, so it reuses their compilations.
MASK_SETTINGS = ["sinks_window_gap_gqa3", "shuffled_docs_gqa2", "docs_sinks_window_gqa3"]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    case=st.sampled_from(MASK_SETTINGS),
    q_offset=st.integers(0, 24),
    kv_length=st.integers(0, 34),
    seed=st.integers(0, 2**16),
)
def test_chunked_masks_and_gradients_hypothesis(case: str, q_offset: int, kv_length: int, seed: int) -> None:
    # kv_length may fall short of the queries' own slots, or run past the buffer (clamped)
    batch, t, s, h, kh, d, _, _, window, sinks, layout, q_block, kv_block = MASK_CASES[case]
    q, k, v = _qkv(seed, batch, t, s, h, kh, d, jnp.float32)
    d_out = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(q.shape), jnp.float32)
    segments = _segments(seed, batch, t, s, q_offset, layout)
    # jit=True spelled out: functools.cache keys on how it is passed, and this reuses the gradient tests' program
    ours = _with_grads(True, window, sinks, q_block, kv_block, jit=True)(q, k, v, d_out, q_offset, kv_length, *segments)
    expected = _with_grads(False, window, sinks, 0, 0)(q, k, v, d_out, q_offset, min(kv_length, s), *segments)
    _compare_with_grads(f"{case} {q_offset=} {kv_length=} {seed=}", ours, expected)
