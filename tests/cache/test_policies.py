"""KV policies: the attention statistic against a dense reference, hand-worked selections, budget invariants
(hypothesis), the full-cache equivalence when the budget covers the context, and bad input.

Hand-worked examples tag every cached key with its slot (``keys[..., 0] = slot``), so after compression the kept
slots can be read back from the keys themselves.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from stacked import kept, stacked, tagged_cache

from lcm.cache.locret import Locret
from lcm.cache.policies import H2O, POLICIES, KVPolicy, SnapKV, StreamingLLM, compress, make_policy, parse_policy
from lcm.generate import Engine
from lcm.models.llama import Llama
from lcm.models.retaining import RetainingHeads, attach_retaining_heads
from lcm.ops import masks
from lcm.ops.kv_scores import attention_mass, reference_attention_mass


def _tagged_cache(layers: int, heads: int, capacity: int, length: int, scores: np.ndarray | None = None):
    if scores is not None:
        scores = np.asarray(scores).reshape(layers, 1, heads, capacity)
    return tagged_cache(layers, heads, capacity, length, scores=scores)


_kept = kept


def test_streamingllm_keeps_sinks_and_the_most_recent_and_renumbers() -> None:
    policy = StreamingLLM(budget=6, sinks=2)
    out = compress(policy, _tagged_cache(2, 3, 16, length=10), jnp.int32(10))
    assert int(out.length) == 6
    for layer in range(2):
        for head in range(3):
            assert _kept(out, layer, head) == [0, 1, 6, 7, 8, 9]  # 2 sinks + the 4 newest of slots 0..9
    np.testing.assert_array_equal(out.layers[0].values[0, 0, :6, 0], [100, 101, 106, 107, 108, 109])
    np.testing.assert_array_equal(out.layers[0].positions[0, :6], np.arange(6))  # positions within the cache


def test_h2o_keeps_heavy_hitters_per_head_and_the_recent_window() -> None:
    scores = np.zeros((1, 2, 12))
    scores[0, 0, [1, 4, 5]] = [3.0, 9.0, 1.0]  # head 0: heavy hitters 4 > 1 > 5
    scores[0, 1, [2, 3, 7]] = [2.0, 8.0, 5.0]  # head 1: heavy hitters 3 > 7 > 2
    scores[0, :, 8:] = 50.0  # slots 8, 9 are recent anyway; 10, 11 are empty (length 10) and must never be kept
    out = compress(H2O(budget=4, recent=2), _tagged_cache(1, 2, 12, length=10, scores=scores), jnp.int32(10))
    assert _kept(out, head=0) == [1, 4, 8, 9]  # top-2 heavy hitters of slots 0..7, then the 2 most recent
    assert _kept(out, head=1) == [3, 7, 8, 9]
    np.testing.assert_array_equal(out.layers[0].scores[0, 0, :4], [3.0, 9.0, 50.0, 50.0])  # scores move with entries


def test_snapkv_pools_votes_and_keeps_the_window() -> None:
    scores = np.zeros((1, 1, 10))
    scores[0, 0, :] = [0, 0, 9, 0, 0, 0, 4, 4, 1, 1]  # slots 8, 9 are the observation window
    # avg-pool, kernel 3, over slots 0-7 only, zero padding past both ends (the official attn[..., :-window]):
    # slot 1 -> 3, 2 -> 3, 3 -> 3, 5 -> 4/3, 6 -> 8/3, 7 -> 8/3 (4+4+0)/3, not 3: the window's votes are not pooled in
    out = compress(SnapKV(budget=6, window=2, kernel=3), _tagged_cache(1, 1, 10, 10, scores), jnp.int32(10))
    assert _kept(out) == [1, 2, 3, 6, 8, 9]  # the four pooled maxima (the tie 6/7 to the lower slot), the window
    out = compress(SnapKV(budget=3, window=2, kernel=1), _tagged_cache(1, 1, 10, 10, scores), jnp.int32(10))
    assert _kept(out) == [2, 8, 9]  # no pooling: the single vote winner


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 40),
    extra=st.integers(1, 20),
    sinks=st.integers(0, 4),
    window=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_no_policy_exceeds_its_budget_or_drops_what_it_promises(length, extra, sinks, window, seed) -> None:
    rng = np.random.default_rng(seed)
    capacity = 48
    scores = rng.standard_normal((2, 3, capacity))
    for policy in (
        StreamingLLM(budget=sinks + extra, sinks=sinks),
        H2O(budget=window + extra, recent=window),
        SnapKV(budget=window + extra, window=window, kernel=3),
        Locret(budget=window + extra, stabilizers=window, n_loc=0),  # stabilisers: the `window` newest
    ):
        out = compress(policy, _tagged_cache(2, 3, capacity, length, scores), jnp.int32(length))
        assert int(out.length) == min(length, policy.budget)
        for layer in range(2):
            for head in range(3):
                kept = _kept(out, layer, head)
                assert kept == sorted(set(kept)) and all(0 <= k < length for k in kept)
                promised = set(range(min(sinks, length))) if isinstance(policy, StreamingLLM) else set()
                promised |= (
                    set(range(max(0, length - window), length)) if not isinstance(policy, StreamingLLM) else set()
                )
                assert promised <= set(kept)


def test_attention_mass_matches_the_dense_reference() -> None:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 19, 6, 8)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((2, 3, 40, 8)), jnp.float32)
    observers = jnp.asarray(rng.random((2, 19)) < 0.4)
    mask = masks.causal() & masks.offsets(q_offset=11, kv_length=30)
    got = attention_mass(q, keys, observers, q_block=8, mask=mask)
    want = reference_attention_mass(q, keys, observers, mask=mask)
    # float32 softmax of O(1) logits over <= 30 keys, summed over <= 19 x 2 rows: round-off ~1e-6
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    assert float(got[:, :, 30:].max()) == 0.0  # nothing beyond the filled length


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"full"}))
def test_a_budget_covering_the_context_reproduces_the_full_cache(model: Llama, name: str) -> None:
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, (1, 37))
    policy = make_policy(name, budget=40)
    scored = model
    if name == "locret":  # Locret ranks by its retaining heads; random ones do here (nothing is evicted)
        scored = attach_retaining_heads(model, RetainingHeads(model.config, hidden_width=16, rngs=nnx.Rngs(0)))
    engine = Engine(scored, chunk_size=8, policy=policy)
    # the full cache stored the same way (pre-RoPE keys for renumbering policies): same program, same numbers
    full = Engine(model, chunk_size=8, keys_pre_rope=policy.renumber)
    got, _ = engine.prefill(tokens, engine.new_cache(1, 37))
    want, _ = full.prefill(tokens, full.new_cache(1, 37))
    if policy.needs_scores or name == "locret":
        # the attention statistic is an extra consumer inside the layer, and XLA fuses the layer differently:
        # float32 round-off on O(1) logits (measured 6e-7), nothing else
        chex.assert_trees_all_close(got, want, atol=5e-6, rtol=5e-6)
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(engine.generate(tokens, 6), full.generate(tokens, 6))


@pytest.mark.parametrize("name", ["streamingllm", "h2o"])
def test_streaming_policies_hold_at_most_budget_plus_a_chunk(model: Llama, name: str) -> None:
    engine = Engine(model, chunk_size=8, policy=make_policy(name, budget=12))
    for length in (30, 90):
        tokens = np.random.default_rng(length).integers(0, model.config.vocab_size, (1, length))
        cache = engine.new_cache(1, engine.prompt_capacity(length))
        assert cache.capacity == 24  # budget 12 + one chunk of 8, rounded up to chunks: the same for any length
        _, cache = engine.prefill(tokens, cache)
        assert int(cache.length) == 12
    assert engine.generate(tokens, 4).shape == (1, 4)


def test_snapkv_prefills_everything_then_keeps_its_budget(model: Llama) -> None:
    engine = Engine(model, chunk_size=8, policy=SnapKV(budget=10, window=4))
    tokens = np.random.default_rng(5).integers(0, model.config.vocab_size, (1, 30))
    cache = engine.new_cache(1, engine.prompt_capacity(30))
    assert cache.capacity == 32
    _, cache = engine.prefill(tokens, cache)
    assert int(cache.length) == 10 and float(stacked(cache, "scores").sum()) > 0
    assert engine.generate(tokens, 3).shape == (1, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_policy("snapkv2", 512), "unknown KV policy 'snapkv2'"),
        (lambda: make_policy("streamingllm", 4, sinks=4), "budget=4 is smaller than the 5 tokens"),
        (lambda: make_policy("snapkv", 32), "budget=32 is smaller than the 33 tokens"),
        (lambda: make_policy("h2o", 8, recent=8), "budget=8 is smaller than the 9 tokens"),
        (lambda: make_policy("streamingllm", 64, sinks=2.5), "sinks=2.5 must be an integer"),
        (lambda: make_policy("streamingllm", 64, window=3), "unknown parameter 'window'"),
        (lambda: parse_policy("streamingllm:sinks=four", 64), "sinks='four' must be a number"),
        (lambda: make_policy("h2o", 0), "needs a positive budget"),
        (lambda: make_policy("full", 256), "makes no sense for the full cache"),
        (lambda: SnapKV(budget=64, kernel=4), "kernel=4 must be an odd"),
        (lambda: make_policy("infinipot", 64, catalyst=3), "catalyst=3 must be text"),
        (lambda: parse_policy("infinipot:catalyst= ", 64), "catalyst=' ' must be non-empty text"),
    ],
)
def test_bad_policies_are_one_line_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()


@pytest.mark.parametrize(
    ("name", "params"),
    [("streamingllm", {}), ("snapkv", {}), ("h2o", {}), ("tokenselect", {}), ("infinipot", {}),
     ("locret", {"stabilizers": 5})],
)  # fmt: skip
def test_the_budget_a_too_small_budget_error_names_is_accepted(name: str, params: dict) -> None:
    """The error names the smallest budget that works: that budget is accepted, one less is not."""
    with pytest.raises(ValueError, match="use a budget of at least") as err:
        make_policy(name, 1, **params)
    smallest = int(str(err.value).rsplit(" ", 1)[-1])
    assert make_policy(name, smallest, **params).budget == smallest
    if smallest > 1:
        with pytest.raises(ValueError, match=f"budget={smallest - 1} is smaller"):
            make_policy(name, smallest - 1, **params)


def test_policies_from_specs_get_their_tokenized_text() -> None:
    class Tokenizer:
        def encode(self, text: str, add_special: bool = True) -> list[int]:
            return [len(word) for word in text.split()]

    policy = parse_policy("infinipot:alpha=0.25", 64).with_tokenizer(Tokenizer())
    assert policy.alpha == 0.25 and policy.catalyst_ids == (9, 3, 8, 7, 12, 3, 4, 9, 6)
    # CaP-Q: the question as the catalyst, taken as written (a text parameter is never parsed as a number)
    policy = parse_policy("infinipot:catalyst=What is the pass key?,alpha=0.5", 64).with_tokenizer(Tokenizer())
    assert policy.catalyst == "What is the pass key?" and policy.catalyst_ids == (4, 2, 3, 4, 4)
    assert parse_policy("infinipot:catalyst=12", 64).catalyst == "12"
    assert parse_policy("h2o:recent=8", 64).with_tokenizer(Tokenizer()) == H2O(budget=64, recent=8)


def test_registry_names_are_the_contract() -> None:
    assert {"full", "streamingllm", "snapkv", "h2o", "tokenselect", "infinipot", "locret"} <= set(POLICIES)
    assert parse_policy("streamingllm:sinks=2", 16) == StreamingLLM(budget=16, sinks=2)
    assert isinstance(make_policy("full"), KVPolicy) and not make_policy("full").bounded


def test_register_policy_checks_its_class_and_name() -> None:
    import dataclasses
    from typing import ClassVar

    from lcm.cache.policies import POLICIES, KVPolicy, parse_policy, register_policy

    @dataclasses.dataclass(frozen=True)
    class Oldest(KVPolicy):
        name: ClassVar[str] = "oldest_test"
        keep_first: int = 0

    try:
        assert register_policy(Oldest) is Oldest and register_policy(Oldest) is Oldest  # idempotent
        policy = parse_policy("oldest_test:keep_first=3", 64)
        assert isinstance(policy, Oldest) and policy.keep_first == 3 and policy.budget == 64

        @dataclasses.dataclass(frozen=True)
        class Impostor(KVPolicy):
            name: ClassVar[str] = "oldest_test"

        with pytest.raises(ValueError, match="KV policy name 'oldest_test' is taken by"):
            register_policy(Impostor)
        with pytest.raises(ValueError, match="KV policy name 'h2o' is taken by"):
            register_policy(dataclasses.dataclass(frozen=True)(type("H2OToo", (Impostor,), {"name": "h2o"})))

        class NotFrozen(KVPolicy):
            name: ClassVar[str] = "loose"

        with pytest.raises(TypeError, match="must be a frozen dataclass"):
            register_policy(NotFrozen)
        with pytest.raises(TypeError, match="takes a KVPolicy subclass"):
            register_policy(dict)
    finally:
        POLICIES.pop("oldest_test", None)
