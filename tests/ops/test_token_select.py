"""Tests for lcm.ops.token_select.

Hand-worked selections (which slots, exactly), then each step against a float64 numpy version written from the
module docstring with no shared code: criticality (query head ``h`` reads KV head ``h // (H / K)``), the soft vote
(softmax per head over the candidates, summed over all heads), attention over the gathered entries (contiguous RoPE
positions, causal by slot), and a whole TokenSelect step (fingerprint rotated at ``n_local + t``, vote, top-k,
attention). Below the budget the step is full attention: ``reference_attention`` with keys and queries rotated at
their slots. The selection cache is reused above the cosine threshold and recomputed below it. Hypothesis checks the
invariants of a selection (size, first/last slots, sorted, unique, inside the filled range).
"""

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.ops import masks
from lcm.ops import token_select as ts
from lcm.ops.attention import reference_attention
from lcm.ops.rotary import apply_rope

# float32 against float64 numpy: dot products of N(0, 1) vectors of length <= 16 and softmax-weighted means of
# N(0, 1) values; float32 rounding (2^-24 relative) over a few dozen terms plus float32 cos/sin of angles <= ~30 rad
# stays below 1e-5. 1e-4 leaves headroom without hiding a wrong position (which moves outputs by O(0.1)).
F32_TOL = {"atol": 1e-4, "rtol": 1e-4}
# the same computation on both sides (jnp vs jnp, only the route differs): a few ulp
SAME_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _maybe_jit(jit: bool, fn: Callable) -> Callable:
    """Static ints are bound by ``functools.partial``; arrays stay traced arguments."""
    return jax.jit(fn) if jit else fn


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _inv_freq(head_dim: int, base: float = 10000.0) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)


def _np_rope(x: np.ndarray, position: float, inv_freq: np.ndarray, attention_factor: float = 1.0) -> np.ndarray:
    """Rotates one vector ``x[D]`` (HF half-split layout) at ``position``, float64."""
    angles = position * inv_freq
    cos, sin = np.cos(np.concatenate([angles, angles])), np.sin(np.concatenate([angles, angles]))
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[half:], x[:half]])
    return attention_factor * (x * cos + rotated * sin)


def _np_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """One query ``[D]`` over rotated keys/values ``[n, D]``."""
    logits = keys @ q * scale
    probs = np.exp(logits - logits.max())
    return (probs / probs.sum()) @ values


def _np_selected_attention(q, keys, values, slots, q_slots, inv_freq, attention_factor=1.0) -> np.ndarray:
    """Row ``b`` of the docstring: ``slots[b]`` (ascending) get positions ``0…n−1``; query ``t`` at ``q_slots[t]`` sees
    the slots ``<=`` its own and sits at the position of the first selected slot ``>=`` its own."""
    q_len, num_heads, head_dim = q.shape
    group = num_heads // keys.shape[0]
    out = np.zeros((q_len, num_heads, head_dim))
    for t in range(q_len):
        seen = [s for s in slots if s <= q_slots[t]]
        q_position = sum(s < q_slots[t] for s in slots)
        for h in range(num_heads):
            kv = h // group
            k_rot = np.stack([_np_rope(keys[kv, s], p, inv_freq, attention_factor) for p, s in enumerate(seen)])
            q_rot = _np_rope(q[t, h], q_position, inv_freq, attention_factor)
            out[t, h] = _np_attention(q_rot, k_rot, values[kv, seen], head_dim**-0.5)
    return out


