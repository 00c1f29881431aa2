"""The real Gemma 3 270M GGUF (Q4_K_M) against transformers' GGUF loader: the tokenizer's ids on varied text, the
mean next-token NLL over the first 1024 tokens of a local text, and the last position's logits and top-5 tokens.
Both sides dequantise the same file with the ``gguf`` package, so only float32 round-off separates them."""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.parity

NUM_TOKENS = 1024
TEXTS = [
    "Hello world",
    "  two  spaces\tand\ttabs\n\nnew lines   ",
    "The pass key is 71432. Remember it. 71432 is the pass key.",
    "Ünïcödé 漢字 emoji 🙂 <start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x**2  # a comment\n",
    " leading space and \u2581 a metaspace character",
    "a" * 64,
    inspect.getsource(json)[:4000],
]


@pytest.fixture(scope="module")
def runs(gemma3_gguf: Path) -> dict[str, typing.Any]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model

    model, tokenizer = load_model(gemma3_gguf, progress=False)
    ids = np.array(tokenizer.encode(inspect.getsource(typing))[:NUM_TOKENS], np.int32)
    assert len(ids) == NUM_TOKENS
    engine = Engine(model, chunk_size=256)  # chunks shorter than the text, longer than the 512 window's half
    ours_nlls = engine.token_nlls(ids)
    ours_last, _ = engine.prefill(ids[None], engine.new_cache(1, NUM_TOKENS))

    folder, name = gemma3_gguf.parent, gemma3_gguf.name
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        output = reference(torch.from_numpy(ids[None].astype(np.int64)), labels=torch.from_numpy(ids[None]).long())
    return {
        "model": model,
        "ids": [(tokenizer.encode(text), reference_tokenizer(text)["input_ids"]) for text in TEXTS],
        "ours_nll": float(ours_nlls.mean()),
        "theirs_nll": float(output.loss),
        "ours_last": np.asarray(ours_last[0]),
        "theirs_last": output.logits[0, -1].numpy(),
    }


def test_config_read_from_the_file(runs: dict) -> None:
    cfg = runs["model"].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (18, 640, 4, 1, 256)
    assert (cfg.sliding_window, cfg.rope_base, cfg.local_rope_base, cfg.vocab_size) == (512, 1e6, 1e4, 262144)
    assert cfg.layer_types.count("full_attention") == 3 and cfg.max_position_embeddings == 32768


def test_tokenizer_ids_match_transformers(runs: dict) -> None:
    for text, (ours, theirs) in zip(TEXTS, runs["ids"], strict=True):
        assert ours == theirs, text[:40]


def test_mean_nll_matches_transformers(runs: dict) -> None:
    # the bound, 2e-3 nats: a layout, norm or RoPE error costs far more (> 0.1)
    assert abs(runs["ours_nll"] - runs["theirs_nll"]) < 2e-3
    assert 1.0 < runs["ours_nll"] < 5.0  # a working LM on Python source, not a uniform guess (12.5)


def test_top5_next_tokens_match_transformers(runs: dict) -> None:
    ours, theirs = runs["ours_last"], runs["theirs_last"]
    assert set(np.argsort(ours)[-5:].tolist()) == set(np.argsort(theirs)[-5:].tolist())
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)
