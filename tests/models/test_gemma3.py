"""Gemma 3 in lcm, without torch: inference over a cache (chunks, then one-token steps) is the training forward's
function, documents packed in a row do not see each other, greedy decoding through the Engine is the argmax of the
full forward, and configs are validated (transformers parity: tests/io/test_gemma3_parity.py)."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache.kv import UNBOUNDED
from lcm.generate import Engine
from lcm.models import families
from lcm.models.gemma3 import FULL, SLIDING, Gemma3Config, pattern_layer_types, random_model

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_base=1e6,
    local_rope_base=1e4,
    sliding_window=5,
    layer_types=pattern_layer_types(4, 2),
    query_pre_attn_scalar=16.0,
    max_position_embeddings=64,
)
# float32, the same weights; the paths differ in tiling and summation order only (a few ulp at logits of a few
# units): 1e-4 is the tolerance of the LLaMA cache-vs-forward tests
TOL = {"atol": 1e-4, "rtol": 0.0}


def _full_logits(model, tokens: np.ndarray) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model(jnp.asarray(tokens), positions)[0])


def test_cached_chunks_and_steps_are_the_training_forward() -> None:
    model = random_model(Gemma3Config(**TINY), seed=3)
    tokens = np.random.default_rng(0).integers(0, 96, (2, 21)).astype(np.int32)
    expected = _full_logits(model, tokens)
    cache = model.init_cache(2, 24)
    got = []
    for start, end in ((0, 8), (8, 16), (16, 19), (19, 20), (20, 21)):  # chunks past the window, then steps
        positions = jnp.broadcast_to(jnp.arange(start, end), (2, end - start))
        logits, cache = model(jnp.asarray(tokens[:, start:end]), positions, cache)
        got.append(np.asarray(logits))
    chex.assert_trees_all_close(np.concatenate(got, axis=1), expected, **TOL)


def test_window_layers_hold_only_their_window() -> None:
    """The sliding-window layers' buffers are ``window`` slots between calls, whatever the length; the global ones
    the full capacity; the outputs are the training forward's (chunks longer and shorter than the window)."""
    cfg = Gemma3Config(**TINY)
    model = random_model(cfg, seed=5)
    tokens = np.random.default_rng(2).integers(0, 96, (1, 30)).astype(np.int32)
    expected = _full_logits(model, tokens)
    cache = model.init_cache(1, 32)
    assert [i for i, kind in enumerate(cfg.layer_types) if kind == SLIDING] == list(model.window_layers()) == [0, 2]
    start = 0
    for size in (8, 3, 1, 1, 12, 1, 4):
        positions = jnp.arange(start, start + size)[None]
        logits, cache = model(jnp.asarray(tokens[:, start : start + size]), positions, cache)
        chex.assert_trees_all_close(np.asarray(logits), expected[:, start : start + size], **TOL)
        start += size
        for i, layer in enumerate(cache.layers):
            slots = cfg.sliding_window if i in model.window_layers() else 32
            chex.assert_shape([layer.keys, layer.values], (1, cfg.num_kv_heads, slots, cfg.head_dim))
            assert int(layer.length) == start and layer.capacity == (UNBOUNDED if i in model.window_layers() else 32)
        window = cache.layers[0]  # the latest window entries, right-aligned, with their positions
        np.testing.assert_array_equal(np.asarray(window.positions[0, -min(start, 5) :]), np.arange(start)[-5:])


def test_left_padded_rows_are_each_alone() -> None:
    model = random_model(Gemma3Config(**TINY), seed=6)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 96, n).tolist() for n in (13, 30, 7)]
    engine = Engine(model, chunk_size=8)
    together = engine.generate_many(prompts, 5, batch_size=3)
    alone = [engine.generate(np.asarray([p]), 5)[0] for p in prompts]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["h2o", "snapkv:window=4", "knorm", "tova", "pyramidkv:window=4,beta=2"])
def test_evicting_policies_act_on_the_global_layers(name: str) -> None:
    """A policy that keeps positions compresses the global layers to its budget and leaves the window layers
    alone; with a budget covering the prompt it computes what the full cache computes."""
    from lcm.cache.policies import parse_policy

    model = random_model(Gemma3Config(**TINY), seed=8)
    tokens = np.random.default_rng(5).integers(0, 96, (1, 40)).astype(np.int32)
    full = Engine(model, chunk_size=8).generate(tokens, 4)
    covering = Engine(model, chunk_size=8, policy=parse_policy(name, 48)).generate(tokens, 4)
    np.testing.assert_array_equal(covering, full)
    engine = Engine(model, chunk_size=8, policy=parse_policy(name, 12))
    cache = engine.new_cache(1, engine.prompt_capacity(40) + 4)
    _, cache = engine.prefill(tokens, cache)
    for i, layer in enumerate(cache.layers):
        if i in model.window_layers():  # untouched: the window of the whole prompt, no policy state
            assert int(layer.length) == 40 and layer.keys.shape[2] == TINY["sliding_window"] and layer.scores is None
        else:
            assert int(layer.length) <= 12 + 8  # the budget (a streaming policy holds a chunk more until it compresses)
    engine.generate(tokens, 4)  # and decoding runs


