"""Tests for lcm.models.llama.

Config validation (one-line errors), a tiny random decoder against a float64 numpy forward written from the
LLaMA definition (causal or sliding-window mask built as a full [T, T] matrix, GQA by repeating KV heads, biases,
tied and untied heads), the pure ``forward`` against the module call, incremental decoding through the KV cache
against one full forward (keys stored rotated or pre-RoPE), bfloat16, parameter sharding names and counts.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm import steps
from lcm.models.llama import (
    Llama,
    LlamaConfig,
    abstract_model,
    forward,
    map_params,
    param_count,
    random_model,
    with_config,
)

TINY_ARGS = dict(
    rms_norm_eps=1e-5,
    tie_embeddings=True,
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_base=10000.0,
    max_position_embeddings=64,
    attention_q_block=4,  # small tiles so the short sequences here span several query and key blocks
    attention_kv_block=8,
)
TINY = LlamaConfig(**TINY_ARGS)

# float32 model vs float64 numpy, logits of std ~9 (tied head: unit-RMS hidden state . N(0, 1) embedding rows over
# 64 dims): two layers of float32 matmuls and an online softmax lose ~1e-6 relative; the measured worst absolute
# error is 1.6e-5. atol 1e-4 keeps ~6x headroom and is still ~1e-5 of the logit scale.
F32_VS_F64_TOL = {"atol": 1e-4, "rtol": 1e-5}
# Two float32 evaluations of the same function that differ only in how attention is tiled (full forward vs
# prefill + one-token decode steps, or keys rotated before vs after caching): 1e-5 absolute plus 1e-5 relative,
# a few float32 ulp of logits of std ~9. The measured worst absolute difference is 2.3e-5, on a large logit (the
# bound there is 1e-5 + 1e-5 * |x|).
F32_SAME_MATH_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _tokens(seed: int, batch: int, length: int, vocab: int = TINY.vocab_size) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def _positions(batch: int, length: int, start: int = 0) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), (batch, length))


_tiny_model = functools.cache(random_model)


@functools.cache
def _jit_forward(graphdef: nnx.GraphDef):
    return jax.jit(functools.partial(forward, graphdef))


def _full_logits(model: Llama, tokens: jax.Array, start: int = 0) -> jax.Array:
    """One jitted full forward over a fresh cache the size of the sequence."""
    graphdef, params = nnx.split(model)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    logits, _ = _jit_forward(graphdef)(params, tokens, _positions(*tokens.shape, start), cache)
    return logits


# --- an independent float64 reference ------------------------------------------------------------------------


def _numpy_llama(model: Llama, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """LLaMA forward in float64 numpy from the parameters alone (Touvron et al. 2023; HF rotate_half RoPE)."""
    cfg = model.config
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    group = cfg.num_heads // cfg.num_kv_heads
    length = tokens.shape[1]

    def rms_norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps)

    inv_freq = 1.0 / cfg.rope_base ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    angles = positions[:, :, None, None] * np.concatenate([inv_freq, inv_freq])  # [B, T, 1, hd]

    def rope(x: np.ndarray) -> np.ndarray:
        half = cfg.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * np.cos(angles) + rotated * np.sin(angles)

    query, key = np.arange(length)[:, None], np.arange(length)[None, :]
    mask = key <= query
    if cfg.sliding_window is not None:
        mask &= query - key < cfg.sliding_window

    x = p["embed"][tokens]
    for layer in p["layers"].values():
        attn = layer["attn"]
        h = rms_norm(x, layer["input_norm"]["scale"])
        q = np.einsum("btd,dhk->bthk", h, attn["q_proj"])
        k = np.einsum("btd,dhk->bthk", h, attn["k_proj"])
        v = np.einsum("btd,dhk->bthk", h, attn["v_proj"])
        if cfg.qkv_bias:
            q, k, v = q + attn["q_bias"], k + attn["k_bias"], v + attn["v_bias"]
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bqhe,hed->bqd", np.einsum("bhqk,bkhe->bqhe", probs, v), attn["o_proj"])
        x = x + out + (attn["o_bias"] if cfg.o_bias else 0.0)
        mlp = layer["mlp"]
        h = rms_norm(x, layer["post_attention_norm"]["scale"])
        gate, up = h @ mlp["gate_proj"], h @ mlp["up_proj"]
        if cfg.mlp_bias:
            gate, up = gate + mlp["gate_bias"], up + mlp["up_bias"]
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ mlp["down_proj"] + (mlp["down_bias"] if cfg.mlp_bias else 0.0)
    x = rms_norm(x, p["final_norm"]["scale"])
    return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])


# --- config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"dtype": "float64"}, r"unknown dtype 'float64'; choose one of \['bfloat16', 'float32'\]"),
        ({"hidden_size": 66}, "hidden_size=66 is not divisible by num_heads=4"),
        ({"num_kv_heads": 3}, "num_heads=4 must be a multiple of num_kv_heads=3"),
        ({"rope_variant": "nope"}, r"unknown rope variant 'nope'; choose one of \["),
        ({"rope_variant": "linear"}, r"rope variant 'linear' needs parameter\(s\) \['factor'\]"),
        ({"rope_params": (("factor", 2.0),)}, "rope variant 'default' got unknown parameter 'factor'"),
        ({"head_dim": 7}, "head_dim=7 must be even for RoPE"),
        ({"num_layers": 0}, "num_layers=0 must be positive"),
        ({"vocab_size": -1}, "vocab_size=-1 must be positive"),
        ({"sliding_window": 0}, "sliding_window=0 must be positive or None"),
    ],
)
def test_config_errors_are_one_line(overrides: dict, message: str) -> None:
    # built from the arguments, not dataclasses.replace(TINY, ...): TINY's head_dim is already resolved to 16
    with pytest.raises(ValueError, match=message) as err:
        LlamaConfig(**(TINY_ARGS | overrides))
    assert "\n" not in str(err.value)


def test_config_fills_head_dim_and_normalises_rope_params() -> None:
    assert TINY.head_dim == 16
    assert dataclasses.replace(TINY, head_dim=32).head_dim == 32  # explicit head_dim wins (Gemma-style)
    cfg = TINY.with_rope("longrope", {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 4.0})
    params = dict(cfg.rope_params)
    assert [name for name, _ in cfg.rope_params] == sorted(params)
    assert params["short_factor"] == (1.0,) * 8  # lists become tuples, so the frozen config stays hashable
    assert params["original_max_position_embeddings"] == TINY.max_position_embeddings  # with_rope fills L0
    hash(cfg)
    assert TINY.with_rope("linear", {"factor": 2.0}).rope_params == (("factor", 2.0),)  # L0 only where used


# --- forward ----------------------------------------------------------------------------------------------


VARIANTS = {
    "tied": TINY,
    "untied_biases_mha": dataclasses.replace(
        TINY, tie_embeddings=False, qkv_bias=True, o_bias=True, mlp_bias=True, num_kv_heads=4
    ),
    "window5_gqa4": dataclasses.replace(TINY, sliding_window=5, num_kv_heads=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_numpy_reference(variant: str) -> None:
    model = _tiny_model(VARIANTS[variant])
    tokens = _tokens(1, 2, 13)
    logits = _full_logits(model, tokens)
    chex.assert_shape(logits, (2, 13, TINY.vocab_size))
    chex.assert_type(logits, jnp.float32)
    expected = _numpy_llama(model, np.asarray(tokens), np.asarray(_positions(2, 13), np.float64))
    chex.assert_trees_all_close(np.asarray(logits, np.float64), expected, **F32_VS_F64_TOL)


def test_sliding_window_changes_only_positions_past_the_window() -> None:
    full = _tiny_model(TINY)
    windowed = with_config(full, dataclasses.replace(TINY, sliding_window=5))
    tokens = _tokens(1, 2, 13)
    a, b = _full_logits(full, tokens), _full_logits(windowed, tokens)
    # the first 5 queries see all their keys either way; every later one loses some
    chex.assert_trees_all_close(a[:, :5], b[:, :5], **F32_SAME_MATH_TOL)
    assert np.all(np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max(-1) > 1e-3)


def test_module_call_equals_pure_forward() -> None:
    model = _tiny_model(TINY)
    tokens, positions = _tokens(3, 2, 13), _positions(2, 13)

    @nnx.jit
    def call(model: Llama, tokens: jax.Array, positions: jax.Array):
        hidden, _ = model.hidden_states(tokens, positions, model.init_cache(2, 13))
        return model(tokens, positions, model.init_cache(2, 13)), model(tokens, positions), model.logits(hidden)

    (logits, cache), (train_logits, no_cache), logits_from_hidden = call(model, tokens, positions)
    graphdef, params = nnx.split(model)
    pure_logits, pure_cache = _jit_forward(graphdef)(params, tokens, positions, model.init_cache(2, 13))
    # the same ops traced twice: XLA may fuse the two programs differently, so allow float32 round-off
    chex.assert_trees_all_close(logits, pure_logits, **F32_SAME_MATH_TOL)
    chex.assert_trees_all_close(logits_from_hidden, pure_logits, **F32_SAME_MATH_TOL)
    # with no cache the training forward: the same logits (fresh keys and values), and no state back
    chex.assert_trees_all_close(train_logits, pure_logits, **F32_SAME_MATH_TOL)
    assert no_cache is None
    chex.assert_trees_all_close(cache.layers, pure_cache.layers, **F32_SAME_MATH_TOL)
    assert int(cache.length) == 13 and cache.capacity == 13
    for layer in cache.layers:
        assert int(layer.length) == 13
        np.testing.assert_array_equal(layer.positions, positions)


def _decode_incrementally(model: Llama, tokens: jax.Array, prompt: int, capacity: int, keys_pre_rope: bool):
    """Prefill ``prompt`` tokens, then feed the rest one at a time through the cache; all logits and the cache."""
    batch, total = tokens.shape
    graphdef, params = nnx.split(model)
    step = _jit_forward(graphdef)
    cache = model.init_cache(batch, capacity, keys_pre_rope=keys_pre_rope)
    assert cache.keys_pre_rope is keys_pre_rope
    logits, cache = step(params, tokens[:, :prompt], _positions(batch, prompt), cache)
    pieces = [logits]
    for t in range(prompt, total):
        logits, cache = step(params, tokens[:, t : t + 1], _positions(batch, 1, t), cache)
        pieces.append(logits)
    for layer in cache.layers:
        assert int(layer.length) == total
        np.testing.assert_array_equal(layer.positions[:, :total], _positions(batch, total))
    return jnp.concatenate(pieces, axis=1), cache


def test_incremental_decoding_matches_full_forward() -> None:
    model = _tiny_model(TINY)
    tokens = _tokens(5, 2, 13)
    full = _full_logits(model, tokens)
    rotated, rotated_cache = _decode_incrementally(model, tokens, 5, 16, keys_pre_rope=False)
    chex.assert_trees_all_close(rotated, full, **F32_SAME_MATH_TOL)
    unrotated, unrotated_cache = _decode_incrementally(model, tokens, 5, 16, keys_pre_rope=True)
    chex.assert_trees_all_close(unrotated, full, **F32_SAME_MATH_TOL)
    # the pre-RoPE cache holds the same values (bit-exact in layer 0, which sees only the embeddings; deeper layers
    # inherit attention round-off) and, at position 0 (no rotation), the same keys; later keys differ
    rotated_layers, unrotated_layers = rotated_cache.layers, unrotated_cache.layers
    np.testing.assert_array_equal(rotated_layers[0].values, unrotated_layers[0].values)
    for rotated_layer, unrotated_layer in zip(rotated_layers, unrotated_layers, strict=True):
        chex.assert_trees_all_close(rotated_layer.values, unrotated_layer.values, **F32_SAME_MATH_TOL)
        chex.assert_trees_all_close(rotated_layer.keys[:, :, 0], unrotated_layer.keys[:, :, 0], **F32_SAME_MATH_TOL)
        assert np.abs(np.asarray(rotated_layer.keys[:, :, 1:13] - unrotated_layer.keys[:, :, 1:13])).max() > 1e-2


def _sines_outside_fallbacks(hlo: str) -> int:
    """Sine ops of a compiled program, not counting those in the first branch of a ``conditional`` whose second
    branch has none (a pre-RoPE layer's own-positions fallback, which runs only where its slot positions differ
    from the forward's shared table)."""
    bodies = dict(re.findall(r"\n(%\S+) [^\n]*\{\n(.*?)\n\}", hlo, flags=re.S))

    def sines(name: str, seen: frozenset = frozenset()) -> int:
        body = bodies.get(name, "")
        called = re.findall(r"(?:calls|to_apply|branch_computations)=\{?([^}\s,]+(?:, %[^}\s,]+)*)", body)
        inner = [c for group in called for c in group.split(", ") if c not in seen]
        return len(re.findall(r" sine\(", body)) + sum(sines(c, seen | {name}) for c in inner)

    total = sum(len(re.findall(r" sine\(", body)) for body in bodies.values())
    fallback = 0
    for first, second in re.findall(r"conditional\([^\n]*branch_computations=\{(%[^,]+), (%[^}]+)\}", hlo):
        if sines(second) == 0:
            fallback += sines(first)
    return total - fallback


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_rope_tables_are_computed_once_per_forward(keys_pre_rope: bool) -> None:
    """The compiled forward evaluates sin/cos in one place (both branches of ``llama._materialised``), not
    inside every layer's rotation, whatever the layer count: the fix for XLA recomputing them per consumer. With
    keys stored pre-RoPE each layer's only own sin/cos is its fallback branch, for slot positions that differ from
    the shared table's; every layer here numbers its slots alike, and the fallback is not taken (the outputs are
    those of the rotated-key cache, checked elsewhere)."""
    counts = {}
    for layers in (2, 4):
        model = _tiny_model(dataclasses.replace(TINY, num_layers=layers))
        graphdef, params = nnx.split(model)
        cache = model.init_cache(1, 16, keys_pre_rope=keys_pre_rope)
        token, position = jnp.zeros((1,), jnp.int32), jnp.full((1,), 3, jnp.int32)
        hlo = steps.decode_step.lower(graphdef, params, token, position, cache).compile().as_text()
        counts[layers] = (_sines_outside_fallbacks(hlo), len(re.findall(r" sine\(", hlo)))
    tables = 2 if keys_pre_rope else 1  # the chunk's positions, and the cache slots' for pre-RoPE keys
    assert counts[2][0] == counts[4][0] <= 2 * tables, counts
    if keys_pre_rope:  # the fallbacks exist (else the count above could not fail): one per layer
        assert [counts[n][1] - counts[n][0] for n in (2, 4)] == [2, 4], counts


def _copied_whole(hlo: str, *arrays: jax.Array) -> list[str]:
    """The shapes among ``arrays``' that the compiled ``hlo`` copies whole (XLA ``copy`` ops of that shape),
    after checking that each shape is spelled in the HLO as the check expects (else the check could not fail)."""
    shapes = ["f32[{}]".format(",".join(map(str, a.shape))) for a in arrays]
    missing = [shape for shape in shapes if shape not in hlo]
    assert not missing, missing
    copies = re.findall(r"= (f32\[[^\]]*\])\S* copy\(", hlo)
    return [shape for shape in shapes if shape in copies]


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_decode_step_writes_each_layer_in_place(keys_pre_rope: bool) -> None:
    """The compiled decode step copies no layer's ``[B, K, S, D]`` buffer. A layer's buffer has two readers after
    its write (the returned state and attention); when attention read it reshaped (``k[None]`` for a stacked
    kernel), XLA duplicated the write into both and copied keys and values four times per layer per step."""
    model = _tiny_model(dataclasses.replace(TINY, num_layers=4))
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, 32, keys_pre_rope=keys_pre_rope).replace_layers(length=jnp.int32(20))
    token, position = jnp.zeros((1,), jnp.int32), jnp.full((1,), 20, jnp.int32)
    hlo = steps.decode_step.lower(graphdef, params, token, position, cache).compile().as_text()
    assert _copied_whole(hlo, cache.layers[0].keys) == []
    # the same steps in the on-device loop: the cache is the loop's carry, updated in place
    stops, done = jnp.asarray([7], jnp.int32), jnp.zeros((1,), bool)
    lowered = steps.decode_block.lower(graphdef, params, token, position, cache, 4, jnp.int32(4), stops, done)
    assert _copied_whole(lowered.compile().as_text(), cache.layers[0].keys) == []


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_observed_prefill_chunk_writes_each_layer_and_its_scores_in_place(keys_pre_rope: bool) -> None:
    """A prefill chunk whose queries add their attention mass to the scores (H2O, SnapKV) copies neither a
    layer's ``[B, K, S, D]`` buffer nor its ``[B, K, S]`` scores (attention and the mass both read the layer's
    keys; with the stacked cache the mass once made XLA copy the whole stack per layer)."""
    model = _tiny_model(dataclasses.replace(TINY, num_layers=4))
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, 64, keys_pre_rope=keys_pre_rope)
    scores = [jnp.zeros(layer.keys.shape[:3], jnp.float32) for layer in cache.layers]
    cache = cache.replace_layers(length=jnp.int32(20), scores=scores)
    tokens, positions = jnp.zeros((1, 16), jnp.int32), jnp.arange(20, 36, dtype=jnp.int32)[None]
    observers = jnp.ones((1, 16), bool)
    hlo = (
        steps.prefill_chunk.lower(graphdef, params, tokens, positions, jnp.int32(16), jnp.int32(36), cache, observers)
        .compile()
        .as_text()
    )
    assert _copied_whole(hlo, cache.layers[0].keys, cache.layers[0].scores) == []


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_layers_of_different_capacities_compute_what_equal_ones_do(keys_pre_rope: bool) -> None:
    """Each layer owns a buffer of its own capacity: a cache whose second layer holds 16 slots and whose first holds
    32 gives the logits of a cache of 32 in both (prefill, then single-token steps), its arrays keep their shapes,
    and a pre-RoPE layer whose slot positions differ in shape from the shared table's rotates with its own."""
    model = _tiny_model(TINY)
    graphdef, params = nnx.split(model)
    tokens = _tokens(11, 1, 14)
    outs = {}
    for capacities in ((32, 32), (32, 16)):
        cache = model.init_cache(1, capacities, keys_pre_rope=keys_pre_rope)
        logits, cache = _jit_forward(graphdef)(params, tokens[:, :10], _positions(1, 10), cache)
        pieces = [logits]
        for t in range(10, 14):
            logits, cache = _jit_forward(graphdef)(params, tokens[:, t : t + 1], _positions(1, 1, t), cache)
            pieces.append(logits)
        assert [layer.keys.shape[2] for layer in cache.layers] == list(capacities)
        assert [int(layer.length) for layer in cache.layers] == [14, 14]
        outs[capacities] = jnp.concatenate(pieces, axis=1)
    chex.assert_trees_all_close(outs[32, 16], outs[32, 32], **F32_SAME_MATH_TOL)


