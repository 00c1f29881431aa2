"""Tests for lcm.ops.rope.

Parity with transformers' ``ROPE_INIT_FUNCTIONS`` for every variant it has, ``apply_rope`` against a plain
numpy rotate_half reference (jitted and not, float32 and bfloat16), relative-position invariance of every
variant (hypothesis), closed forms for the variants transformers lacks, and the error messages.
"""

import itertools
import math
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.ops import rope, rotary

HEAD_DIMS = (32, 64, 96, 128)
BASES = (1e4, 1e5, 5e5)
FACTORS = (2.0, 4.0, 8.0, 16.0)
GRID = list(itertools.product(HEAD_DIMS, BASES, FACTORS))
ORIGINAL = 4096  # pretraining length L₀ used throughout

# Both sides raise the base to the same float32-rounded exponents 2j/d. transformers then works in float32
# (pow, reciprocal, scaling, the YaRN blend: a few roundings of 2^-24 each), we in float64 with one final
# rounding, so the two agree to a few float32 ulp. rtol 1e-6 is ~8 ulp; the worst case measured on this grid
# is 4.8e-7 (llama3's blend).
PARITY_RTOL = 1e-6


@pytest.fixture(scope="module")
def hf_rope():
    """transformers' (inv_freq, attention_factor) for a tiny LlamaConfig with the given rope parameters."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def compute(
        rope_type: str,
        head_dim: int,
        base: float,
        params: dict[str, Any],
        max_position_embeddings: int,
        seq_len: int | None = None,
    ) -> tuple[np.ndarray, float]:
        config = LlamaConfig(
            hidden_size=2 * head_dim,
            num_attention_heads=2,
            head_dim=head_dim,
            max_position_embeddings=max_position_embeddings,
            rope_parameters={"rope_type": rope_type, "rope_theta": base, **params},
        )
        if rope_type == "default":
            inv_freq, attention_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)
        return inv_freq.numpy(), float(attention_factor)

    return compute


def _assert_parity(ours: tuple[jax.Array, float], theirs: tuple[np.ndarray, float]) -> None:
    (inv_freq, attention_factor), (inv_freq_hf, attention_factor_hf) = ours, theirs
    assert inv_freq.dtype == jnp.float32
    chex.assert_trees_all_close(np.asarray(inv_freq), inv_freq_hf, rtol=PARITY_RTOL, atol=0)
    assert attention_factor == pytest.approx(attention_factor_hf, rel=PARITY_RTOL)


# --- parity with transformers -----------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_default_and_linear_match_transformers(hf_rope, head_dim: int, base: float, factor: float) -> None:
    _assert_parity(rope.rope_frequencies("default", head_dim, base), hf_rope("default", head_dim, base, {}, ORIGINAL))
    params = {"factor": factor}
    _assert_parity(
        rope.rope_frequencies("linear", head_dim, base, params),
        hf_rope("linear", head_dim, base, params, ORIGINAL),
    )


@pytest.mark.parity
@pytest.mark.parametrize("seq_len", [None, 1, ORIGINAL, ORIGINAL + 1, 3 * ORIGINAL + 17, 40 * ORIGINAL])
@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_dynamic_matches_transformers(hf_rope, head_dim: int, base: float, factor: float, seq_len: int | None) -> None:
    # transformers reads L₀ from config.max_position_embeddings; we take it as a parameter.
    ours = rope.rope_frequencies(
        "dynamic", head_dim, base, {"factor": factor, "original_max_position_embeddings": ORIGINAL}, seq_len
    )
    _assert_parity(ours, hf_rope("dynamic", head_dim, base, {"factor": factor}, ORIGINAL, seq_len))


YARN_OPTIONS = [
    {},
    {"truncate": False},
    {"beta_fast": 16.0, "beta_slow": 2.0},
    {"truncate": False, "beta_fast": 7.3, "beta_slow": 1.7},
    {"attention_factor": 0.9},
    {"mscale": 1.0},  # ignored without mscale_all_dim, as in transformers
    {"mscale": 0.707, "mscale_all_dim": 1.0},
    {"mscale": 1.0, "mscale_all_dim": 1.0},
]


@pytest.mark.parity
@pytest.mark.parametrize("options", YARN_OPTIONS, ids=str)
@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_yarn_matches_transformers(hf_rope, head_dim: int, base: float, factor: float, options: dict) -> None:
    params = {"factor": factor, "original_max_position_embeddings": ORIGINAL, **options}
    ours = rope.rope_frequencies("yarn", head_dim, base, params)
    _assert_parity(ours, hf_rope("yarn", head_dim, base, params, int(factor * ORIGINAL)))


@pytest.mark.parity
@pytest.mark.parametrize(
    "original,low_freq_factor,high_freq_factor", [(2048, 1.0, 4.0), (8192, 1.0, 4.0), (8192, 2.0, 8.0)]
)
@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_llama3_matches_transformers(
    hf_rope,
    head_dim: int,
    base: float,
    factor: float,
    original: int,
    low_freq_factor: float,
    high_freq_factor: float,
) -> None:
    params = {
        "factor": factor,
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        "original_max_position_embeddings": original,
    }
    ours = rope.rope_frequencies("llama3", head_dim, base, params)
    _assert_parity(ours, hf_rope("llama3", head_dim, base, params, int(factor * original)))


def _longrope_params(head_dim: int, **extra: Any) -> dict[str, Any]:
    rng = np.random.default_rng(head_dim)
    return {
        "short_factor": list(1.0 + 0.2 * rng.random(head_dim // 2)),
        "long_factor": list(1.0 + 30.0 * rng.random(head_dim // 2)),
        "original_max_position_embeddings": ORIGINAL,
        **extra,
    }


@pytest.mark.parity
@pytest.mark.parametrize("seq_len", [None, ORIGINAL, ORIGINAL + 1, 32 * ORIGINAL])
@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_longrope_matches_transformers(hf_rope, head_dim: int, base: float, factor: float, seq_len: int | None) -> None:
    max_position_embeddings = int(factor * ORIGINAL)
    for extra in ({"factor": factor}, {"factor": factor, "attention_factor": 1.3}):
        params = _longrope_params(head_dim, **extra)
        ours = rope.rope_frequencies("longrope", head_dim, base, params, seq_len)
        _assert_parity(ours, hf_rope("longrope", head_dim, base, params, max_position_embeddings, seq_len))


@pytest.mark.parametrize("seq_len", [1, ORIGINAL, ORIGINAL + 1, 5 * ORIGINAL + 3])
@pytest.mark.parametrize(
    "variant,params",
    [
        ("dynamic", {"factor": 8.0, "original_max_position_embeddings": ORIGINAL}),
        ("longrope", _longrope_params(64, factor=8.0)),
    ],
)
def test_seq_len_may_be_traced(variant: str, params: dict, seq_len: int) -> None:
    eager, attention_factor = rope.rope_frequencies(variant, 64, 5e5, params, seq_len)
    traced = jax.jit(lambda length: rope.rope_frequencies(variant, 64, 5e5, params, length)[0])
    # Same float32 operations traced or not; XLA's fusion may round differently, by an ulp or two at most.
    chex.assert_trees_all_close(traced(jnp.int32(seq_len)), eager, rtol=2.5e-7, atol=0)
    assert attention_factor == rope.rope_frequencies(variant, 64, 5e5, params)[1]


def test_dynamic_is_default_up_to_original_length() -> None:
    params = {"factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    default = rope.rope_frequencies("default", 128, 1e4)[0]
    for seq_len in (None, 1, ORIGINAL):
        np.testing.assert_array_equal(rope.rope_frequencies("dynamic", 128, 1e4, params, seq_len)[0], default)


# --- closed forms for the variants transformers lacks ----------------------------------------------------

# θ_j = 1e4^(−2j/8) = 1, 0.1, 0.01, 0.001 for d = 8: exponents are exact in float32, so each result below
# is one float64 -> float32 rounding (2^-24 relative) from its closed form.
CLOSED_FORM_RTOL = 2e-7


def test_ntk_closed_form() -> None:
    scaled_base = 1e4 * 4.0 ** (8 / 6)
    expected = scaled_base ** -np.array([0.0, 0.25, 0.5, 0.75])
    inv_freq, attention_factor = rope.rope_frequencies("ntk", 8, 1e4, {"factor": 4.0})
    chex.assert_trees_all_close(np.asarray(inv_freq), expected, rtol=CLOSED_FORM_RTOL, atol=0)
    assert attention_factor == 1.0


@pytest.mark.parametrize(
    "params,expected",
    [
        ({}, [1.0, 0.1 * math.sqrt(0.75), 0.01 * math.sqrt(0.5), 0.001 * math.sqrt(0.25)]),
        ({"power": 1.0, "factor": 2.0}, [0.5, 0.05 * 0.75, 0.005 * 0.5, 0.0005 * 0.25]),
        ({"power": 0.0}, [1.0, 0.1, 0.01, 0.001]),
    ],
)
def test_giraffe_power_closed_form(params: dict, expected: list[float]) -> None:
    inv_freq, _ = rope.rope_frequencies("giraffe_power", 8, 1e4, params)
    chex.assert_trees_all_close(np.asarray(inv_freq), np.array(expected), rtol=CLOSED_FORM_RTOL, atol=0)


@pytest.mark.parametrize(
    "params,expected",
    [
        # b_c = 0.05, a = b_c/8 = 0.00625, ρ = b_c/16 = 0.003125: keep 1 and 0.1, 0.01 -> ρ, 0.001 -> 0.
        ({"period": 2 * math.pi / 0.05}, [1.0, 0.1, 0.003125, 0.0]),
        # Linear first: θ/2 = 0.5, 0.05, 0.005, 0.0005 against b_c = 0.03, a = 0.00375, ρ = 0.001875.
        ({"period": 2 * math.pi / 0.03, "factor": 2.0}, [0.5, 0.05, 0.001875, 0.0]),
        ({"period": 2 * math.pi / 0.05, "a": 1e-4, "rho": 0.002}, [1.0, 0.1, 0.002, 0.002]),
    ],
)
def test_giraffe_truncated_closed_form(params: dict, expected: list[float]) -> None:
    inv_freq, _ = rope.rope_frequencies("giraffe_truncated", 8, 1e4, params)
    chex.assert_trees_all_close(np.asarray(inv_freq), np.array(expected), rtol=CLOSED_FORM_RTOL, atol=0)


def test_giraffe_truncated_matches_official_rule() -> None:
    """The official truncate_frequency (abacusai/Long-Context), transcribed to numpy, on a realistic basis."""
    period, factor = 4096.0, 4.0
    theta = (1.0 / 1e4 ** (np.arange(0, 128, 2, dtype=np.float32) / 128)).astype(np.float64) / factor
    cutoff = 2 * np.pi / period
    official = np.where(theta < cutoff, 2 * np.pi / (period * 16), theta)
    official = np.where(theta < cutoff / 8, 0.0, official)
    inv_freq, _ = rope.rope_frequencies("giraffe_truncated", 128, 1e4, {"period": period, "factor": factor})
    chex.assert_trees_all_close(np.asarray(inv_freq), official, rtol=CLOSED_FORM_RTOL, atol=0)
    assert 0 < np.count_nonzero(official == 0) < 64  # the example exercises all three bands


# --- apply_rope --------------------------------------------------------------------------------------------


def _rope_reference(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float) -> np.ndarray:
    """HF rotate_half RoPE in float64 numpy; angles rounded to float32 first, as transformers does."""
    angles = (positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)).astype(np.float64)
    emb = np.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x = x.astype(np.float64)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * np.cos(emb) + rotated * np.sin(emb)) * attention_factor


# |x| ≲ 5 here; float32 cos/sin (~1 ulp), two products and a sum give ≲ 4·2^-24·5 ≈ 1.2e-6 absolute error
# (measured 6e-7).
APPLY_ATOL = 5e-6
FREQUENCY_CASES = [
    ("default", {}),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": 512}),  # attention_factor ≠ 1
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("variant,params", FREQUENCY_CASES)
@pytest.mark.parametrize("fractional", [False, True], ids=["int_positions", "float_positions"])
def test_apply_rope_matches_numpy_reference(variant: str, params: dict, jit: bool, fractional: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 3, 64)).astype(np.float32)
    positions = rng.integers(0, 32768, (2, 64)).astype(np.int32)
    if fractional:
        positions = (positions + rng.random((2, 64))).astype(np.float32)
    inv_freq, attention_factor = rope.rope_frequencies(variant, 64, 1e4, params)
    apply = jax.jit(rotary.apply_rope) if jit else rotary.apply_rope
    out = apply(jnp.asarray(x), jnp.asarray(positions), inv_freq, attention_factor)
    assert out.dtype == jnp.float32
    expected = _rope_reference(x, positions, np.asarray(inv_freq), attention_factor)
    chex.assert_trees_all_close(np.asarray(out), expected, atol=APPLY_ATOL, rtol=0)


def test_rotate_heads_first_is_the_transposed_rotation() -> None:
    """``heads_first`` rotates a ``[B, H, T, D]`` array (the cache's layout) exactly as the ``[B, T, H, D]`` one."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 16, 3, 64)), jnp.float32)
    inv_freq, attention_factor = rope.rope_frequencies("default", 64, 1e4, {})
    positions = jnp.asarray(rng.integers(0, 4096, (2, 16)), jnp.int32)
    cos, sin = rotary.rope_cos_sin(positions, inv_freq, attention_factor)
    expected = rotary.rotate(x, cos, sin).swapaxes(1, 2)
    np.testing.assert_array_equal(rotary.rotate(x.swapaxes(1, 2), cos, sin, heads_first=True), expected)
    with pytest.raises(ValueError, match="cos/sin must have shape"):
        rotary.rotate(x, cos, sin, heads_first=True)  # [B, T, H, D] read as heads-first: T = 3 != 16


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_apply_rope_bfloat16_keeps_dtype(jit: bool) -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 32, 2, 128)), jnp.bfloat16)
    positions = jnp.asarray(rng.integers(0, 8192, (1, 32)), jnp.int32)
    inv_freq, attention_factor = rope.rope_frequencies("yarn", 128, 5e5, FREQUENCY_CASES[1][1])
    apply = jax.jit(rotary.apply_rope) if jit else rotary.apply_rope
    out = apply(x, positions, inv_freq, attention_factor)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    expected = _rope_reference(
        np.asarray(x.astype(jnp.float32)), np.asarray(positions), np.asarray(inv_freq), attention_factor
    )
    # Computed in float32 and rounded once to bfloat16 (8 significant bits): relative error ≤ 2^-8.
    chex.assert_trees_all_close(np.asarray(out.astype(jnp.float32)), expected, rtol=2**-8, atol=APPLY_ATOL)


