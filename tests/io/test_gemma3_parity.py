"""Gemma 3 against transformers' ``Gemma3ForCausalLM`` on tiny random checkpoints it writes itself: full logits,
the sliding-window layers engaged (the sequence is longer than the window), a query scale other than the head
dimension's, and a RoPE variant that must act on the global layers only."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from forward_logits import lcm_logits

from lcm.io.hf import config_from_hf, load_hf_folder
from lcm.models import families
from lcm.models.gemma3 import FULL, SLIDING, Gemma3

pytestmark = pytest.mark.parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ_LEN = 24
WINDOW = 5
SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=16,
    sliding_window=WINDOW,
    layer_types=[SLIDING, FULL, SLIDING, SLIDING],
    query_pre_attn_scalar=16,
)
# float32 on both sides, the same weights; they differ in summation order and in how cos/sin are formed. The tied
# head reads the embedding (~N(0, 1/64) per entry here) so logits stay within a few units; atol 1e-4 is what the
# LLaMA parity tests justify (tests/io/test_hf_parity.py), and test_a_wrong_window_or_rope_is_detected shows that
# an error in the window, the layer kinds or where RoPE scaling applies misses by far more.
PARITY_TOL = {"atol": 1e-4, "rtol": 0.0}
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "query_scalar_and_bases": {"query_pre_attn_scalar": 24, "rope_theta": 5000.0, "rope_local_base_freq": 300.0},
    "linear_rope_on_global_layers": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "linear_rope_on_all_layers": {  # transformers 5's per-kind layout
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
        }
    },
}


def _unit_scale_(model: Any, seed: int) -> None:
    """Norm weights ~ 0.2 N(0,1) (scales 1 + w), matrices ~ N(0, 1/fan_in), the embedding ~ N(0, 1/hidden)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise / SIZES["hidden_size"] ** 0.5)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)


@functools.cache
def _checkpoint(case: str, folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    kwargs = SIZES | CASES[case]
    config = transformers.Gemma3TextConfig(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    _unit_scale_(model, seed=len(case))
    model.save_pretrained(folder, safe_serialization=True)
    tokens = np.random.default_rng(1).integers(0, SIZES["vocab_size"], (2, SEQ_LEN))
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).logits.numpy()
    return folder, tokens, logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gemma3")
    return lambda case: _checkpoint(case, root / case)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(checkpoints, case: str) -> None:
    folder, tokens, expected = checkpoints(case)
    model = load_hf_folder(folder, progress=False)
    assert isinstance(model, Gemma3)
    assert model.config.layer_types == tuple(SIZES["layer_types"]) and model.config.sliding_window == WINDOW
    chex.assert_trees_all_close(lcm_logits(model, tokens), expected, **PARITY_TOL)
    # the training forward (no cache) is the same function
    positions = jnp.broadcast_to(jnp.arange(SEQ_LEN, dtype=jnp.int32), tokens.shape)
    chex.assert_trees_all_close(model(jnp.asarray(tokens), positions)[0], expected, **PARITY_TOL)


def test_layers_all_is_the_variant_on_both_kinds(checkpoints) -> None:
    """``with_rope(..., layers="all")`` on the default checkpoint is transformers' per-kind scaled model; the global
    layers alone are not (so the option is not a no-op)."""
    folder, tokens, expected = checkpoints("linear_rope_on_all_layers")
    assert load_hf_folder(folder, progress=False).config.rope_local_layers
    plain = load_hf_folder(checkpoints("linear_rope_on_all_layers")[0], progress=False)
    base = dataclasses.replace(plain.config, rope_variant="default", rope_params=(), rope_local_layers=False)
    model = families.with_config(plain, base)
    every = families.with_config(model, model.config.with_rope("linear", {"factor": 4.0}, layers="all"))
    chex.assert_trees_all_close(lcm_logits(every, tokens), expected, **PARITY_TOL)
    only_global = families.with_config(model, model.config.with_rope("linear", {"factor": 4.0}))
    assert np.abs(np.asarray(lcm_logits(only_global, tokens)) - expected).max() > 100 * PARITY_TOL["atol"]


def test_config_reads_each_case(checkpoints) -> None:
    cfg = load_hf_folder(checkpoints("query_scalar_and_bases")[0], progress=False).config
    assert (cfg.query_pre_attn_scalar, cfg.rope_base, cfg.local_rope_base) == (24.0, 5000.0, 300.0)
    cfg = load_hf_folder(checkpoints("linear_rope_on_global_layers")[0], progress=False).config
    assert (cfg.rope_variant, dict(cfg.rope_params)) == ("linear", {"factor": 4.0})


@pytest.mark.parametrize(
    "case,change",
    [
        ("default", {"sliding_window": SEQ_LEN}),  # no window in effect
        ("default", {"layer_types": (FULL, SLIDING, SLIDING, SLIDING)}),  # kinds swapped in two layers
        ("linear_rope_on_global_layers", {"rope_variant": "default", "rope_params": ()}),
        ("query_scalar_and_bases", {"query_pre_attn_scalar": 16.0}),
    ],
)
def test_a_wrong_window_or_rope_is_detected(checkpoints, case: str, change: dict) -> None:
    folder, tokens, expected = checkpoints(case)
    model = load_hf_folder(folder, progress=False)
    wrong = families.with_config(model, dataclasses.replace(model.config, **change))
    assert np.abs(np.asarray(lcm_logits(wrong, tokens)) - expected).max() > 100 * PARITY_TOL["atol"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model_type": "gemma3"}, "multimodal checkpoint; lcm loads its text model"),
        ({"hidden_activation": "silu"}, "unsupported hidden_activation 'silu'"),
        ({"final_logit_softcapping": 30.0}, r"final_logit_softcapping=30.0 is not supported"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=false is not supported"),
        ({"layer_types": [SLIDING, "chunked_attention"]}, "layer_types must give one of"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 4.0},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                }
            },
            "the sliding-window layers' RoPE .* differs from the global layers'",
        ),
    ],
)
def test_config_errors_are_one_line(overrides: dict, message: str) -> None:
    base = {"model_type": "gemma3_text"} | {k: v for k, v in SIZES.items() if k != "layer_types"}
    with pytest.raises(ValueError, match=message) as err:
        config_from_hf(base | overrides)
    assert "\n" not in str(err.value)