def test_a_pre_rope_layer_uses_the_shared_table_only_for_its_own_positions() -> None:
    """``LayerInputs.slot_positions``/``slot_rotation`` are a shared cos/sin table: a layer whose positions equal
    ``slot_positions`` rotates its keys with it, any other computes its own (a wrong table given for other
    positions must change nothing)."""
    from lcm.cache.kv import init_layer
    from lcm.models.decoder_layer import LayerInputs, LayerSettings, decoder_layer
    from lcm.ops import masks, rotary

    model = _tiny_model(TINY)
    cfg = model.config
    block_graphdef, block_params = nnx.split(model.layers[0])
    rng = np.random.default_rng(0)
    state = init_layer(1, 16, cfg.num_kv_heads, cfg.head_dim)
    state = dataclasses.replace(
        state,
        keys=jnp.asarray(rng.standard_normal(state.keys.shape), jnp.float32),
        values=jnp.asarray(rng.standard_normal(state.values.shape), jnp.float32),
        positions=jnp.asarray(rng.permutation(16)[None], jnp.int32),  # slots renumbered out of order
        length=jnp.int32(9),
    )
    x = jnp.asarray(rng.standard_normal((1, 3, cfg.hidden_size)), jnp.float32)
    positions = _positions(1, 3, 20)
    inv_freq, factor = model.rope_tables(32)
    written = jax.lax.dynamic_update_slice(state.positions, positions, (0, 9))
    table = rotary.rope_cos_sin(written, inv_freq, factor)
    settings = LayerSettings(keys_pre_rope=True)

    def run(slot_positions, slot_rotation):
        inputs = LayerInputs(
            positions, rotary.rope_cos_sin(positions, inv_freq, factor), masks.causal(), inv_freq, factor,
            jnp.int32(3), slot_positions, slot_rotation,
        )  # fmt: skip
        return decoder_layer(settings, block_graphdef, block_params, x, state, inputs)[0]

    own = run(None, None)
    np.testing.assert_array_equal(run(written, table), own)  # the table of its own positions: the same numbers
    wrong = tuple(2.0 * t for t in table)
    np.testing.assert_array_equal(run(written + 1, wrong), own)  # other positions: the table is not used
    assert np.abs(np.asarray(run(written, wrong) - own)).max() > 1e-3  # else the checks above could not fail


