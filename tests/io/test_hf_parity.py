"""Parity of lcm.io.hf with transformers on tiny random checkpoints.

Each case builds a tiny ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` in torch float32,
re-draws its weights at unit scale (transformers' std-0.02 init gives near-constant logits that would hide RoPE and
masking errors), saves it as safetensors (one case sharded, with an index) and compares lcm's logits on random
token ids with transformers'. Llama runs every RoPE type transformers has, on sequences longer than the original
context so the length-dependent ones (dynamic, longrope, yarn, llama3) scale; Mistral runs a sliding window shorter
than the sequence; Qwen2 has q/k/v biases. Also ``config_from_hf``'s one-line errors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import chex
import numpy as np
import pytest
from forward_logits import lcm_logits

from lcm.io.hf import config_from_hf, load_hf_folder, model_from_tensors
from lcm.models.llama import with_config

pytestmark = pytest.mark.parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ_LEN = 24  # longer than every ORIGINAL_LENGTH/max_position_embeddings below, so scaled RoPE variants engage
ORIGINAL_LENGTH = 8  # original_max_position_embeddings of the scaled variants
MAX_POSITIONS = 16
HEAD_DIM = 16
SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
)
# Both sides compute in float32 from the same float32 weights; they differ in summation order (einsum vs torch
# matmul, our online softmax vs torch's softmax) and in how cos/sin are formed, i.e. a few float32 ulp per operation.
# Logits reach |x| ~ 4 with an untied head and ~60 with a tied one (a token's own embedding row); the measured worst
# differences are 2e-6 and 1.5e-5 (one ulp at 60 is 3.8e-6). atol 1e-4 (rtol 0) leaves ~6x headroom and is far
# below what a RoPE or masking error moves (> 1e-2, checked in test_wrong_rope_or_window_is_detected).
PARITY_TOL = {"atol": 1e-4, "rtol": 0.0}


def _rope(rope_type: str, **params: Any) -> dict[str, Any]:
    return {"rope_type": rope_type, "rope_theta": 10000.0, **params}


LONGROPE = dict(
    short_factor=[1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0, 2.5],
    long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 10.0, 12.0],
    original_max_position_embeddings=ORIGINAL_LENGTH,
)

# name -> (transformers config class, config kwargs, save kwargs)
CASES = {
    "llama_default_untied": ("LlamaConfig", {"rope_parameters": _rope("default")}, {}),
    "llama_linear_tied": (
        "LlamaConfig",
        {"rope_parameters": _rope("linear", factor=2.0), "tie_word_embeddings": True},
        {},
    ),
    "llama_dynamic": ("LlamaConfig", {"rope_parameters": _rope("dynamic", factor=3.0)}, {}),
    "llama_yarn_sharded": (
        "LlamaConfig",
        # max_position_embeddings = factor x original, the ratio transformers expects (it warns otherwise)
        {"rope_parameters": _rope("yarn", factor=2.0, original_max_position_embeddings=ORIGINAL_LENGTH)},
        {"max_shard_size": "40KB"},
    ),
    "llama_llama3": (
        "LlamaConfig",
        {
            "rope_parameters": _rope(
                "llama3",
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=ORIGINAL_LENGTH,
            )
        },
        {},
    ),
    "llama_longrope_factor": ("LlamaConfig", {"rope_parameters": _rope("longrope", factor=2.0, **LONGROPE)}, {}),
    "llama_longrope_implicit_factor": ("LlamaConfig", {"rope_parameters": _rope("longrope", **LONGROPE)}, {}),
    "llama_attention_and_mlp_bias": (
        "LlamaConfig",
        {"rope_parameters": _rope("default"), "attention_bias": True, "mlp_bias": True},
        {},
    ),
    "mistral_sliding_window": ("MistralConfig", {"sliding_window": 6, "head_dim": HEAD_DIM}, {}),
    "qwen2_biases_tied": ("Qwen2Config", {"tie_word_embeddings": True}, {}),
}


def _unit_scale_(model: Any, seed: int) -> None:
    """Re-draw every weight in place: matrices ~ N(0, 1/fan_in), embeddings N(0, 1), norms ~1, biases ~0.3."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)


