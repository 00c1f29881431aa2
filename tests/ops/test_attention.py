"""Tests for lcm.ops.attention.

``reference_attention`` against a float64 numpy loop written from the module docstring's visibility rule
(query slot ``q_offset + t`` sees key slot ``j`` iff ``j <= q_offset + t``, ``j < kv_length`` and, with a window
``w``, ``q_offset + t - j < w``; query head ``h`` reads KV head ``h // (H / K)``); then ``chunked_attention``
against ``reference_attention`` over a seeded grid (GQA groups 1/2/3, ragged T and S, q_offset > 0, an empty
cache tail, sliding windows, decode, tiny blocks), jitted and eager, float32 and bfloat16, plus a hypothesis
search over the same space.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.ops.attention import chunked_attention, reference_attention, visibility_mask

# float32: the online softmax rescales partial sums by exp(m_old - m_new) and divides once at the end, the
# reference normalises directly; both accumulate in float32, so outputs (weighted means of N(0, 1) values, |x| < 4)
# agree to a few ulp. Measured worst case on this grid is ~5e-7; 1e-5 leaves ~20x headroom.
F32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# bfloat16 (8 significant bits): the chunked path rounds q * scale and the probabilities to bfloat16 before its
# matmuls (relative error 2^-9 each) and rounds the output to bfloat16 (2^-9 more, 1 ulp = 2^-7 for |x| in
# [1, 2)). Against a float32 reference on the same bfloat16 inputs that is a few bfloat16 ulp at |x| < 4:
# atol 3e-2 (~4 ulp at 1) plus rtol 2^-6.
BF16_TOL = {"atol": 3e-2, "rtol": 1.6e-2}


def _numpy_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_offset: int, kv_length: int, window: int | None
) -> np.ndarray:
    """Float64 loops over (batch, head, query): the docstring's rule, with no shared code."""
    batch, q_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape, np.float64)
    for b in range(batch):
        for h in range(num_heads):
            for t in range(q_len):
                slot = q_offset + t
                visible = [
                    j
                    for j in range(k.shape[1])
                    if j <= slot and j < kv_length and (window is None or slot - j < window)
                ]
                if not visible:  # nothing to attend to: zeros, the convention both implementations document
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


def _chunked(window: int | None, q_block: int, kv_block: int, jit: bool):
    """``chunked_attention`` with static block sizes and window; ``q_offset``/``kv_length`` are traced under jit."""

    def run(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: Any, kv_length: Any) -> jax.Array:
        return chunked_attention(
            q, k, v, q_offset=q_offset, kv_length=kv_length, window=window, q_block=q_block, kv_block=kv_block
        )

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


def test_reference_attention_matches_numpy_loops() -> None:
    for name, (batch, t, s, h, kh, d, q_offset, kv_length, window, _, _) in CASES.items():
        q, k, v = _qkv(1, batch, t, s, h, kh, d, jnp.float32)
        ours = reference_attention(q, k, v, q_offset=q_offset, kv_length=kv_length, window=window)
        expected = _numpy_attention(np.asarray(q), np.asarray(k), np.asarray(v), q_offset, kv_length, window)
        # float32 einsum + softmax vs float64 loops: a few float32 ulp on values |x| < 4
        chex.assert_trees_all_close(np.asarray(ours, np.float64), expected, **F32_TOL, custom_message=name)


def test_rows_with_no_visible_key_are_zero() -> None:
    # slots 10..13 with window 3 could only see keys 8..13, all beyond kv_length = 6
    batch, t, s, h, kh, d, q_offset, kv_length, window, q_block, kv_block = CASES["rows_with_no_visible_key"]
    q, k, v = _qkv(0, batch, t, s, h, kh, d, jnp.float32)
    for out in (
        reference_attention(q, k, v, q_offset=q_offset, kv_length=kv_length, window=window),
        _chunked(window, q_block, kv_block, jit=False)(q, k, v, q_offset, kv_length),
    ):
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_matches_reference_float32(case: str, jit: bool) -> None:
    batch, t, s, h, kh, d, q_offset, kv_length, window, q_block, kv_block = CASES[case]
    q, k, v = _qkv(2, batch, t, s, h, kh, d, jnp.float32)
    out = _chunked(window, q_block, kv_block, jit)(q, k, v, q_offset, kv_length)
    expected = reference_attention(q, k, v, q_offset=q_offset, kv_length=kv_length, window=window)
    chex.assert_shape(out, (batch, t, h, d))
    chex.assert_type(out, jnp.float32)
    chex.assert_trees_all_close(out, expected, **F32_TOL)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", ["gqa2_offset_empty_tail", "gqa3_window", "decode_t1"])