def test_apply_rope_partial_rotary_passes_the_rest_through() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, 2, 64)).astype(np.float32)
    positions = np.arange(16, dtype=np.int32)[None, :]
    inv_freq, _ = rope.rope_frequencies("default", 32, 1e4)  # rotary dim 32 of head dim 64
    out = np.asarray(rotary.apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq))
    chex.assert_trees_all_close(
        out[..., :32],
        _rope_reference(x[..., :32], positions, np.asarray(inv_freq), 1.0),
        atol=APPLY_ATOL,
        rtol=0,
    )
    np.testing.assert_array_equal(out[..., 32:], x[..., 32:])


@pytest.mark.parity
@pytest.mark.parametrize("variant,params", FREQUENCY_CASES)
def test_apply_rope_matches_transformers(variant: str, params: dict) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": variant, "rope_theta": 1e4, **params},
    )
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 48, 2, 64)).astype(np.float32)
    positions = rng.integers(0, 4096, (2, 48))
    rotary_embedding = LlamaRotaryEmbedding(config)
    cos, sin = rotary_embedding(torch.from_numpy(q), torch.from_numpy(positions))
    expected, _ = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), cos, sin, unsqueeze_dim=2)
    # Rotate with transformers' own frequencies: a one-ulp difference in θ (which the frequency parity tests
    # allow) moves the angle at position 4096 by ~2e-4 rad, far above the error of the rotation itself.
    inv_freq = jnp.asarray(rotary_embedding.inv_freq.numpy())
    out = rotary.apply_rope(
        jnp.asarray(q), jnp.asarray(positions, jnp.int32), inv_freq, rotary_embedding.attention_scaling
    )
    chex.assert_trees_all_close(np.asarray(out), expected.numpy(), atol=APPLY_ATOL, rtol=0)