def test_rope_variant_swap_keeps_parameters() -> None:
    model = _tiny_model(TINY)
    stretched = with_config(model, TINY.with_rope("linear", {"factor": 4.0}))
    assert stretched.config.rope_variant == "linear"
    np.testing.assert_array_equal(stretched.embed[...], model.embed[...])
    tokens = _tokens(1, 2, 13)
    a, b = _full_logits(model, tokens), _full_logits(stretched, tokens)
    # position 0 is unrotated in both, so the first logits agree; later ones differ
    chex.assert_trees_all_close(a[:, 0], b[:, 0], **F32_SAME_MATH_TOL)
    assert np.abs(np.asarray(a[:, 1:] - b[:, 1:])).max() > 1e-2


def test_bfloat16_model() -> None:
    cfg = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))
    model = random_model(cfg)
    tokens = _tokens(8, 2, 13)
    logits = _full_logits(model, tokens)
    chex.assert_shape(logits, (2, 13, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)  # the LM head accumulates in float32
    chex.assert_tree_all_finite(logits)
    # the same (bfloat16-representable) weights in float32: bfloat16 keeps 8 significant bits, so every rounding
    # moves activations by up to 2^-9 relative; over two layers logits of std ~8 move by a few tenths at most
    f32_model = with_config(map_params(model, lambda _, x: x.astype(jnp.float32)), TINY)
    f32_logits = _full_logits(f32_model, tokens)
    assert float(jnp.abs(logits - f32_logits).max()) < 0.1 * float(jnp.std(f32_logits))
    assert np.mean(np.argmax(logits, -1) == np.argmax(f32_logits, -1)) > 0.8
    # incremental decoding in bfloat16: the cache is bfloat16 and the tiling changes only the rounding order
    incremental, cache = _decode_incrementally(model, tokens, 12, 13, keys_pre_rope=False)
    assert all(layer.keys.dtype == jnp.bfloat16 and layer.values.dtype == jnp.bfloat16 for layer in cache.layers)
    chex.assert_tree_all_finite(incremental)
    chex.assert_trees_all_close(incremental, logits, atol=0.05 * float(jnp.std(logits)), rtol=0)


# --- cache checks, parameters -------------------------------------------------------------------------------


def test_call_rejects_mismatched_cache() -> None:
    model = _tiny_model(TINY)
    tokens = _tokens(10, 2, 4)
    with pytest.raises(ValueError, match="cache batch 1 != tokens batch 2"):
        model(tokens, _positions(2, 4), model.init_cache(1, 8))
    with pytest.raises(ValueError, match="4 new tokens exceed the cache capacity 3"):
        model(tokens, _positions(2, 4), model.init_cache(2, 3))


EXPECTED_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "scale": ("embed",),
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "o_proj": ("heads", "head_dim", "embed"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "o_bias": ("embed",),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "gate_bias": ("mlp",),
    "up_bias": ("mlp",),
    "down_bias": ("embed",),
}


def test_parameters_carry_logical_axis_names() -> None:
    model = abstract_model(VARIANTS["untied_biases_mha"])
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    names = set()
    for path, param in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Param)):
        name = str(path[-1].key)
        names.add(name)
        assert param.get_metadata()["out_sharding"] == EXPECTED_AXES[name], path
        assert len(EXPECTED_AXES[name]) == len(param.shape), path
    assert names == set(EXPECTED_AXES)
    assert tuple(specs["embed"].get_value()) == ("vocab", "embed")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_param_count(variant: str) -> None:
    cfg = VARIANTS[variant]
    d, f, h, k, hd, v = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    per_layer = 2 * d + d * h * hd * 2 + 2 * d * k * hd + 3 * d * f
    per_layer += (h + 2 * k) * hd if cfg.qkv_bias else 0
    per_layer += d if cfg.o_bias else 0
    per_layer += 2 * f + d if cfg.mlp_bias else 0
    expected = v * d + d + cfg.num_layers * per_layer + (0 if cfg.tie_embeddings else d * v)
    assert param_count(abstract_model(cfg)) == expected