def _np_vote(q_mean: np.ndarray, keys: np.ndarray, candidates: list[int]) -> np.ndarray:
    """One row: ``Σ_h softmax_j(q̄_h · k_{h // G, j})`` over the candidate slots; 0 elsewhere."""
    num_heads, num_kv_heads = q_mean.shape[0], keys.shape[0]
    vote = np.zeros(keys.shape[1])
    for h in range(num_heads):
        scores = np.array([q_mean[h] @ keys[h // (num_heads // num_kv_heads), j] for j in candidates])
        probs = np.exp(scores - scores.max())
        vote[candidates] += probs / probs.sum()
    return vote


def _np_select(vote: np.ndarray, length: int, n_init: int, k: int, n_local: int, start: int = 0) -> list[int]:
    if length - start <= n_init + k + n_local:
        return list(range(start, length))
    candidates = np.arange(start + n_init, length - n_local)
    top = candidates[np.argsort(-vote[candidates], kind="stable")[:k]]
    return sorted([*range(start, start + n_init), *top.tolist(), *range(length - n_local, length)])


# --- selection ------------------------------------------------------------------------------------------------------

# S = 12, n_init = 2, k = 3, n_local = 2 (budget 7). Large votes sit outside the candidates to prove they are ignored.
HAND_VOTES = np.array([9, 9, 0.1, 0.5, 0.2, 0.4, 0.05, 0.6, 9, 9, 9, 9], np.float32)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_select_tokens_hand_worked(jit: bool) -> None:
    votes = jnp.asarray(np.stack([HAND_VOTES] * 4))
    select = functools.partial(ts.select_tokens, n_init=2, k=3, n_local=2)
    indices, valid = _maybe_jit(jit, select)(votes, jnp.array([10, 8, 7, 5]))
    chex.assert_shape([indices, valid], (4, 7))
    expected = [
        # length 10: candidates 2..7; top-3 votes 0.6 (7), 0.5 (3), 0.4 (5); last two 8, 9
        [0, 1, 3, 5, 7, 8, 9],
        # length 8: candidates 2..5; top-3 are 3, 5, 4; local 6, 7
        [0, 1, 3, 4, 5, 6, 7],
        # length 7 = budget: full attention over the 7 filled slots
        [0, 1, 2, 3, 4, 5, 6],
        # length 5 < budget: the 5 filled slots, then padding
        [0, 1, 2, 3, 4, 5, 6],
    ]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(valid, [[True] * 7] * 3 + [[True] * 5 + [False] * 2])


def test_select_tokens_left_padded_rows() -> None:
    votes = jnp.asarray(np.stack([HAND_VOTES] * 3))
    indices, valid = ts.select_tokens(votes, 12, n_init=2, k=3, n_local=2, start=jnp.array([0, 2, 6]))
    # start 0: candidates 2..9, top-3 = 8, 9 (vote 9) and 7; start 2: init 2, 3, candidates 4..9, same top-3;
    # start 6: 6 filled slots < budget, so all of them and one padding entry clamped to the last slot
    np.testing.assert_array_equal(indices, [[0, 1, 7, 8, 9, 10, 11], [2, 3, 7, 8, 9, 10, 11], [6, 7, 8, 9, 10, 11, 11]])
    np.testing.assert_array_equal(valid[2], [True] * 6 + [False])
    assert valid[:2].all()


def test_select_tokens_budget_covers_cache() -> None:
    # budget 7 > capacity 6: the selection is 6 wide and always the filled slots
    indices, valid = ts.select_tokens(jnp.zeros((1, 6)), 4, n_init=2, k=3, n_local=2)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(valid, [[True] * 4 + [False] * 2])
    assert ts.selection_width(128, 2048, 512, 100_000) == 2688
    with pytest.raises(ValueError, match="n_local must be an integer >= 0"):
        ts.selection_width(1, 2, -1, 10)


def test_top_k_matches_numpy_argsort() -> None:
    rng = _rng(0)
    votes = rng.permutation(64).astype(np.float32)[None].repeat(3, 0) + rng.normal(size=(3, 64)).astype(np.float32)
    lengths = np.array([64, 50, 31])
    indices, valid = ts.select_tokens(jnp.asarray(votes), jnp.asarray(lengths), n_init=3, k=7, n_local=5)
    for b in range(3):
        assert valid[b].all()
        assert indices[b].tolist() == _np_select(votes[b], int(lengths[b]), 3, 7, 5)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    capacity=st.sampled_from([8, 16]),
    budget=st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 4)),
    fill=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    seed=st.integers(0, 2**16),
)
def test_selection_invariants_hypothesis(capacity: int, budget: tuple, fill: tuple, seed: int) -> None:
    n_init, k, n_local = budget
    length = round(fill[0] * capacity)
    start = round(fill[1] * length)
    votes = jnp.asarray(_rng(seed).normal(size=(1, capacity)).astype(np.float32))
    indices, valid = ts.select_tokens(votes, length, n_init=n_init, k=k, n_local=n_local, start=start)
    assert indices.shape == (1, min(n_init + k + n_local, capacity))
    chosen = np.asarray(indices[0])[np.asarray(valid[0])]
    filled = length - start
    assert len(chosen) == min(filled, n_init + k + n_local)
    assert valid[0, : len(chosen)].all()  # valid entries are a prefix
    assert (np.diff(chosen) > 0).all()  # sorted, unique
    assert ((chosen >= start) & (chosen < length)).all()
    assert set(range(start, min(start + n_init, length))) <= set(chosen.tolist())
    assert set(range(max(length - n_local, start), length)) <= set(chosen.tolist())
    assert ((np.asarray(indices) >= 0) & (np.asarray(indices) < capacity)).all()  # padding is still gatherable