def test_apply_rope_rejects_mismatched_shapes() -> None:
    x = jnp.zeros((2, 8, 1, 16))
    inv_freq, _ = rope.rope_frequencies("default", 16, 1e4)
    with pytest.raises(ValueError, match=re.escape("positions must have shape (B, T) = (2, 8), got (8,)")):
        rotary.apply_rope(x, jnp.arange(8), inv_freq)
    with pytest.raises(ValueError, match="at most D/2 = 8 entries"):
        rotary.apply_rope(x, jnp.zeros((2, 8), jnp.int32), jnp.ones(9))


# --- relative positions --------------------------------------------------------------------------------


def _variant_params(variant: str, head_dim: int) -> tuple[dict[str, Any], int | None]:
    """Parameters that make each variant do something non-trivial at positions < 4096, and a fixed seq_len."""
    return {
        "default": ({}, None),
        "linear": ({"factor": 4.0}, None),
        "ntk": ({"factor": 4.0}, None),
        "dynamic": ({"factor": 4.0, "original_max_position_embeddings": 512}, 3000),
        "yarn": ({"factor": 8.0, "original_max_position_embeddings": 512}, None),
        "llama3": ({"original_max_position_embeddings": 1024}, None),
        "longrope": (
            _longrope_params(head_dim, factor=8.0) | {"original_max_position_embeddings": 512},
            3000,
        ),
        "giraffe_power": ({}, None),
        "giraffe_truncated": ({"period": 256.0, "factor": 2.0}, None),
    }[variant]


