"""Knorm, TOVA and PyramidKV beyond the kvpress parity (``test_kvpress_parity.py``): TOVA's per-step eviction while
decoding against a float64 closed form, bounded decode buffers, PyramidKV's layers holding buffers of their own
capacities, its budget arithmetic against kvpress's formula written out in float64, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache.hooks import LayerView
from lcm.cache.kv import LayerCache
from lcm.cache.policies import make_policy, parse_policy
from lcm.cache.pyramidkv import PyramidKV
from lcm.cache.tova import TovaEviction
from lcm.generate import Engine
from lcm.io.hf import load_hf_folder
from lcm.models.llama import Llama
from lcm.ops import masks

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kvpress"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tova_decode_step_drops_the_entry_the_query_attends_to_least(seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch, heads, kv_heads, capacity, dim, filled, budget = 2, 4, 2, 12, 8, 10, 9
    q = rng.standard_normal((batch, 1, heads, dim)).astype(np.float32)
    keys = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
    values = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
    positions = np.tile(np.arange(capacity, dtype=np.int32), (batch, 1))
    start = filled - 1  # the step's token sits at slot filled - 1
    view = LayerView(
        q=jnp.asarray(q),
        q_pre=jnp.asarray(q),
        k_pre=jnp.zeros((batch, 1, kv_heads, dim)),
        v=jnp.zeros((batch, 1, kv_heads, dim)),
        keys=None,
        stored_keys=jnp.asarray(keys),
        values=jnp.asarray(values),
        mask=masks.causal() & masks.offsets(q_offset=start, kv_length=filled),
        start=jnp.int32(start),
        num_valid=jnp.int32(1),
        observers=None,
        inv_freq=jnp.ones((dim // 2,)),
        attention_factor=1.0,
        module=None,
        keys_pre_rope=False,
    )
    state = LayerCache(
        keys=jnp.asarray(keys), values=jnp.asarray(values), positions=jnp.asarray(positions), length=jnp.int32(filled)
    )
    got = TovaEviction(budget).record(view, state)
    # float64: the query's softmax over the filled slots, averaged over all heads, the newest excepted
    logits = np.einsum("bhd,bhsd->bhs", q[:, 0].astype(np.float64), np.repeat(keys, heads // kv_heads, axis=1))
    logits = logits[..., :filled] / math.sqrt(dim)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    drop = probs.mean(axis=1)[:, : filled - 1].argmin(axis=-1)
    assert int(got.length) == filled - 1
    for row in range(batch):
        want = np.delete(keys[row, :, :filled], drop[row], axis=1)  # the kept entries, the newest in the hole
        kept = np.asarray(got.keys[row, :, : filled - 1])
        np.testing.assert_array_equal(np.sort(kept, axis=1), np.sort(want, axis=1))
        np.testing.assert_array_equal(kept[:, drop[row]], keys[row, :, filled - 1])
        assert int(got.positions[row, drop[row]]) == filled - 1
    # at or under the budget nothing moves
    under = TovaEviction(filled).record(view, state)
    assert int(under.length) == filled
    np.testing.assert_array_equal(np.asarray(under.keys), keys)


def test_tova_decodes_in_a_buffer_of_budget_plus_one(model: Llama) -> None:
    tokens = np.random.default_rng(5).integers(0, model.config.vocab_size, (1, 30))
    engine = Engine(model, chunk_size=8, policy=make_policy("tova", 12))
    logits, cache = engine.prefill(tokens, engine.new_cache(1, engine.prompt_capacity(30) + 40))
    cache = engine.fit(cache, 40)
    assert cache.capacities == (16, 16)  # budget + 1 = 13 slots, rounded to a chunk: whatever the output length
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out, cache = engine.decode(first, 30, cache, 40)
    assert out.shape == (1, 40) and cache.capacities == (16, 16)
    assert [int(layer.length) for layer in cache.layers] == [12, 12]
    # kvpress's use: compressed once after the prompt, then the cache grows by the generated tokens
    once = Engine(model, chunk_size=8, policy=make_policy("tova", 12, per_step=0))
    logits, cache = once.prefill(tokens, once.new_cache(1, once.prompt_capacity(30) + 40))
    _, cache = once.decode(jnp.argmax(logits, axis=-1).astype(jnp.int32), 30, once.fit(cache, 40), 40)
    assert [int(layer.length) for layer in cache.layers] == [12 + 39, 12 + 39]
    # a budget that covers prompt and output evicts nothing: the full cache's tokens
    wide = Engine(model, chunk_size=8, policy=make_policy("tova", 80))
    np.testing.assert_array_equal(wide.generate(tokens, 20), Engine(model, chunk_size=8).generate(tokens, 20))


def test_pyramidkv_layers_hold_buffers_of_their_own_capacities() -> None:
    model = load_hf_folder(FIXTURES / "tiny_llama", progress=False)
    prompt = np.asarray(json.loads((FIXTURES / "kept.json").read_text())["prompt_ids"], np.int32)[None]
    engine = Engine(model, chunk_size=8, policy=make_policy("pyramidkv", 48, window=8, kernel=5))
    logits, prefilled = engine.prefill(prompt, engine.new_cache(1, 96 + 4))
    held = [int(layer.length) for layer in prefilled.layers]
    assert held == [88, 61, 35, 8]  # kvpress's budgets (test_kvpress_parity.py checks the entries)
    unshrunk = dataclasses.replace(prefilled, layers=tuple(prefilled.layers))
    cache = engine.fit(prefilled, 4)
    assert cache.capacities == (96, 72, 40, 16)  # held + 4 new tokens, rounded up to a chunk of 8
    for layer, capacity in zip(cache.layers, cache.capacities, strict=True):
        assert layer.keys.shape == layer.values.shape == (1, 2, capacity, 16)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out, _ = engine.decode(first, 96, cache, 4)
    # the same kept entries in equal 104-slot buffers decode the same tokens: capacity is only room
    want, _ = engine.decode(first, 96, unshrunk, 4)
    np.testing.assert_array_equal(out, want)


def _kvpress_budgets(length: int, mean: float, window: int, beta: int, layers: int) -> list[int]:
    """kvpress 0.5.5 ``PyramidKVPress.get_layer_budget``, written out in float64 (Python's round)."""
    max_capacity_prompt = window + mean
    min_num = (max_capacity_prompt - window) / beta
    max_num = (max_capacity_prompt - window) * 2 - min_num
    if max_num >= length - window:
        max_num = length - window
        min_num = (max_capacity_prompt - window) * 2 - max_num
    if not (length >= max_num >= min_num >= window):
        return [max(1, round(mean))] * layers
    steps = (max_num - min_num) / (layers - 1)
    return [round(max_num - i * steps) for i in range(layers)]


@pytest.mark.parametrize(
    ("length", "budget", "window", "beta", "layers"),
    [(96, 48, 8, 20, 4), (96, 80, 64, 20, 4), (2048, 256, 32, 20, 30), (4096, 1024, 32, 20, 30), (300, 290, 8, 5, 6)],
)
def test_pyramidkv_budgets_follow_kvpress(length: int, budget: int, window: int, beta: int, layers: int) -> None:
    policy = PyramidKV(budget=budget, window=window, beta=beta)
    got = [int(policy.layer_budget(i, layers, jnp.int32(length))) for i in range(layers)]
    assert got == _kvpress_budgets(length, budget, window, beta, layers)


def test_bad_parameters_are_one_line_errors(model: Llama) -> None:
    with pytest.raises(ValueError, match=r"pyramidkv: beta=0 must be an integer >= 1"):
        parse_policy("pyramidkv:beta=0", 256)
    with pytest.raises(ValueError, match=r"knorm: needs a positive budget"):
        make_policy("knorm", 0)
    with pytest.raises(ValueError, match=r"tova: budget=1 is smaller than the 2 tokens"):
        make_policy("tova", 1)
    with pytest.raises(ValueError, match=r"tova: per_step=2 must be 1"):
        parse_policy("tova:per_step=2", 64)
    with pytest.raises(ValueError, match=r"tova: keys_pre_rope=True is not supported"):
        Engine(model, policy=make_policy("tova", 8), keys_pre_rope=True)


def test_pyramidkv_says_when_kvpress_rule_makes_it_snapkv() -> None:
    assert PyramidKV(budget=256).falls_back(30, 2048)  # 256 / 20 = 12.8 < the window of 32
    assert not PyramidKV(budget=1024).falls_back(30, 2048)
    assert not PyramidKV(budget=48, window=8).falls_back(4, 96)  # the fixture's 88, 61, 35, 8
    model = load_hf_folder(FIXTURES / "tiny_llama", progress=False)
    prompt = np.asarray(json.loads((FIXTURES / "kept.json").read_text())["prompt_ids"], np.int32)[None]
    engine = Engine(model, chunk_size=32, policy=make_policy("pyramidkv", 64, window=50))  # capped: min 82 > max 46
    with pytest.warns(UserWarning, match=r"pyramidkv: a budget of 64 over 96 tokens gives every layer the same"):
        _, cache = engine.prefill(prompt, engine.new_cache(1, 96))
    assert [int(layer.length) for layer in cache.layers] == [64] * 4


def test_a_rank_hook_of_the_wrong_shape_is_a_one_line_error(model: Llama) -> None:
    from lcm.cache.policies import KVPolicy, compress

    @dataclasses.dataclass(frozen=True)
    class PerToken(KVPolicy):  # ranks tokens, not (KV head, slot): a mistake
        name = "per_token"

        def rank(self, layer, prompt_seen, final):
            return jnp.zeros(layer.keys.shape[::2][:2])

    cache = model.init_cache(1, 16)
    with pytest.raises(ValueError, match=r"per_token: rank\(\) returned shape \(1, 16\); it must rank every slot"):
        compress(PerToken(budget=4), cache, jnp.int32(16))