# --- criticality and vote -------------------------------------------------------------------------------------------


def test_criticality_matches_numpy() -> None:
    rng = _rng(1)
    batch, num_heads, num_kv_heads, capacity, head_dim = 2, 6, 2, 9, 4
    q_mean = rng.normal(size=(batch, num_heads, head_dim)).astype(np.float32)
    keys = rng.normal(size=(batch, num_kv_heads, capacity, head_dim)).astype(np.float32)
    lengths, starts = np.array([9, 6]), np.array([0, 2])
    scores = ts.criticality(jnp.asarray(q_mean), jnp.asarray(keys), jnp.asarray(lengths), start=jnp.asarray(starts))
    expected = np.full((batch, num_heads, capacity), -np.inf)
    for b in range(batch):
        for h in range(num_heads):
            for j in range(starts[b], lengths[b]):
                expected[b, h, j] = q_mean[b, h].astype(np.float64) @ keys[b, h // 3, j]  # heads 0-2 -> KV head 0
    chex.assert_trees_all_close(np.asarray(scores, np.float64), expected, **F32_TOL)
    with pytest.raises(ValueError, match="incompatible shapes"):
        ts.criticality(jnp.zeros((1, 5, 4)), jnp.zeros((1, 2, 9, 4)), 3)


def test_soft_vote_matches_numpy() -> None:
    rng = _rng(2)
    scores = rng.normal(size=(3, 4, 10)).astype(np.float32) * 3
    candidates = ts.candidate_mask(jnp.array([10, 8, 3]), 10, 2, 1)
    np.testing.assert_array_equal(candidates[1], [j in range(2, 7) for j in range(10)])
    assert not candidates[2].any()
    votes = ts.soft_vote(jnp.asarray(scores), candidates)
    expected = np.zeros((3, 10))
    for b, span in enumerate([range(2, 9), range(2, 7)]):
        for h in range(4):
            probs = np.exp(scores[b, h, span].astype(np.float64))
            expected[b, list(span)] += probs / probs.sum()
    chex.assert_trees_all_close(np.asarray(votes, np.float64), expected, **F32_TOL)  # row 2 (no candidates): zeros
    chex.assert_trees_all_close(votes.sum(-1), jnp.array([4.0, 4.0, 0.0]), **SAME_TOL)  # one unit per head
    shared = ts.soft_vote(jnp.asarray(scores), candidates[0])  # a [S] mask is shared by the batch
    chex.assert_trees_all_close(shared[0], votes[0], **SAME_TOL)


def test_query_fingerprint_rotation_and_padding() -> None:
    rng = _rng(3)
    q = rng.normal(size=(2, 3, 2, 8)).astype(np.float32)
    inv_freq = _inv_freq(8)
    rotated = ts.query_fingerprint(jnp.asarray(q), inv_freq=jnp.asarray(inv_freq, jnp.float32), position_offset=5)
    expected = np.stack(
        [[np.mean([_np_rope(q[b, t, h], 5 + t, inv_freq) for t in range(3)], 0) for h in range(2)] for b in range(2)]
    )
    chex.assert_trees_all_close(np.asarray(rotated, np.float64), expected, **F32_TOL)
    q_valid = jnp.array([[True, True, False], [True, False, False]])
    plain = ts.query_fingerprint(jnp.asarray(q), q_valid=q_valid)
    chex.assert_trees_all_close(plain[0], q[0, :2].mean(0), **SAME_TOL)
    chex.assert_trees_all_close(plain[1], q[1, 0], **SAME_TOL)


# --- attention --------------------------------------------------------------------------------------------------


def test_selected_attention_matches_numpy() -> None:
    rng = _rng(4)
    batch, q_len, num_heads, num_kv_heads, capacity, head_dim = 2, 3, 4, 2, 20, 8
    q = rng.normal(size=(batch, q_len, num_heads, head_dim)).astype(np.float32)
    keys = rng.normal(size=(batch, num_kv_heads, capacity, head_dim)).astype(np.float32)
    values = rng.normal(size=(batch, num_kv_heads, capacity, head_dim)).astype(np.float32)
    lengths = np.array([20, 9])  # row 0 selects 2 + 4 + 3 of 20, row 1 (9 <= 9) attends to all
    votes = rng.normal(size=(batch, capacity)).astype(np.float32)
    indices, valid = ts.select_tokens(jnp.asarray(votes), jnp.asarray(lengths), n_init=2, k=4, n_local=3)
    inv_freq, factor = _inv_freq(head_dim), 1.1  # a YaRN-like attention factor must reach q and k
    attend = functools.partial(
        ts.selected_attention, inv_freq=jnp.asarray(inv_freq, jnp.float32), attention_factor=factor
    )
    out = jax.jit(attend)(
        jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), indices, valid, q_offset=jnp.asarray(lengths - q_len)
    )
    for b in range(batch):
        slots = np.asarray(indices[b])[np.asarray(valid[b])].tolist()
        q_slots = [lengths[b] - q_len + t for t in range(q_len)]
        expected = _np_selected_attention(q[b], keys[b], values[b], slots, q_slots, inv_freq, factor)
        chex.assert_trees_all_close(np.asarray(out[b], np.float64), expected, **F32_TOL)