def test_every_variant_is_covered_by_the_relative_position_test() -> None:
    for variant in rope.ROPE_VARIANTS:
        params, seq_len = _variant_params(variant, 32)
        inv_freq, attention_factor = rope.rope_frequencies(variant, 32, 1e4, params, seq_len)
        assert inv_freq.shape == (16,) and inv_freq.dtype == jnp.float32
        assert np.all(np.isfinite(inv_freq)) and attention_factor > 0


@pytest.mark.parametrize("variant", sorted(rope.ROPE_VARIANTS))
@settings(max_examples=25, deadline=None)
@given(
    head_dim=st.sampled_from([8, 32, 64]),
    query_position=st.integers(0, 2047),
    key_position=st.integers(0, 2047),
    shift=st.integers(0, 2048),
    seed=st.integers(0, 2**32 - 1),
)
def test_scores_depend_only_on_relative_position(
    variant: str, head_dim: int, query_position: int, key_position: int, shift: int, seed: int
) -> None:
    params, seq_len = _variant_params(variant, head_dim)
    inv_freq, attention_factor = rope.rope_frequencies(variant, head_dim, 1e4, params, seq_len)
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 1, head_dim)).astype(np.float32).repeat(2, axis=2)  # [1, 2, 1, D]
    q_positions = jnp.array([[query_position, query_position + shift]], jnp.int32)
    k_positions = jnp.array([[key_position, key_position + shift]], jnp.int32)
    q_rot = np.asarray(rotary.apply_rope(jnp.asarray(q), q_positions, inv_freq, attention_factor))
    k_rot = np.asarray(rotary.apply_rope(jnp.asarray(k), k_positions, inv_freq, attention_factor))
    scores = np.einsum("bthd,bthd->t", q_rot, k_rot)
    # Both sides use the same rounded θ, so only the rounding of each product p·θ (< 4096, float32 spacing
    # 2^-12 there) matters: ≤ 1.2e-4 per angle, ≤ 2.4e-4 per angle difference (m − n)θ on each side. A score
    # is Lipschitz in the angle differences with constant ≤ |q|·|k|·af², so the two scores differ by
    # ≤ 4.9e-4·|q|·|k|·af²; 1e-3 leaves room for cos/sin and the float32 sums (measured: ~1e-5).
    scale = np.linalg.norm(q[0, 0, 0]) * np.linalg.norm(k[0, 0, 0]) * attention_factor**2
    assert abs(scores[0] - scores[1]) <= 1e-3 * scale + 1e-5


