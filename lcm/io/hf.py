"""Hugging Face checkpoints: ``config.json`` + safetensors (single file or sharded with an index).

Supported ``model_type``: llama, mistral, qwen2 (the knobs lcm's :class:`LlamaConfig` has). RoPE scaling is
read from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5). Tensor names follow
``LlamaForCausalLM``; matrices are stored ``[out, in]`` there and transposed into lcm's ``[in, out]`` layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lcm.models.llama import Llama, LlamaConfig, abstract_model, map_params

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# transformers' rope_type -> lcm's variant name (they coincide except the spelling of the default)
_ROPE_TYPES = {
    "default": "default",
    "linear": "linear",
    "dynamic": "dynamic",
    "yarn": "yarn",
    "llama3": "llama3",
    "longrope": "longrope",
}
_ROPE_KEYS_DROPPED = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def config_from_hf(hf: Mapping[str, Any], dtype: str = "float32") -> LlamaConfig:
    """An :class:`LlamaConfig` from a ``config.json`` dict; one-line ValueError on what lcm cannot run."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; lcm loads {list(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; lcm's MLP is SwiGLU with 'silu'")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; lcm reads {sorted(_ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0)")
    base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    max_pos = hf.get("max_position_embeddings", 2048)
    params = {k: v for k, v in rope.items() if k not in _ROPE_KEYS_DROPPED and v is not None}
    if rope_type in ("dynamic", "yarn", "longrope", "llama3"):
        # transformers falls back to max_position_embeddings when the original length is not given
        params.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings", max_pos))
    if rope_type == "longrope":
        # transformers' fallback when the checkpoint gives no factor
        params.setdefault("factor", max_pos / params["original_max_position_embeddings"])
    sliding = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        sliding = None
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_base=float(base),
        rope_variant=_ROPE_TYPES[rope_type],
        rope_params=tuple(sorted(params.items())),
        max_position_embeddings=max_pos,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding,
        dtype=dtype,
        param_dtype=dtype,
    )


_LAYER_MODULES = {
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "attn": "self_attn",
    "mlp": "mlp",
}


def _hf_name(path: tuple[str, ...]) -> str:
    """lcm parameter path (e.g. ``("layers", "3", "attn", "q_bias")``) -> HF tensor name."""
    top = {
        ("embed",): "model.embed_tokens.weight",
        ("final_norm", "scale"): "model.norm.weight",
        ("lm_head",): "lm_head.weight",
    }
    if path in top:
        return top[path]
    if len(path) != 4 or path[0] != "layers" or path[2] not in _LAYER_MODULES:
        raise KeyError(f"no HF name for lcm parameter {'.'.join(path)}")
    _, layer, module, name = path
    if name == "scale":
        return f"model.layers.{layer}.{_LAYER_MODULES[module]}.weight"
    proj, kind = name.split("_")  # q_proj -> q_proj.weight, q_bias -> q_proj.bias
    return f"model.layers.{layer}.{_LAYER_MODULES[module]}.{proj}_proj.{'weight' if kind == 'proj' else 'bias'}"


def _to_lcm_layout(name: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF stores matrices ``[out, in]`` (the embedding ``[vocab, embed]``, as lcm); lcm ``[in, out]``, with
    attention heads split out: ``q_proj [d, h, hd]``, ``o_proj [h, hd, d]``."""
    if w.ndim == 2 and name != "model.embed_tokens.weight":
        w = w.T
    splits = {(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))}
    if w.size != math.prod(shape) or (w.ndim == 2 and len(shape) > 1 and w.shape not in splits):
        raise ValueError(f"tensor {name} does not fit the config's parameter shape {shape}")
    return w.reshape(shape)


def llama_from_tensors(
    cfg: LlamaConfig, get_tensor: Callable[[str], np.ndarray], names: set[str], progress: bool = True
) -> Llama:
    """Fill an abstract :class:`Llama` from HF-named tensors, checking every name and shape."""
    model = abstract_model(cfg)
    leaves: list[tuple[tuple[str, ...], Any]] = []
    map_params(model, lambda path, leaf: leaves.append((path, leaf)) or leaf)
    needed = {_hf_name(path) for path, _ in leaves}
    missing = sorted(needed - names)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    bar = tqdm(total=len(leaves), desc="loading weights", unit="tensor", disable=not progress, leave=False)

    def load(path: tuple[str, ...], leaf: Any) -> Any:
        name = _hf_name(path)
        w = _to_lcm_layout(name, np.asarray(get_tensor(name), np.float32), tuple(leaf.shape))
        bar.update()
        return jnp.asarray(w, dtype=leaf.dtype)

    model = map_params(model, load)
    bar.close()
    return model


def load_hf_folder(path: str | Path, dtype: str = "float32", progress: bool = True) -> Llama:
    """A :class:`Llama` from an HF folder (``config.json`` + ``*.safetensors``, sharded or not)."""
    from safetensors import safe_open

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; an HF model folder needs config.json + safetensors")
    cfg = config_from_hf(json.loads(config_file.read_text()), dtype=dtype)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    handles = [safe_open(str(folder / f), framework="numpy") for f in files]
    where = {name: h for h in handles for name in h.keys()}
    if cfg.tie_embeddings is False and "lm_head.weight" not in where and "model.embed_tokens.weight" in where:
        raise ValueError(f"{folder}: tie_word_embeddings is false but lm_head.weight is missing")
    return llama_from_tensors(cfg, lambda n: where[n].get_tensor(n), set(where), progress=progress)
