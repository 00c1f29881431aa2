"""Locret's eviction priority (lcm.cache.locret) worked by hand: which slots survive with the stabilisers, and
after the last chunk (``final``) without them; the default number of stabilisers; the n_loc tail; bad input.

Hand-worked examples tag every cached key with its slot (``keys[..., 0] = slot``), so after compression the kept
slots can be read back from the keys themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stacked import kept, tagged_cache

from lcm.cache.locret import Locret, RetainingScores
from lcm.cache.policies import KVPolicy, compress

# predicted CIS of slots 0…7 per KV head; slots 8 and 9 are empty (their huge scores must never count)
SCORES = np.array(
    [
        [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 0.0, 4.0, 100.0, 100.0],
        [0.0, 8.0, 1.0, 6.0, 2.0, 5.0, 3.0, 9.0, 100.0, 100.0],
    ]
)[None, None]  # [L=1, B=1, K=2, S=10]
LENGTH = 8


def _tagged_cache(scores: np.ndarray, length: int):
    layers, _, heads, capacity = scores.shape
    return tagged_cache(layers, heads, capacity, length, scores=scores, first_position=7, keys_pre_rope=True)


def _kept(cache, head: int) -> list[int]:
    return kept(cache, 0, head)


def test_stabilisers_keep_the_newest_entries_then_the_highest_scores() -> None:
    policy = Locret(budget=4, stabilizers=2)
    priority = np.asarray(policy.priority(jnp.asarray(SCORES, jnp.float32), jnp.int32(LENGTH), jnp.int32(LENGTH)))
    # slots 6 and 7 are the 2 newest filled slots: +inf; the rest their score; empty slots -inf
    np.testing.assert_array_equal(priority[0, 0, 0], [5, 1, 9, 3, 7, 2, np.inf, np.inf, -np.inf, -np.inf])
    out = compress(policy, _tagged_cache(SCORES, LENGTH), jnp.int32(LENGTH))
    assert int(out.length) == 4
    assert _kept(out, 0) == [2, 4, 6, 7]  # stabilisers 6, 7; then 9.0 (slot 2) and 7.0 (slot 4)
    assert _kept(out, 1) == [1, 3, 6, 7]  # stabilisers 6, 7; then 8.0 (slot 1) and 6.0 (slot 3)
    # scores move with their entries; positions are renumbered 0…budget-1 (keys are stored pre-RoPE)
    np.testing.assert_array_equal(np.asarray(out.layers[0].scores[0, 0, :4]), [9.0, 7.0, 0.0, 4.0])
    np.testing.assert_array_equal(np.asarray(out.layers[0].positions[0]), np.arange(10))


def test_final_compression_ranks_by_score_alone() -> None:
    policy = Locret(budget=4, stabilizers=2)
    priority = jax.jit(policy.priority, static_argnames="final")(
        jnp.asarray(SCORES, jnp.float32), jnp.int32(LENGTH), jnp.int32(LENGTH), final=True
    )
    np.testing.assert_array_equal(np.asarray(priority)[0, 0, 0], [5, 1, 9, 3, 7, 2, 0, 4, -np.inf, -np.inf])
    kept = np.sort(np.asarray(jax.lax.top_k(priority, 4)[1])[0, 0], axis=-1)
    np.testing.assert_array_equal(kept[0], [0, 2, 4, 7])  # 9, 7, 5, 4: slot 6 (score 0) goes despite being new
    np.testing.assert_array_equal(kept[1], [1, 3, 5, 7])  # 9, 8, 6, 5


def test_fewer_filled_slots_than_stabilisers_keeps_them_all() -> None:
    policy = Locret(budget=4, stabilizers=3)
    priority = np.asarray(policy.priority(jnp.asarray(SCORES, jnp.float32), jnp.int32(2), jnp.int32(2)))
    np.testing.assert_array_equal(priority[0, 0, 0, :3], [np.inf, np.inf, -np.inf])


def test_default_stabilisers_are_fifteen_percent_of_the_budget() -> None:
    assert Locret(budget=16384).stabilizer_tokens == 2457  # the paper's n_s = 2500 at b = 16384
    assert Locret(budget=1024).stabilizer_tokens == 153
    assert Locret(budget=4).stabilizer_tokens == 1  # at least one
    assert Locret(budget=1).stabilizer_tokens == 0  # but always fewer than the budget
    assert Locret(budget=512, stabilizers=0).stabilizer_tokens == 0


def test_interface() -> None:
    policy = Locret(budget=256, n_loc=64)
    assert policy.tail_tokens() == 64 and Locret(budget=256).tail_tokens() == 100
    assert (policy.name, policy.streaming, policy.renumber, policy.needs_scores) == ("locret", True, True, False)
    assert isinstance(policy.layer_hooks(), RetainingScores) and isinstance(policy, KVPolicy)
    assert "38 stabilisers" in policy.promised()
    hash(policy)  # a static argument of the jitted compression


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"budget": 10, "stabilizers": 10}, r"budget=10 is smaller than the 11 tokens"),
        ({"budget": 10, "stabilizers": -2}, r"stabilizers=-2 must be a number of tokens >= 0, or -1"),
        ({"budget": 10, "stabilizers": True}, r"stabilizers=True"),
        ({"budget": 10, "n_loc": -1}, r"n_loc=-1 must be a number of tokens >= 0"),
        ({"budget": 10, "n_loc": 1.5}, r"n_loc=1.5"),
    ],
)
def test_bad_parameters_are_one_line_errors(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        Locret(**params)
    assert str(err.value).startswith("locret: ") and "\n" not in str(err.value)
