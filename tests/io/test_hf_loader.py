"""HF folder loading without transformers: tensors written with safetensors' numpy API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lcm.io.hf import load_hf_folder

CONFIG = {
    "model_type": "llama",
    "vocab_size": 11,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {
        "model.embed_tokens.weight": (11, 8),
        "model.norm.weight": (8,),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.self_attn.v_proj.weight": (4, 8),
        "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.mlp.gate_proj.weight": (12, 8),
        "model.layers.0.mlp.up_proj.weight": (12, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 12),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _write(folder: Path, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_weights_land_in_lcm_layout(tmp_path: Path) -> None:
    tensors = _tensors(np.random.default_rng(0))
    model = load_hf_folder(_write(tmp_path / "ok", tensors), progress=False)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]  # [heads * head_dim, hidden]
    np.testing.assert_array_equal(model.layers[0].attn.q_proj[...], q.T.reshape(8, 2, 4))
    o = tensors["model.layers.0.self_attn.o_proj.weight"]  # [hidden, heads * head_dim]
    np.testing.assert_array_equal(model.layers[0].attn.o_proj[...], o.T.reshape(2, 4, 8))
    np.testing.assert_array_equal(model.embed[...], tensors["model.embed_tokens.weight"])


def test_wrong_shape_and_missing_tensor_are_one_line_errors(tmp_path: Path) -> None:
    tensors = _tensors(np.random.default_rng(0))
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].T.copy()
    with pytest.raises(ValueError, match=r"down_proj.weight does not fit the config's parameter shape \(12, 8\)"):
        load_hf_folder(_write(tmp_path / "transposed", tensors), progress=False)
    del tensors["model.norm.weight"]
    with pytest.raises(ValueError, match="checkpoint lacks 1 tensors"):
        load_hf_folder(_write(tmp_path / "missing", tensors), progress=False)
