"""llama.cpp GGUF checkpoints (architectures ``llama`` and ``gemma3``): metadata -> config, dequantised tensors ->
:class:`~lcm.models.llama.Llama` or :class:`~lcm.models.gemma3.Gemma3`.

Tensors are dequantised with the ``gguf`` package (Q4_0/Q4_1/Q5_0/Q8_0/K-quants/F16/F32 …) into float32, exactly
the values transformers' GGUF loader produces, so parity tests compare the same weights. llama.cpp's converter
permutes the rows of a LLaMA's ``attn_q``/``attn_k`` so that rotary pairs are interleaved (GPT-J layout); lcm
rotates halves (HF ``rotate_half``), so :func:`unpermute_qk` undoes that permutation on import (Gemma's are not
permuted). For Gemma the converter stores every RMSNorm weight as ``1 + w``; lcm (like transformers) subtracts
the 1 back. What llama.cpp hard-codes for Gemma 3 rather than writing to the file, lcm takes as llama.cpp does:
local layers' RoPE base 10k, a global layer every 6th, queries scaled by ``head_dim ** -0.5`` (but
``(hidden / heads) ** -0.5`` for the 62-layer 27B).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lcm.io.hf import model_from_tensors
from lcm.models import families, gemma3
from lcm.models.llama import LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA_BLOCK_NAMES = _BLOCK_NAMES | {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` (convert_hf_to_gguf.py): interleaved rotary pairs -> halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gemma3_config(reader: gguf.GGUFReader, dtype: str) -> gemma3.Gemma3Config:
    arch = "gemma3"
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    variant, params = "default", {}
    if scaling == "linear":  # Gemma 3 4B-27B: the global layers' positions scaled for 128k
        variant, params = "linear", {"factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not read for gemma3; lcm reads none and linear")
    num_layers = int(_field(reader, f"{arch}.block_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 256))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return gemma3.Gemma3Config(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 1_000_000.0)),
        local_rope_base=float(_field(reader, f"{arch}.rope.freq_base_swa", 10_000.0)),
        sliding_window=int(_field(reader, f"{arch}.attention.sliding_window")),
        layer_types=gemma3.pattern_layer_types(num_layers, 6),
        query_pre_attn_scalar=float(hidden // num_heads if num_layers == 62 else head_dim),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length")),
        rope_variant=variant,
        rope_params=tuple(params.items()),
        dtype=dtype,
        param_dtype=dtype,
    )


def config_from_gguf(reader: gguf.GGUFReader, dtype: str = "float32") -> families.Config:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; lcm loads {list(SUPPORTED_ARCHITECTURES)}")
    if arch == "gemma3":
        return _gemma3_config(reader, dtype)
    names = {t.name for t in reader.tensors}
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not read yet; lcm reads unscaled GGUF RoPE")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // num_heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        dtype=dtype,
        param_dtype=dtype,
    )


def _hf_tensor_name(gguf_name: str, block_names: dict[str, str]) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in block_names:
        return f"model.layers.{parts[1]}.{block_names[parts[2]]}"
    return None


def load_gguf(
    path: str | Path, dtype: str = "float32", progress: bool = True
) -> tuple[families.Model, gguf.GGUFReader]:
    """A model from a GGUF file, and the reader (its metadata holds the tokenizer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the gguf package raises assorted errors on a corrupt header
        raise ValueError(f"{str(path)!r} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    cfg = config_from_gguf(reader, dtype)
    is_gemma = isinstance(cfg, gemma3.Gemma3Config)
    block_names = _GEMMA_BLOCK_NAMES if is_gemma else _BLOCK_NAMES
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_tensor_name(tensor.name, block_names)
        if name is not None:
            tensors[name] = tensor

    def get(name: str) -> np.ndarray:
        tensor = tensors[name]
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if is_gemma:  # stored as 1 + w (llama.cpp's converter); transformers' Gemma loader subtracts it too
            return w - 1 if name.endswith("norm.weight") else w
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_qk(w, cfg.num_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute_qk(w, cfg.num_kv_heads)
        return w

    return model_from_tensors(cfg, get, set(tensors), progress=progress), reader
