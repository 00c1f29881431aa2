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
    chex.assert_trees_all_close(cache.keys, pure_cache.keys, **F32_SAME_MATH_TOL)
    assert int(cache.length) == 13 and cache.capacity == 13
    np.testing.assert_array_equal(cache.positions, positions)


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
    assert int(cache.length) == total
    np.testing.assert_array_equal(cache.positions[:, :total], _positions(batch, total))
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
    np.testing.assert_array_equal(rotated_cache.values[0], unrotated_cache.values[0])
    chex.assert_trees_all_close(rotated_cache.values, unrotated_cache.values, **F32_SAME_MATH_TOL)
    chex.assert_trees_all_close(rotated_cache.keys[:, :, :, 0], unrotated_cache.keys[:, :, :, 0], **F32_SAME_MATH_TOL)
    assert np.abs(np.asarray(rotated_cache.keys[:, :, :, 1:13] - unrotated_cache.keys[:, :, :, 1:13])).max() > 1e-2


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_rope_tables_are_computed_once_per_forward(keys_pre_rope: bool) -> None:
    """The compiled forward evaluates sin/cos in one place (both branches of ``llama._materialised``), not
    inside every layer's rotation, whatever the layer count: the fix for XLA recomputing them per consumer."""
    counts = {}
    for layers in (2, 4):
        model = _tiny_model(dataclasses.replace(TINY, num_layers=layers))
        graphdef, params = nnx.split(model)
        cache = model.init_cache(1, 16, keys_pre_rope=keys_pre_rope)
        hlo = _jit_forward(graphdef).lower(params, _tokens(0, 1, 16), _positions(1, 16), cache).compile().as_text()
        counts[layers] = len(re.findall(r"= f32\[[^\]]*\][^=]* sine\(", hlo))
    tables = 2 if keys_pre_rope else 1  # the chunk's positions, and the cache slots' for pre-RoPE keys
    assert counts[2] == counts[4] <= 2 * tables, counts


def _copied_whole(hlo: str, *arrays: jax.Array) -> list[str]:
    """The shapes among ``arrays``' that the compiled ``hlo`` copies whole (XLA ``copy`` ops of that shape),
    after checking that each shape is spelled in the HLO as the check expects (else the check could not fail)."""
    shapes = ["f32[{}]".format(",".join(map(str, a.shape))) for a in arrays]
    missing = [shape for shape in shapes if shape not in hlo]
    assert not missing, missing
    copies = re.findall(r"= (f32\[[^\]]*\])\S* copy\(", hlo)
    return [shape for shape in shapes if shape in copies]


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_decode_step_writes_the_stacked_cache_in_place(keys_pre_rope: bool) -> None:
    """The compiled decode step copies no whole ``[L, B, K, S, D]`` cache. A pre-RoPE cache (StreamingLLM,
    InfiniPot, Locret, TokenSelect) reads a rotated copy of each layer; once XLA fused that read with the next
    layer's write, the write was no longer in place and the step copied the stacked values once per layer (a
    30-layer step at 1.5k entries took 7x the time of the rotated-key cache)."""
    model = _tiny_model(dataclasses.replace(TINY, num_layers=4))
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, 32, keys_pre_rope=keys_pre_rope)
    cache = dataclasses.replace(cache, length=jnp.int32(20))
    token, position = jnp.zeros((1,), jnp.int32), jnp.full((1,), 20, jnp.int32)
    hlo = steps.decode_step.lower(graphdef, params, token, position, cache).compile().as_text()
    assert _copied_whole(hlo, cache.keys) == []
    # the same steps in the on-device loop: the cache is the loop's carry, updated in place
    stops, done = jnp.asarray([7], jnp.int32), jnp.zeros((1,), bool)
    lowered = steps.decode_block.lower(graphdef, params, token, position, cache, 4, jnp.int32(4), stops, done)
    assert _copied_whole(lowered.compile().as_text(), cache.keys) == []


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_observed_prefill_chunk_writes_the_stacked_cache_and_scores_in_place(keys_pre_rope: bool) -> None:
    """A prefill chunk whose queries add their attention mass to the scores (H2O, SnapKV) copies neither the
    whole ``[L, B, K, S, D]`` cache nor the ``[L, B, K, S]`` scores. The mass read each layer's keys without
    being ordered before the next layer's write, and XLA copied the stacked keys once per layer (an 8k H2O
    prefill took longer than the full cache's)."""
    model = _tiny_model(dataclasses.replace(TINY, num_layers=4))
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, 64, keys_pre_rope=keys_pre_rope)
    cache = dataclasses.replace(cache, length=jnp.int32(20), scores=jnp.zeros(cache.keys.shape[:4], jnp.float32))
    tokens, positions = jnp.zeros((1, 16), jnp.int32), jnp.arange(20, 36, dtype=jnp.int32)[None]
    observers = jnp.ones((1, 16), bool)
    hlo = (
        steps.prefill_chunk.lower(graphdef, params, tokens, positions, jnp.int32(16), jnp.int32(36), cache, observers)
        .compile()
        .as_text()
    )
    assert _copied_whole(hlo, cache.keys, cache.scores) == []


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
    assert cache.keys.dtype == jnp.bfloat16 and cache.values.dtype == jnp.bfloat16
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
    assert hidden.dtype == jnp.bfloat16 and cache.keys.dtype == jnp.bfloat16
    want, _ = full(tokens, positions)
    got, _ = mixed(tokens, positions)
    # bfloat16 keeps 8 significant bits: over two layers the logits (std ~9) move by a few 1e-2 relative
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got.astype(jnp.float32) - want).max()) < 0.1 * scale
