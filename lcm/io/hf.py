"""Hugging Face checkpoints: ``config.json`` + safetensors (single file or sharded with an index).

Supported ``model_type``: llama, mistral, qwen2 (the knobs lcm's :class:`LlamaConfig` has) and gemma3_text
(:class:`~lcm.models.gemma3.Gemma3Config`). RoPE scaling is read from ``rope_scaling`` (transformers 4) or
``rope_parameters`` (transformers 5). Tensor names follow ``LlamaForCausalLM`` / ``Gemma3ForCausalLM``; matrices are
stored ``[out, in]`` there and transposed into lcm's ``[in, out]`` layout.
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

from lcm.models import families, gemma3
from lcm.models.decoder import map_params
from lcm.models.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
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


def config_from_hf(hf: Mapping[str, Any], dtype: str = "float32") -> families.Config:
    """A model config from a ``config.json`` dict; one-line ValueError on what lcm cannot run."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise ValueError(
            "model_type 'gemma3' is Gemma 3's multimodal checkpoint; lcm loads its text model "
            "(model_type 'gemma3_text', Gemma3ForCausalLM)"
        )
    if model_type == "gemma3_text":
        return gemma3_config_from_hf(hf, dtype)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; lcm loads {list(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; lcm's MLP is SwiGLU with 'silu'")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    max_pos = hf.get("max_position_embeddings", 2048)
    # transformers falls back to max_position_embeddings when the original length is not given
    variant, params = _rope_settings(rope, max_pos, hf.get("original_max_position_embeddings", max_pos))
    base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
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
        rope_variant=variant,
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


def _rope_settings(rope: Mapping[str, Any], max_pos: int, fallback_original: int) -> tuple[str, dict[str, Any]]:
    """lcm's RoPE variant and parameters from one transformers rope dict (``rope_type``, ``factor``, ...)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; lcm reads {sorted(_ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0)")
    params = {k: v for k, v in rope.items() if k not in _ROPE_KEYS_DROPPED and v is not None}
    if rope_type in ("dynamic", "yarn", "longrope", "llama3"):
        params.setdefault("original_max_position_embeddings", fallback_original)
    if rope_type == "longrope":  # transformers' fallback when the checkpoint gives no factor
        params.setdefault("factor", max_pos / params["original_max_position_embeddings"])
    return _ROPE_TYPES[rope_type], params


def gemma3_config_from_hf(hf: Mapping[str, Any], dtype: str = "float32") -> gemma3.Gemma3Config:
    """A :class:`~lcm.models.gemma3.Gemma3Config` from a ``gemma3_text`` ``config.json`` (transformers 4 or 5)."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported hidden_activation {act!r}; Gemma 3's MLP is GeGLU with 'gelu_pytorch_tanh'")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise ValueError(f"{key}={hf[key]} is not supported (Gemma 3 has none; Gemma 2 does)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true (an encoder) is not supported; lcm runs causal decoders")
    if hf.get("tie_word_embeddings") is False:
        raise ValueError("tie_word_embeddings=false is not supported for gemma3_text (its LM head is the embedding)")
    max_pos = hf.get("max_position_embeddings", 131072)
    per_kind = hf.get("rope_parameters") or {}
    if "full_attention" in per_kind:  # transformers 5: one rope dict per layer kind
        full, local = dict(per_kind["full_attention"]), dict(per_kind.get("sliding_attention") or {})
    else:  # transformers 4: rope_theta (global), rope_local_base_freq, rope_scaling (global)
        full = dict(hf.get("rope_scaling") or {}) | {"rope_theta": hf.get("rope_theta", 1_000_000.0)}
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    original = hf.get("original_max_position_embeddings", max_pos)
    variant, params = _rope_settings(full, max_pos, original)
    scaled_local = local.get("rope_type", local.get("type", "default")) != "default"
    if scaled_local and _rope_settings(local, max_pos, original) != (variant, params):
        raise ValueError(
            f"the sliding-window layers' RoPE {local} differs from the global layers' {full}; lcm scales the global "
            "layers alone or both kinds alike"
        )
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or gemma3.pattern_layer_types(layers, hf.get("sliding_window_pattern", 6))
    return gemma3.Gemma3Config(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_base=float(full.get("rope_theta", 1_000_000.0)),
        local_rope_base=float(local.get("rope_theta", 10_000.0)),
        sliding_window=hf.get("sliding_window") or 4096,
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        max_position_embeddings=max_pos,
        rope_variant=variant,
        rope_params=tuple(sorted(params.items())),
        rope_local_layers=scaled_local,
        dtype=dtype,
        param_dtype=dtype,
    )


_LAYER_MODULES = {
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_mlp_norm": "pre_feedforward_layernorm",  # Gemma
    "post_mlp_norm": "post_feedforward_layernorm",  # Gemma
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
    if len(path) == 5 and path[0] == "layers" and path[2] == "attn" and path[3] in ("q_norm", "k_norm"):  # Gemma
        return f"model.layers.{path[1]}.self_attn.{path[3]}.weight"
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


def model_from_tensors(
    cfg: families.Config, get_tensor: Callable[[str], np.ndarray], names: set[str], progress: bool = True
) -> families.Model:
    """Fill an abstract model of ``cfg``'s family from HF-named tensors, checking every name and shape."""
    model = families.abstract_model(cfg)
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


def load_hf_folder(path: str | Path, dtype: str = "float32", progress: bool = True) -> families.Model:
    """A model (:class:`~lcm.models.llama.Llama`, :class:`~lcm.models.gemma3.Gemma3`) from an HF folder
    (``config.json`` + ``*.safetensors``, sharded or not)."""
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
    untied = getattr(cfg, "tie_embeddings", True) is False
    if untied and "lm_head.weight" not in where and "model.embed_tokens.weight" in where:
        raise ValueError(f"{folder}: tie_word_embeddings is false but lm_head.weight is missing")
    return model_from_tensors(cfg, lambda n: where[n].get_tensor(n), set(where), progress=progress)