# --- random positions ----------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    length=st.sampled_from([1, 2, 3, 100, 4096]),  # few shapes: each new one costs a compile
    max_position=st.one_of(st.integers(1, 16384), st.floats(0.5, 16384.0)),
)
def test_random_positions_invariants(seed: int, length: int, max_position: float) -> None:
    positions = np.asarray(rotary.random_positions(jax.random.key(seed), length, max_position))
    assert positions.shape == (length,) and positions.dtype == np.float32
    assert positions[0] == 0.0
    assert np.all(np.diff(positions) >= 0)
    assert np.all(np.diff(positions) <= 2.0)  # gaps are drawn from (0, 2] and only ever shrunk
    assert positions[-1] <= max_position


def test_random_positions_are_strictly_increasing_and_jit_safe() -> None:
    key = jax.random.key(0)
    positions = rotary.random_positions(key, 512, 10_000)
    assert np.all(np.diff(np.asarray(positions)) > 0)
    jitted = jax.jit(rotary.random_positions, static_argnums=(1, 2))(key, 512, 10_000)
    np.testing.assert_array_equal(jitted, positions)


def test_random_positions_mean_gap_is_one_and_rescaling_caps_the_range() -> None:
    length = 4096
    unscaled = np.asarray(rotary.random_positions(jax.random.key(1), length, 10 * length))
    # Sum of length−1 U(0, 2] gaps: mean length−1, std sqrt((length−1)/3) ≈ 37; 6 std is a loose bound.
    assert abs(unscaled[-1] - (length - 1)) < 6 * math.sqrt((length - 1) / 3)
    capped = np.asarray(rotary.random_positions(jax.random.key(1), length, length / 2))
    chex.assert_trees_all_close(capped, unscaled * (length / 2) / unscaled[-1], rtol=1e-6, atol=1e-3)
    assert capped[-1] <= length / 2