def test_chunked_matches_reference_bfloat16(case: str, jit: bool) -> None:
    batch, t, s, h, kh, d, q_offset, kv_length, window, q_block, kv_block = CASES[case]
    q, k, v = _qkv(3, batch, t, s, h, kh, d, jnp.bfloat16)
    out = _chunked(window, q_block, kv_block, jit)(q, k, v, q_offset, kv_length)
    chex.assert_type(out, jnp.bfloat16)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    expected = reference_attention(q32, k32, v32, q_offset=q_offset, kv_length=kv_length, window=window)
    chex.assert_trees_all_close(out.astype(jnp.float32), expected, **BF16_TOL)


def test_default_kv_length_is_the_whole_buffer() -> None:
    q, k, v = _qkv(4, 1, 6, 10, 4, 2, 8, jnp.float32)
    out = chunked_attention(q, k, v, q_offset=4, q_block=4, kv_block=4)
    chex.assert_trees_all_close(out, reference_attention(q, k, v, q_offset=4, kv_length=10), **F32_TOL)


def test_kv_length_beyond_capacity_is_clamped() -> None:
    # kv_length > S must behave as S: the padded key block past the buffer must never be read
    q, k, v = _qkv(5, 1, 5, 10, 2, 1, 8, jnp.float32)
    out = chunked_attention(q, k, v, q_offset=5, kv_length=64, q_block=2, kv_block=4)
    chex.assert_trees_all_close(out, reference_attention(q, k, v, q_offset=5, kv_length=10), **F32_TOL)


def test_chunked_rejects_bad_shapes() -> None:
    q, k, v = _qkv(6, 1, 3, 5, 3, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="num_heads=3 is not a multiple of num_kv_heads=2"):
        chunked_attention(q, k, v)
    q, k, v = _qkv(6, 1, 3, 5, 4, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="incompatible shapes"):
        chunked_attention(q, k, v[..., :4])


def test_visibility_mask_small_case() -> None:
    # query slots 2, 3 over keys 0..4 filled up to 4, window 2: slot 2 sees {1, 2}, slot 3 sees {2, 3}
    mask = visibility_mask(jnp.array([2, 3]), jnp.arange(5), 4, 2)
    expected = np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    q_len=st.integers(1, 12),
    extra_slots=st.integers(0, 12),
    kv_tail=st.integers(0, 6),
    kv_heads_and_group=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)]),
    window=st.one_of(st.none(), st.integers(1, 10)),
    q_block=st.integers(1, 8),
    kv_block=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_reference_hypothesis(
    q_len: int,
    extra_slots: int,
    kv_tail: int,
    kv_heads_and_group: tuple[int, int],
    window: int | None,
    q_block: int,
    kv_block: int,
    seed: int,
) -> None:
    # the queries fill slots q_offset..q_offset+T-1 of an S-slot buffer whose last kv_tail slots are unfilled
    num_kv_heads, group = kv_heads_and_group
    q_offset = extra_slots
    kv_length = q_offset + q_len
    capacity = kv_length + kv_tail
    q, k, v = _qkv(seed, 1, q_len, capacity, num_kv_heads * group, num_kv_heads, 4, jnp.float32)
    out = _chunked(window, q_block, kv_block, jit=True)(q, k, v, q_offset, kv_length)
    expected = reference_attention(q, k, v, q_offset=q_offset, kv_length=kv_length, window=window)
    chex.assert_trees_all_close(out, expected, **F32_TOL)