@functools.cache
def _checkpoint(case: str, folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Saves the case's random model under ``folder``; returns (folder, token ids [2, T], transformers' logits)."""
    config_class, config_kwargs, save_kwargs = CASES[case]
    config = getattr(transformers, config_class)(**(SIZES | config_kwargs))
    config._attn_implementation = "eager"  # the plain masked softmax, sliding window included
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _unit_scale_(model, seed=len(case))
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    tokens = np.random.default_rng(1).integers(0, SIZES["vocab_size"], (2, SEQ_LEN))
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).logits.numpy()
    return folder, tokens, logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hf")
    return lambda case: _checkpoint(case, root / case)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(checkpoints, case: str) -> None:
    folder, tokens, expected = checkpoints(case)
    model = load_hf_folder(folder, progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert model.config.tie_embeddings == config["tie_word_embeddings"]
    chex.assert_trees_all_close(lcm_logits(model, tokens), expected, **PARITY_TOL)


def test_sharded_checkpoint_has_an_index(checkpoints) -> None:
    folder, _, _ = checkpoints("llama_yarn_sharded")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == shards


def test_longrope_numerics_match_transformers(checkpoints) -> None:
    """LongRoPE's frequencies and attention factor, checked directly:
    the config is read as default RoPE and the variant set by hand, with transformers' implicit factor."""
    from safetensors.numpy import load_file

    folder, tokens, expected = checkpoints("llama_longrope_implicit_factor")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = _rope("default")
    params = {**LONGROPE, "factor": MAX_POSITIONS / ORIGINAL_LENGTH}  # transformers' fallback when factor is unset
    cfg = config_from_hf(config).with_rope("longrope", params)
    tensors = load_file(folder / "model.safetensors")
    model = model_from_tensors(cfg, tensors.__getitem__, set(tensors), progress=False)
    chex.assert_trees_all_close(lcm_logits(model, tokens), expected, **PARITY_TOL)


@pytest.mark.parametrize(
    "case,change",
    [
        ("llama_yarn_sharded", {"rope_variant": "default", "rope_params": ()}),
        ("mistral_sliding_window", {"sliding_window": None}),
    ],
)
def test_wrong_rope_or_window_is_detected(checkpoints, case: str, change: dict) -> None:
    # the tolerance is meaningful: default RoPE in place of yarn, or full attention in place of Mistral's window,
    # misses transformers by far more than it
    folder, tokens, expected = checkpoints(case)
    model = load_hf_folder(folder, progress=False)
    wrong = with_config(model, dataclasses.replace(model.config, **change))
    error = np.abs(np.asarray(lcm_logits(wrong, tokens)) - expected).max()
    assert error > 100 * PARITY_TOL["atol"]


def test_mistral_window_is_shorter_than_the_sequence(checkpoints) -> None:
    folder, _, _ = checkpoints("mistral_sliding_window")
    model = load_hf_folder(folder, progress=False)
    assert model.config.sliding_window == 6 < SEQ_LEN
    assert model.config.head_dim == HEAD_DIM


def test_qwen2_has_qkv_biases_and_no_window(checkpoints) -> None:
    folder, _, _ = checkpoints("qwen2_biases_tied")
    model = load_hf_folder(folder, progress=False)
    assert model.config.qkv_bias and not model.config.o_bias
    assert model.config.sliding_window is None  # use_sliding_window is false
    assert np.abs(np.asarray(model.layers[0].attn.k_bias[...])).max() > 0


# --- config and folder errors -------------------------------------------------------------------------------

BASE_CONFIG = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"model_type": "gpt2"},
            r"unsupported model_type 'gpt2'; lcm loads \['llama', 'mistral', 'qwen2', 'gemma3_text'\]",
        ),
        ({"model_type": None}, "unsupported model_type None"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'; lcm's MLP is SwiGLU with 'silu'"),
        ({"rope_parameters": {"rope_type": "su"}}, r"unsupported rope_type 'su'; lcm reads \["),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            r"partial_rotary_factor=0.5 is not supported \(only 1.0\)",
        ),
        ({"rope_scaling": {"type": "linear"}}, r"rope variant 'linear' needs parameter\(s\) \['factor'\]"),
    ],
)
def test_config_from_hf_errors_are_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        config_from_hf(BASE_CONFIG | overrides)
    assert "\n" not in str(err.value)


def test_config_from_hf_reads_transformers_4_rope_scaling() -> None:
    cfg = config_from_hf(BASE_CONFIG | {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (cfg.rope_variant, cfg.rope_params, cfg.rope_base) == ("linear", (("factor", 4.0),), 5e5)
    assert cfg.max_position_embeddings == 2048 and not cfg.tie_embeddings  # transformers' llama defaults


def test_load_hf_folder_errors(tmp_path: Path, checkpoints) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf_folder(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps(BASE_CONFIG))
    with pytest.raises(FileNotFoundError, match=r"has no \*.safetensors files"):
        load_hf_folder(tmp_path, progress=False)
    # an untied config over a checkpoint without lm_head.weight
    tied_folder, _, _ = checkpoints("qwen2_biases_tied")
    untied = tmp_path / "untied"
    untied.mkdir()
    config = json.loads((tied_folder / "config.json").read_text()) | {"tie_word_embeddings": False}
    (untied / "config.json").write_text(json.dumps(config))
    (untied / "model.safetensors").symlink_to(tied_folder / "model.safetensors")
    with pytest.raises(ValueError, match="tie_word_embeddings is false but lm_head.weight is missing"):
        load_hf_folder(untied, progress=False)
