"""InfiniPot (arXiv 2410.01518): the NuC + CaP priority worked by hand, CR-RoPE renumbering, the catalyst probe,
NuC against the model's own NLL, the full-cache equivalence when the budget covers the context, bounded memory
over a long input, and bad input.

Hand-worked examples tag every cached key with its slot (``keys[..., 0] = slot``), so after compression the kept
slots can be read back from the keys themselves.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stacked import kept, stacked, tagged_cache

import lcm.steps
from lcm.cache.infinipot import InfiniPot, token_novelty
from lcm.cache.policies import POLICIES, compress, make_policy
from lcm.generate import Engine
from lcm.models.llama import Llama

CATALYST = (5, 17, 42, 8, 99, 3)  # stands for the tokenized catalyst prompt in the tiny model's vocabulary


def _tagged_cache(layers: int, heads: int, capacity: int, length: int, scores: np.ndarray, nll: np.ndarray):
    # original positions 7.., not slots: CR-RoPE must renumber them
    return tagged_cache(layers, heads, capacity, length, scores=scores, nll=nll, first_position=7, keys_pre_rope=True)


_kept = kept


def test_nuc_picks_are_shared_and_cap_fills_the_rest_per_head() -> None:
    # one NLL per token, the same in both heads (a fresh pot: every head holds the same tokens)
    nll = np.array([0.0, 1.0, 7.0, 0.5, 2.0, 9.0, 0.1, 3.0, 0.2, 1.5, 99.0, 99.0])  # slots 10, 11 are empty
    cap = np.zeros((1, 2, 12))
    cap[0, 0, [5, 8, 1, 4]] = [50.0, 6.0, 4.0, 1.0]  # head 0: slot 5 is a NuC pick anyway; then 8 > 1 > 4
    cap[0, 1, [2, 9, 0, 7]] = [60.0, 5.0, 3.0, 2.0]  # head 1: slot 2 is a NuC pick anyway; then 9 > 0 > 7
    cap[0, :, 10:] = 1e3  # empty slots are never kept, whatever their score
    policy = InfiniPot(budget=4, alpha=0.5, catalyst_ids=CATALYST)
    assert policy.nuc_slots() == 2
    out = compress(policy, _tagged_cache(1, 2, 12, 10, cap, nll), jnp.int32(10))
    assert int(out.length) == 4
    # NuC: 2 of the 4 slots to the highest NLL, slots 5 (9.0) and 2 (7.0), in every head; CaP: the 2 best others
    assert _kept(out, head=0) == [1, 2, 5, 8]
    assert _kept(out, head=1) == [0, 2, 5, 9]
    np.testing.assert_array_equal(out.layers[0].values[0, 0, :4, 0], [101, 102, 105, 108])
    # NuC moves with its entry
    np.testing.assert_array_equal(out.layers[0].token_nll[0, 0, :4], np.float32([1.0, 7.0, 9.0, 0.2]))
    np.testing.assert_array_equal(out.layers[0].token_nll[0, 1, :4], np.float32([0.0, 7.0, 9.0, 1.5]))
    np.testing.assert_array_equal(out.layers[0].scores[0, 1, :4], [3.0, 60.0, 0.0, 5.0])
    # CR-RoPE: kept entries renumbered 0..|C|-1 in their original order, whatever positions they had
    np.testing.assert_array_equal(out.layers[0].positions[0, :4], np.arange(4))


@pytest.mark.parametrize(("alpha", "head0", "head1"), [(0.0, [1, 4, 5, 8], [0, 2, 7, 9]), (1.0, [2, 4, 5, 7], None)])
def test_alpha_zero_is_cap_alone_and_one_is_nuc_alone(alpha: float, head0: list[int], head1: list[int] | None) -> None:
    nll = np.array([0.0, 1.0, 7.0, 0.5, 2.0, 9.0, 0.1, 3.0, 0.2, 1.5, 0.0, 0.0])
    cap = np.zeros((1, 2, 12))
    cap[0, 0, [5, 8, 1, 4]] = [50.0, 6.0, 4.0, 1.0]
    cap[0, 1, [2, 9, 0, 7]] = [60.0, 5.0, 3.0, 2.0]
    out = compress(InfiniPot(4, alpha=alpha, catalyst_ids=CATALYST), _tagged_cache(1, 2, 12, 10, cap, nll), 10)
    assert _kept(out, head=0) == head0
    assert _kept(out, head=1) == (head1 or head0)  # NuC alone: one choice for all heads


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(3, 40),
    budget=st.integers(2, 30),
    alpha=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_kept_set_is_the_nuc_top_then_the_cap_top(length: int, budget: int, alpha: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    capacity = 48
    cap, nll = rng.random((2, 3, capacity)), rng.random((2, 3, capacity))  # distinct values: no ties
    policy = InfiniPot(max(budget, 4), alpha=alpha, catalyst_ids=CATALYST)
    out = compress(policy, _tagged_cache(2, 3, capacity, length, cap[:, None], nll[:, None]), jnp.int32(length))
    keep = min(length, policy.budget)
    assert int(out.length) == keep
    for layer in range(2):
        for head in range(3):
            kept = _kept(out, layer, head)
            assert kept == sorted(set(kept)) and all(0 <= k < length for k in kept)
            if length <= policy.budget:
                continue
            picks = set(np.argsort(-nll[layer, head, :length])[: policy.nuc_slots()].tolist())
            rest = [s for s in np.argsort(-cap[layer, head, :length]).tolist() if s not in picks]
            assert set(kept) == picks | set(rest[: keep - len(picks)])


def test_nuc_of_new_tokens_is_the_models_own_nll(model: Llama) -> None:
    tokens = np.random.default_rng(3).integers(0, model.config.vocab_size, (1, 29))
    engine = Engine(model, chunk_size=8, policy=InfiniPot(budget=32, catalyst_ids=CATALYST))
    _, cache = engine.prefill(tokens, engine.new_cache(1, 29))  # within the budget: nothing is compressed
    want = Engine(model, chunk_size=8).token_nlls(tokens)[0]  # the full cache's -log p(x_t | x_<t), t >= 1
    # float32 log-softmax over 101 logits from different fusions of the same layers: round-off ~1e-6; the
    # chunk boundaries (slots 8, 16, 24) take their prediction from the previous chunk's last logits
    for layer in range(model.config.num_layers):
        for head in range(model.config.num_kv_heads):
            got = np.asarray(cache.layers[layer].token_nll[0, head, :29])
            chex.assert_trees_all_close(got[1:], want, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(got[0], np.log(model.config.vocab_size), rtol=1e-6)  # uniform: no prediction


def test_token_novelty_reads_the_previous_position() -> None:
    logits = jnp.log(jnp.asarray([[[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]]], jnp.float32))
    previous = jnp.log(jnp.asarray([[0.3, 0.7]], jnp.float32))
    got = token_novelty(jnp.asarray([[0, 1, 0]]), logits, previous)
    chex.assert_trees_all_close(got, -np.log([[0.3, 0.9, 0.8]]), atol=1e-6)


def test_the_catalyst_probe_scores_the_pot_and_leaves_no_trace(model: Llama, monkeypatch) -> None:
    seen = []
    probe = lcm.steps.probe_chunk

    def spy(graphdef, params, tokens, positions, rope_seq_len, cache):
        before = (int(cache.length), stacked(cache, "keys"), stacked(cache, "positions"))
        out = probe(graphdef, params, tokens, positions, rope_seq_len, cache)
        seen.append((before, np.asarray(positions), int(out.length), stacked(out, "keys"), stacked(out, "scores")))
        return out

    monkeypatch.setattr(lcm.steps, "probe_chunk", spy)
    engine = Engine(model, chunk_size=8, policy=InfiniPot(budget=12, catalyst_ids=CATALYST))
    tokens = np.random.default_rng(4).integers(0, model.config.vocab_size, (1, 40))
    engine.prefill(tokens, engine.new_cache(1, engine.prompt_capacity(40)))
    assert len(seen) == 3  # after chunks 2..4 (16, 20, 20 entries > 12); none after the last (no next chunk)
    group = model.config.num_heads // model.config.num_kv_heads
    for (length, keys, _), positions, length_after, keys_after, scores in seen:
        assert length_after == length  # the catalyst's own entries are dropped
        np.testing.assert_array_equal(keys_after[:, :, :, :length], keys[:, :, :, :length])
        np.testing.assert_array_equal(positions[0], np.arange(length, length + len(CATALYST)))  # after the pot
        # each catalyst query's attention is a distribution over the pot and the catalyst before it: summed
        # over the catalyst and the group's heads, every (layer, KV head) gets len(CATALYST) * group; nothing else
        chex.assert_trees_all_close(scores.sum(-1), np.full(scores.shape[:3], len(CATALYST) * group), rtol=1e-5)
        assert not scores[..., length + len(CATALYST) :].any()


def test_cr_rope_renumbers_the_pot_and_new_tokens_continue_from_it(model: Llama, monkeypatch) -> None:
    starts = []
    chunk_fn = lcm.steps.prefill_chunk

    def spy(graphdef, params, tokens, positions, *rest, **kwargs):
        starts.append(int(np.asarray(positions)[0, 0]))
        return chunk_fn(graphdef, params, tokens, positions, *rest, **kwargs)

    monkeypatch.setattr(lcm.steps, "prefill_chunk", spy)
    engine = Engine(model, chunk_size=8, policy=InfiniPot(budget=16, catalyst_ids=CATALYST))
    assert engine.keys_pre_rope  # CR-RoPE re-rotates stored keys from their new positions
    tokens = np.random.default_rng(6).integers(0, model.config.vocab_size, (1, 45))
    _, cache = engine.prefill(tokens, engine.new_cache(1, engine.prompt_capacity(45)))
    assert starts == [0, 8, 16, 16, 16, 16]  # after each CCD cycle new tokens continue from |C| = 16
    assert int(cache.length) == 16 + 5  # no cycle after the last chunk (5 tokens): it stays in the pot
    np.testing.assert_array_equal(np.asarray(cache.layers[0].positions)[0, :21], np.arange(21))


def test_a_budget_covering_the_context_reproduces_the_full_cache(model: Llama) -> None:
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, (1, 37))
    engine = Engine(model, chunk_size=8, policy=InfiniPot(budget=40, catalyst_ids=CATALYST))
    full = Engine(model, chunk_size=8, keys_pre_rope=True)  # the full cache stored the same way (pre-RoPE)
    got, _ = engine.prefill(tokens, engine.new_cache(1, 37))
    want, _ = full.prefill(tokens, full.new_cache(1, 37))
    # the unused attention statistic and the all-position LM head change how XLA fuses the program: float32
    # round-off on O(1) logits, nothing else
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(engine.generate(tokens, 6), full.generate(tokens, 6))


def test_a_long_input_is_distilled_in_bounded_memory(model: Llama, monkeypatch) -> None:
    """The issue's "64k tokens with a 2k budget in bounded memory", at tiny scale: 20x the budget, chunk 8."""
    budget, chunk = 16, 8
    sizes = []
    compress_fn = lcm.steps.compress_cache

    def spy(policy, cache, prompt_seen, *final):
        before = (cache.capacity, int(cache.length))
        out = compress_fn(policy, cache, prompt_seen, *final)
        sizes.append((*before, out.capacity, int(out.length), out.num_bytes))
        return out

    monkeypatch.setattr(lcm.steps, "compress_cache", spy)
    engine = Engine(model, chunk_size=chunk, policy=InfiniPot(budget=budget, catalyst_ids=CATALYST))
    # the pot |M| = budget + chunk, plus room for the catalyst's transient entries, rounded up to chunks
    capacity = -(-(budget + chunk + len(CATALYST)) // chunk) * chunk
    for length in (2 * budget, 20 * budget):
        assert engine.prompt_capacity(length) == budget + chunk + len(CATALYST)  # independent of the length
        sizes.clear()
        tokens = np.random.default_rng(length).integers(0, model.config.vocab_size, (1, length))
        cache = engine.new_cache(1, engine.prompt_capacity(length))
        assert cache.capacity == capacity == 32
        _, cache = engine.prefill(tokens, cache)
        assert len(sizes) == (length - budget) // chunk - 1  # a cycle per chunk once the pot is full, but the last
        for capacity_in, length_in, capacity_out, length_out, num_bytes in sizes:
            assert capacity_in == capacity_out == capacity
            assert length_in <= budget + chunk and length_out == budget
            assert num_bytes == sizes[0][-1]
        assert int(cache.length) == budget + chunk  # the last chunk stays: the pot |M| holds it
    assert engine.generate(tokens, 4).shape == (1, 4)


def test_registered_and_its_defaults() -> None:
    assert POLICIES["infinipot"] is InfiniPot
    policy = make_policy("infinipot", 64)
    assert (policy.alpha, policy.catalyst_ids, policy.streaming, policy.renumber) == (0.5, None, True, True)
    assert InfiniPot(10, alpha=0.3, catalyst_ids=(1,)).nuc_slots() == 3  # 0.3 * 10 in float is 3, not 2.999…


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: InfiniPot(64, alpha=1.5, catalyst_ids=CATALYST), r"alpha=1.5 must be a number in \[0, 1\]"),
        (lambda: InfiniPot(64, alpha=-0.1, catalyst_ids=CATALYST), r"alpha=-0.1 must be a number in \[0, 1\]"),
        (lambda: InfiniPot(64, alpha="half", catalyst_ids=CATALYST), "alpha='half' must be a number"),
        (lambda: InfiniPot(64, catalyst_ids=()), r"catalyst_ids=\(\) must be a non-empty tuple"),
        (lambda: InfiniPot(64, catalyst_ids=[1, 2]), "must be a non-empty tuple"),
        (lambda: InfiniPot(64, catalyst_ids=(1, -2)), "must be non-negative integer token ids"),
        (lambda: InfiniPot(1, catalyst_ids=CATALYST), "budget=1 is smaller than the 2 tokens"),
        (lambda: InfiniPot(3, alpha=0.25, catalyst_ids=CATALYST), "budget=3 is smaller than the 4 tokens"),
        (lambda: make_policy("infinipot", 0), "needs a positive budget"),
        (lambda: make_policy("infinipot", 16).probe_tokens(), "catalyst_ids is needed to compress the pot"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_a_catalyst_outside_the_vocabulary_or_missing_is_a_one_line_error(model: Llama) -> None:
    tokens = np.zeros((1, 40), np.int32)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\)"):
        engine = Engine(model, chunk_size=8, policy=InfiniPot(16, catalyst_ids=(3, 500)))
        engine.prefill(tokens, engine.new_cache(1, engine.prompt_capacity(40)))
    engine = Engine(model, chunk_size=8, policy=make_policy("infinipot", 16))
    with pytest.raises(ValueError, match="catalyst_ids is needed"):
        engine.generate(tokens, 2)