# --- specs and validation ------------------------------------------------------------------------------


def test_parse_rope_spec() -> None:
    name, params = rope.parse_rope_spec("yarn:factor=2,original_max_position_embeddings=8192")
    assert (name, params) == ("yarn", {"factor": 2.0, "original_max_position_embeddings": 8192})
    assert isinstance(params["factor"], float) and isinstance(params["original_max_position_embeddings"], int)
    assert rope.parse_rope_spec("default") == ("default", {})
    assert rope.parse_rope_spec(" llama3 : factor = 8 , ") == ("llama3", {"factor": 8.0})
    assert (
        rope.parse_rope_spec("yarn:factor=4,original_max_position_embeddings=4096,truncate=false")[1]["truncate"]
        is False
    )
    name, params = rope.parse_rope_spec(
        "longrope:short_factor=1/1.5,long_factor=2.0/3.25,original_max_position_embeddings=4096,factor=8"
    )
    assert params["short_factor"] == (1.0, 1.5) and params["long_factor"] == (2.0, 3.25)
    rope.validate_rope_params(name, params, 4)


def test_parsed_spec_builds_the_same_frequencies() -> None:
    name, params = rope.parse_rope_spec("giraffe_truncated:period=4096,factor=4")
    direct = rope.rope_frequencies("giraffe_truncated", 64, 1e4, {"period": 4096, "factor": 4})
    np.testing.assert_array_equal(rope.rope_frequencies(name, 64, 1e4, params)[0], direct[0])


def test_explicit_none_means_derived() -> None:
    """HF configs carry nulls for optional keys (e.g. attention_factor): they mean the derived default."""
    params = {"factor": 4.0, "original_max_position_embeddings": 4096}
    with_none = params | {"attention_factor": None, "mscale": None, "mscale_all_dim": None}
    assert rope.rope_frequencies("yarn", 64, 1e4, with_none)[1] == rope.rope_frequencies("yarn", 64, 1e4, params)[1]


VARIANT_LIST = re.escape(str(sorted(rope.ROPE_VARIANTS)))
SPEC_ERRORS = [
    ("rope_xyz:factor=2", rf"unknown rope variant 'rope_xyz'; choose one of {VARIANT_LIST}"),
    ("linear:fator=2", re.escape("unknown parameter 'fator'; it takes ['factor']")),
    ("linear:factor", "expected key=value, got 'factor'"),
    ("linear:factor=abc", re.escape("cannot read factor='abc' as >= 1")),
    ("linear:factor=2,factor=3", "parameter 'factor' given twice"),
    ("yarn:truncate=maybe", "cannot read truncate='maybe' as true or false"),
    ("linear:factor=0.5", re.escape("'factor' must be >= 1, got 0.5")),
]


@pytest.mark.parametrize("spec,message", SPEC_ERRORS)
def test_parse_rope_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        rope.parse_rope_spec(spec)
    assert "\n" not in str(error.value)