@pytest.mark.parametrize("name", ["streamingllm", "tokenselect", "infinipot", "locret"])
def test_policies_that_renumber_or_probe_are_refused_on_window_layers(name: str) -> None:
    from lcm.cache.policies import parse_policy

    model = random_model(Gemma3Config(**TINY))
    with pytest.raises(ValueError, match=r"renumbers positions or probes the cache, .* layers \[0, 2\]") as err:
        Engine(model, policy=parse_policy(name, 64))
    assert "\n" not in str(err.value)


def test_packed_documents_do_not_see_each_other() -> None:
    model = random_model(Gemma3Config(**TINY), seed=4)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 96, (1, 20)).astype(np.int32)
    segments = jnp.asarray([[0] * 9 + [1] * 11])
    positions = jnp.asarray([list(range(9)) + list(range(11))])
    hidden = model.train_hidden_states(jnp.asarray(tokens), positions, segments)
    changed = tokens.copy()
    changed[0, :9] = rng.integers(0, 96, 9)
    hidden_changed = model.train_hidden_states(jnp.asarray(changed), positions, segments)
    np.testing.assert_array_equal(np.asarray(hidden[0, 9:]), np.asarray(hidden_changed[0, 9:]))
    # and the second document alone gives the same states (positions restart)
    alone = model.train_hidden_states(jnp.asarray(tokens[:, 9:]), jnp.arange(11)[None])
    chex.assert_trees_all_close(alone[0], hidden[0, 9:], **TOL)


def test_engine_greedy_is_the_full_forwards_argmax() -> None:
    model = random_model(Gemma3Config(**TINY), seed=1)
    tokens = np.random.default_rng(0).integers(0, 96, (1, 37)).astype(np.int32)
    out = Engine(model, chunk_size=8).generate(tokens, 6)
    ids = tokens
    for _ in range(6):
        ids = np.concatenate([ids, _full_logits(model, ids)[:, -1].argmax(-1)[:, None].astype(np.int32)], axis=1)
    np.testing.assert_array_equal(out, ids[:, 37:])


def test_preset_and_families() -> None:
    cfg = families.preset("gemma3-270m")
    assert isinstance(cfg, Gemma3Config)
    assert cfg.layer_types.count(FULL) == 3 and cfg.layer_types[5] == FULL and cfg.layer_types[0] == SLIDING
    assert families.preset("smollm2-135m").num_layers == 30
    with pytest.raises(ValueError, match="unknown model preset 'gemma9'; choose one of"):
        families.preset("gemma9")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"layer_types": (SLIDING,) * 3}, "layer_types must give one of"),
        ({"sliding_window": 0}, "sliding_window=0 must be positive"),
        ({"num_kv_heads": 3}, "num_heads=4 must be a multiple of num_kv_heads=3"),
        ({"query_pre_attn_scalar": 0.0}, "query_pre_attn_scalar=0.0 must be positive"),
        ({"dtype": "float16"}, "dtype='float16' is not supported"),
    ],
)
def test_config_errors_are_one_line(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        Gemma3Config(**(TINY | change))
    assert "\n" not in str(err.value)


def test_scanned_groups_are_the_unrolled_layers() -> None:
    """One scan step per group of the layer pattern (local, global here): the training forward, its gradient, and
    inference over window and full buffers give the unrolled loop's results."""
    import dataclasses

    import jax

    cfg = Gemma3Config(**(TINY | {"num_layers": 6, "layer_types": pattern_layer_types(6, 3)}))
    assert cfg.period == 3 and Gemma3Config(**TINY).period == 2 and families.preset("gemma3-270m").period == 6
    model = random_model(cfg, seed=7)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 96, (1, 16)), jnp.int32)
    positions = jnp.arange(16)[None]

    def loss(model, scan: bool) -> jax.Array:
        return jnp.sum(model.train_hidden_states(tokens, positions, scan=scan) ** 2)

    from flax import nnx

    grads = [nnx.grad(loss)(model, scan) for scan in (False, True)]
    chex.assert_trees_all_close(loss(model, True), loss(model, False), rtol=1e-6)
    chex.assert_trees_all_close(nnx.state(grads[0]), nnx.state(grads[1]), atol=1e-4, rtol=1e-4)
    scanned = families.with_config(model, dataclasses.replace(cfg, scan_layers=True))
    outputs = []
    for each in (model, scanned):
        cache, logits = each.init_cache(1, 24), []
        for start, size in ((0, 8), (8, 7), (15, 1)):
            out, cache = each(tokens[:, start : start + size], positions[:, start : start + size], cache)
            logits.append(np.asarray(out))
        outputs.append(np.concatenate(logits, axis=1))
        assert cache.layers[0].keys.shape[2] == cfg.sliding_window  # the window buffers went through the scan
    chex.assert_trees_all_close(outputs[1], outputs[0], **TOL)


def test_rope_layers_option_parses_and_applies() -> None:
    from lcm.evals.suite import model_with_rope, parse_model_rope

    assert parse_model_rope("linear:factor=2") == ("linear", {"factor": 2.0}, "global")
    assert parse_model_rope("linear:layers=all,factor=2") == ("linear", {"factor": 2.0}, "all")
    model = random_model(Gemma3Config(**TINY))
    assert not model_with_rope(model, "linear:factor=2").config.rope_local_layers
    assert model_with_rope(model, "linear:factor=2,layers=all").config.rope_local_layers
    with pytest.raises(ValueError, match="layers='some'; choose one of"):
        parse_model_rope("yarn:factor=2,layers=some")
