"""One entry point for every checkpoint lcm reads: a registered name, a GGUF file or an HF folder."""

from __future__ import annotations

from pathlib import Path

from lcm.io.fetch import resolve_model
from lcm.io.gguf_model import load_gguf
from lcm.io.hf import load_hf_folder
from lcm.io.tokenizer import TextTokenizer, text_tokenizer_from_gguf, tokenizer_from_hf_folder
from lcm.models.families import Model


def load_model(spec: str | Path, dtype: str = "float32", progress: bool = True) -> tuple[Model, TextTokenizer]:
    """``(model, tokenizer)`` from a registered name (fetched on first use), a ``.gguf`` file or an HF folder."""
    path = resolve_model(str(spec))
    if path.is_dir():
        return load_hf_folder(path, dtype=dtype, progress=progress), tokenizer_from_hf_folder(path)
    model, reader = load_gguf(path, dtype=dtype, progress=progress)
    return model, text_tokenizer_from_gguf(reader)