def test_full_attention_fallback_equals_reference() -> None:
    rng = _rng(5)
    batch, q_len, num_heads, num_kv_heads, capacity, head_dim, length = 2, 2, 6, 3, 16, 8, 11
    q = jnp.asarray(rng.normal(size=(batch, q_len, num_heads, head_dim)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(batch, num_kv_heads, capacity, head_dim)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(batch, num_kv_heads, capacity, head_dim)), jnp.float32)
    inv_freq = jnp.asarray(_inv_freq(head_dim), jnp.float32)
    cache = ts.init_selection_cache(batch, num_heads, head_dim, k=4)
    step = functools.partial(ts.token_select_attention, inv_freq=inv_freq, n_init=3, k=4, n_local=4)  # budget 11
    out, new_cache, reused = jax.jit(step)(q, keys, values, length, cache)

    @jax.jit
    def expected_fn(q: jax.Array, keys: jax.Array, values: jax.Array) -> jax.Array:
        slots = jnp.broadcast_to(jnp.arange(capacity), (batch, capacity))
        k_rot = apply_rope(keys.swapaxes(1, 2), slots, inv_freq)
        q_rot = apply_rope(q, slots[:, length - q_len : length], inv_freq)
        mask = masks.causal() & masks.offsets(q_offset=length - q_len, kv_length=length)
        return reference_attention(q_rot, k_rot.swapaxes(1, 2), values, mask=mask)

    expected = expected_fn(q, keys, values)
    chex.assert_trees_all_close(out, expected, **SAME_TOL)
    assert not reused.any() and not new_cache.filled.any()  # full attention leaves the cache empty


def test_token_select_step_matches_numpy() -> None:
    rng = _rng(6)
    batch, q_len, num_heads, num_kv_heads, capacity, head_dim = 2, 2, 4, 2, 40, 8
    n_init, k, n_local = 2, 5, 3
    q = rng.normal(size=(batch, q_len, num_heads, head_dim)).astype(np.float32)
    keys = rng.normal(size=(batch, num_kv_heads, capacity, head_dim)).astype(np.float32) * 2
    values = rng.normal(size=(batch, num_kv_heads, capacity, head_dim)).astype(np.float32)
    lengths = np.array([40, 27])
    inv_freq = _inv_freq(head_dim)
    step = jax.jit(ts.token_select_attention, static_argnames=("n_init", "k", "n_local"))
    out, cache, reused = step(
        *map(jnp.asarray, (q, keys, values, lengths)),
        ts.init_selection_cache(batch, num_heads, head_dim, k),
        inv_freq=jnp.asarray(inv_freq, jnp.float32),
        n_init=n_init,
        k=k,
        n_local=n_local,
    )
    assert not reused.any() and cache.filled.all()
    for b in range(batch):
        q_mean = np.mean([[_np_rope(q[b, t, h], n_local + t, inv_freq) for h in range(num_heads)] for t in range(2)], 0)
        vote = _np_vote(q_mean, keys[b], list(range(n_init, lengths[b] - n_local)))
        slots = _np_select(vote, int(lengths[b]), n_init, k, n_local)
        np.testing.assert_array_equal(cache.top[b], slots[n_init : n_init + k])
        q_slots = [lengths[b] - q_len + t for t in range(q_len)]
        expected = _np_selected_attention(q[b], keys[b], values[b], slots, q_slots, inv_freq)
        chex.assert_trees_all_close(np.asarray(out[b], np.float64), expected, **F32_TOL)
    with pytest.raises(ValueError, match="must fit in the local window"):
        ts.token_select_attention(
            jnp.asarray(q), *map(jnp.asarray, (keys, values, lengths)), cache, inv_freq=jnp.ones(4), n_local=1
        )