VALIDATION_ERRORS = [
    ("nope", {}, 64, rf"unknown rope variant 'nope'; choose one of {VARIANT_LIST}"),
    ("linear", {}, 64, re.escape("'linear' needs parameter(s) ['factor']; it takes ['factor']")),
    ("linear", {"factor": 0.5}, 64, re.escape("'factor' must be >= 1, got 0.5")),
    ("linear", {"factor": "2"}, 64, re.escape("'factor' must be >= 1, got '2'")),
    (
        "linear",
        {"factor": 2.0, "beta_fast": 32},
        64,
        re.escape("unknown parameter 'beta_fast'; it takes ['factor']"),
    ),
    ("default", {}, 63, "head_dim must be an even integer >= 2, got 63"),
    ("ntk", {"factor": 2.0}, 2, re.escape("needs head_dim > 2")),
    ("dynamic", {"factor": 2.0}, 64, re.escape("needs parameter(s) ['original_max_position_embeddings']")),
    (
        "yarn",
        {"factor": 2.0, "original_max_position_embeddings": 1.5},
        64,
        "'original_max_position_embeddings' must be an integer >= 2, got 1.5",
    ),
    (
        "yarn",
        {"factor": 2.0, "original_max_position_embeddings": 512, "beta_fast": 1, "beta_slow": 32},
        64,
        "beta_fast must be >= beta_slow",
    ),
    (
        "yarn",
        {"factor": 2.0, "original_max_position_embeddings": 512, "truncate": "no"},
        64,
        "'truncate' must be true or false",
    ),
    (
        "yarn",
        {"factor": float("nan"), "original_max_position_embeddings": 512},
        64,
        "'factor' must be >= 1, got nan",
    ),
    (
        "llama3",
        {"low_freq_factor": 4.0, "high_freq_factor": 1.0},
        64,
        "high_freq_factor must be > low_freq_factor",
    ),
    (
        "longrope",
        _longrope_params(64, factor=2.0) | {"short_factor": [1.0] * 3},
        64,
        re.escape("short_factor must have head_dim // 2 = 32 entries, got 3"),
    ),
    ("longrope", _longrope_params(64), 64, "needs factor .* or attention_factor"),
    (
        "longrope",
        _longrope_params(64, factor=2.0) | {"long_factor": [0.0] * 32},
        64,
        "'long_factor' must be a list of numbers > 0",
    ),
    (
        "giraffe_truncated",
        {},
        64,
        re.escape("needs parameter(s) ['period']; it takes ['a', 'factor', 'period', 'rho']"),
    ),
    ("giraffe_power", {"power": -1.0}, 64, "'power' must be >= 0, got -1.0"),
]


@pytest.mark.parametrize("variant,params,head_dim,message", VALIDATION_ERRORS)
def test_validate_rope_params_errors(variant: str, params: dict, head_dim: int, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        rope.validate_rope_params(variant, params, head_dim)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message):  # rope_frequencies validates the same way
        rope.rope_frequencies(variant, head_dim, 1e4, params)


@pytest.mark.parametrize("base", [1.0, 0.0, float("inf"), "1e4"])
def test_rope_frequencies_rejects_bad_base(base: Any) -> None:
    with pytest.raises(ValueError, match="rope base must be a finite number > 1"):
        rope.rope_frequencies("default", 64, base)


def test_register_rope_variant_from_outside() -> None:
    import numpy as np

    from lcm.ops.rope import ROPE_VARIANTS, RopeVariant, parse_rope_spec, register_rope_variant, rope_frequencies

    def halved(head_dim, base, params, seq_len):
        return 0.5 * base ** -(np.arange(0, head_dim, 2) / head_dim), 1.0

    try:
        register_rope_variant(RopeVariant("halved_test", halved))
        assert parse_rope_spec("halved_test") == ("halved_test", {})
        inv_freq, _ = rope_frequencies("halved_test", 8, 10000.0, {})
        default, _ = rope_frequencies("default", 8, 10000.0, {})
        np.testing.assert_allclose(inv_freq, 0.5 * np.asarray(default), rtol=1e-6)
        with pytest.raises(ValueError, match="rope variant name 'halved_test' is already registered"):
            register_rope_variant(RopeVariant("halved_test", lambda *a: halved(*a)))
        with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['speed'\]; choose from"):
            register_rope_variant(RopeVariant("fast_test", halved, required=("speed",)))
    finally:
        ROPE_VARIANTS.pop("halved_test", None)
