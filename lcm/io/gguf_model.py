"""llama.cpp GGUF checkpoints (LLaMA architecture): metadata -> config, dequantised tensors -> :class:`Llama`.

Tensors are dequantised with the ``gguf`` package (Q4_0/Q4_1/Q8_0/K-quants/F16/F32 …) into float32, exactly the
values transformers' GGUF loader produces, so parity tests compare the same weights. llama.cpp's converter
permutes the rows of ``attn_q``/``attn_k`` so that rotary pairs are interleaved (GPT-J layout); lcm rotates
halves (HF ``rotate_half``), so :func:`unpermute_qk` undoes that permutation on import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lcm.io.hf import model_from_tensors
from lcm.models.llama import Llama, LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama",)
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


def config_from_gguf(reader: gguf.GGUFReader, dtype: str = "float32") -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; lcm loads {list(SUPPORTED_ARCHITECTURES)}")
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


def _hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def load_gguf(path: str | Path, dtype: str = "float32", progress: bool = True) -> tuple[Llama, gguf.GGUFReader]:
    """A :class:`Llama` from a GGUF file, and the reader (its metadata holds the tokenizer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the gguf package raises assorted errors on a corrupt header
        raise ValueError(f"{str(path)!r} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    cfg = config_from_gguf(reader, dtype)
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_tensor_name(tensor.name)
        if name is not None:
            tensors[name] = tensor

    def get(name: str) -> np.ndarray:
        tensor = tensors[name]
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_qk(w, cfg.num_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute_qk(w, cfg.num_kv_heads)
        return w

    return model_from_tensors(cfg, get, set(tensors), progress=progress), reader