def test_default_config_is_smollm2_135m() -> None:
    # 134.5M parameters: SmolLM2-135M's published count
    assert param_count(abstract_model(LlamaConfig.preset("smollm2-135m"))) == 134_515_008


def test_configs_come_from_presets_or_say_everything() -> None:
    smol = LlamaConfig.preset("smollm2-135m")
    assert (smol.num_layers, smol.hidden_size, smol.rope_base, smol.tie_embeddings) == (30, 576, 100000.0, True)
    assert LlamaConfig.preset("smollm2-135m", num_layers=2).num_layers == 2
    with pytest.raises(ValueError, match=r"unknown model preset 'smollm3'; choose one of \['smollm2-135m'\]"):
        LlamaConfig.preset("smollm3")
    with pytest.raises(TypeError, match="missing"):  # no silent architecture: every field or a preset
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
    for field in ("dtype", "param_dtype"):
        with pytest.raises(ValueError, match=f"{field}='float16' is not supported"):
            LlamaConfig(**(TINY_ARGS | {field: "float16"}))
        with pytest.raises(ValueError, match=f"unknown {field} 'int8'"):
            LlamaConfig(**(TINY_ARGS | {field: "int8"}))


def test_parameter_and_compute_dtypes_are_separate() -> None:
    """float32 parameters computed in bfloat16: parameters stay float32, activations and the cache are bfloat16,
    and the logits are the float32 model's to bfloat16 precision."""
    full = random_model(TINY, seed=5)
    mixed = with_config(full, dataclasses.replace(TINY, dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(mixed, nnx.Param))} == {jnp.dtype(jnp.float32)}
    tokens, positions = _tokens(6, 2, 12), _positions(2, 12)
    hidden, cache = mixed.hidden_states(tokens, positions, mixed.init_cache(2, 12))
    assert hidden.dtype == jnp.bfloat16 and cache.layers[0].keys.dtype == jnp.bfloat16
    want, _ = full(tokens, positions)
    got, _ = mixed(tokens, positions)
    # bfloat16 keeps 8 significant bits: over two layers the logits (std ~9) move by a few 1e-2 relative
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got.astype(jnp.float32) - want).max()) < 0.1 * scale