# --- selection cache ------------------------------------------------------------------------------------------------


def _cache_setup(seed: int) -> tuple:
    rng = _rng(seed)
    batch, num_heads, num_kv_heads, capacity, head_dim = 2, 4, 2, 32, 8
    q_mean = jnp.asarray(rng.normal(size=(batch, num_heads, head_dim)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(batch, num_kv_heads, capacity, head_dim)), jnp.float32)
    return q_mean, keys, ts.init_selection_cache(batch, num_heads, head_dim, k=4)


def test_fingerprint_similarity_is_cosine_of_flattened_heads() -> None:
    rng = _rng(7)
    a, b = rng.normal(size=(3, 4, 8)), rng.normal(size=(3, 4, 8))
    a[2] = 0.0
    got = ts.fingerprint_similarity(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    flat_a, flat_b = a.reshape(3, -1), b.reshape(3, -1)
    expected = (flat_a * flat_b).sum(-1) / np.maximum(
        np.linalg.norm(flat_a, axis=-1) * np.linalg.norm(flat_b, axis=-1), 1e-30
    )
    chex.assert_trees_all_close(np.asarray(got, np.float64), expected, **F32_TOL)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_selection_cache_reuse_above_threshold(jit: bool) -> None:
    q_mean, keys, cache = _cache_setup(8)
    select = _maybe_jit(jit, functools.partial(ts.select_with_cache, n_init=2, k=4, n_local=3, threshold=0.9))
    first, _, cache, reused = select(q_mean, keys, 20, cache)
    assert not reused.any() and cache.filled.all()
    np.testing.assert_array_equal(cache.top, first[:, 2:6])
    # next decode step: one more token, a nearby query (cos > 0.9 in row 0, an unrelated one in row 1), new keys
    other = jnp.asarray(_rng(9).normal(size=q_mean.shape), jnp.float32)
    q_next = q_mean.at[0].add(0.1 * other[0]).at[1].set(other[1])
    cos = ts.fingerprint_similarity(q_next, q_mean)
    assert cos[0] > 0.9 > cos[1]
    new_keys = keys[:, :, ::-1]
    indices, valid, new_cache, reused = select(q_next, new_keys, 21, cache)
    np.testing.assert_array_equal(reused, [True, False])
    assert valid.all()
    # row 0 keeps its top-4 and the local window moves to the new token; the fingerprint is not refreshed
    np.testing.assert_array_equal(indices[0], [0, 1, *np.asarray(first[0, 2:6]), 18, 19, 20])
    chex.assert_trees_all_close(new_cache.q_mean[0], q_mean[0])
    # row 1 is recomputed from the new query and keys, and its cache entry refreshed
    fresh, _ = ts.select_tokens(
        ts.soft_vote(ts.criticality(q_next, new_keys, 21), ts.candidate_mask(21, 32, 2, 3)),
        21,
        n_init=2,
        k=4,
        n_local=3,
    )
    np.testing.assert_array_equal(indices[1], fresh[1])
    np.testing.assert_array_equal(new_cache.top[1], fresh[1, 2:6])
    chex.assert_trees_all_close(new_cache.q_mean[1], q_next[1])
    # the same query with fresh scoring would have chosen differently: reuse really skipped the new keys
    assert (fresh[0] != indices[0]).any()


def test_selection_cache_never_reuses_stale_or_empty_entries() -> None:
    q_mean, keys, cache = _cache_setup(10)
    assert not ts.reuse_mask(cache, q_mean, 20, n_local=3, threshold=0.9).any()  # empty
    _, _, cache, _ = ts.select_with_cache(q_mean, keys, 30, cache, n_init=2, k=4, n_local=3)
    assert ts.reuse_mask(cache, q_mean, 30, n_local=3, threshold=0.9).all()
    # a shorter sequence (a reused batch row): cached slots past the new candidates must not be reused
    stale = np.asarray(cache.top[:, -1]) >= 12 - 3
    np.testing.assert_array_equal(ts.reuse_mask(cache, q_mean, 12, n_local=3, threshold=0.9), ~stale)
    assert stale.any()
    # a threshold above 1 never reuses
    assert not ts.reuse_mask(cache, q_mean, 30, n_local=3, threshold=1.01).any()