def test_the_training_forward_returns_what_a_hook_records_per_layer_scanned_or_not() -> None:
    """A recording hook changes no hidden state; its records are stacked over layers, the same scanned or
    unrolled, and layer 0's equal its keys computed by hand."""
    import dataclasses as dc

    from lcm.cache.hooks import LayerHooks
    from lcm.ops import rotary

    @dc.dataclass(frozen=True)
    class KeepKeys(LayerHooks):
        def record_forward(self, view):
            return {"keys": view.keys, "q_pre": view.q_pre}

    cfg = dataclasses.replace(TINY, num_layers=3)
    model = random_model(cfg, 2)
    tokens = _tokens(1, 2, 24)
    positions = _positions(2, 24)
    plain = model.train_hidden_states(tokens, positions)
    hidden, records = model.train_forward(tokens, positions, hooks=KeepKeys())
    hidden_scan, records_scan = model.train_forward(tokens, positions, hooks=KeepKeys(), scan=True)
    # another compiled layer (it returns more), the same ops: float32 round-off only (~1e-7 measured)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(plain), atol=1e-5, rtol=1e-5)
    chex.assert_shape(records["keys"], (3, 2, cfg.num_kv_heads, 24, cfg.head_dim))
    # scanned vs unrolled: the same float32 ops, fused differently; ~1e-6 on unit-scale values
    chex.assert_trees_all_close(records_scan, records, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(hidden_scan, hidden, atol=1e-5, rtol=1e-5)
    # layer 0's keys by hand: embedding, norm, projection, rotation at positions 0..23
    block = model.layers[0]
    _, k_pre, _ = block.attn.project_qkv(block.input_norm(model.embed[...][tokens]))
    inv_freq, factor = model.rope_tables(24)
    keys = rotary.rotate(k_pre, *rotary.rope_cos_sin(positions, inv_freq, factor)).swapaxes(1, 2)
    np.testing.assert_allclose(np.asarray(records["keys"][0]), np.asarray(keys), atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(records["keys"][1] - records["keys"][0]).max()) > 1e-2  # each layer its own


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_scanned_layers_compute_what_the_unrolled_loop_does(keys_pre_rope: bool) -> None:
    """``scan_layers``: the layers as one scan over stacked parameters and states give the unrolled loop's logits
    and caches (prefill, then single-token steps), and the caches keep one state per layer."""
    cfg = dataclasses.replace(TINY, num_layers=3)
    model = random_model(cfg, 5)
    scanned = with_config(model, dataclasses.replace(cfg, scan_layers=True))
    tokens = _tokens(12, 2, 14)
    unrolled_logits, unrolled_cache = _decode_incrementally(model, tokens, 10, 16, keys_pre_rope)
    scanned_logits, scanned_cache = _decode_incrementally(scanned, tokens, 10, 16, keys_pre_rope)
    chex.assert_trees_all_close(scanned_logits, unrolled_logits, **F32_SAME_MATH_TOL)
    assert len(scanned_cache.layers) == 3
    chex.assert_trees_all_close(scanned_cache, unrolled_cache, **F32_SAME_MATH_TOL)


@pytest.mark.parametrize("policy", ["h2o", "tokenselect", "pyramidkv"])
def test_scanned_layers_serve_every_policy_as_the_unrolled_loop(policy: str) -> None:
    """Through the Engine: a policy's recorded state (attention mass, TokenSelect's selection) is scanned with
    the layers, and layers of different capacities (PyramidKV) fall back to the loop: the same greedy tokens."""
    from lcm.cache.policies import parse_policy
    from lcm.generate import Engine

    cfg = dataclasses.replace(TINY, num_layers=3, max_position_embeddings=256)
    model = random_model(cfg, 6)
    scanned = with_config(model, dataclasses.replace(cfg, scan_layers=True))
    tokens = np.asarray(_tokens(13, 1, 120))
    outs = [Engine(m, chunk_size=32, policy=parse_policy(policy, 64)).generate(tokens, 8) for m in (model, scanned)]
    np.testing.assert_array_equal(outs[1], outs[0])
