"""GGUF loading: lcm.io.gguf_model against llama.cpp's conventions and against transformers' GGUF loader.

Fast checks on tiny synthetic files written with ``gguf.GGUFWriter``: ``unpermute_qk`` inverts llama.cpp's
``permute`` (convert_hf_to_gguf.py), a tiny llama GGUF with permuted q/k loads to exactly the HF-layout weights it was
made from, metadata errors, and corrupt or truncated files give a one-line ValueError. Checks on the real
SmolLM2-135M Q4_1 GGUF (skipped when not cached): mean next-token NLL over the first 1024 tokens of a local text and
the top-5 next tokens agree with ``transformers.AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from flax import nnx

from lcm.io.gguf_model import load_gguf, unpermute_qk
from lcm.io.hf import model_from_tensors
from lcm.models.llama import LlamaConfig

pytestmark = pytest.mark.parity


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py: HF's rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 2, 3), (3, 8, 5), (9, 64, 4), (2, 16, None)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, head_dim: int, cols: int | None) -> None:
    shape = (n_head * head_dim,) if cols is None else (n_head * head_dim, cols)  # a bias or a weight matrix
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
    if head_dim > 2:  # the permutation is not the identity, so the round trip proves something
        assert not np.array_equal(permuted, w)


def test_permute_interleaves_the_rotary_halves() -> None:
    # one head of dim 8, rows labelled by index: halves (0..3 | 4..7) become pairs (0, 4), (1, 5), ...
    rows = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(llama_cpp_permute(rows, 1), [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(unpermute_qk(np.array([0, 4, 1, 5, 2, 6, 3, 7], np.float32), 1), rows)


# --- a tiny synthetic GGUF ---------------------------------------------------------------------------------

TINY = dict(vocab=40, hidden=32, ffn=48, layers=2, heads=4, kv_heads=2)


def _hf_tensors(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under transformers' names and [out, in] layout."""
    rng = np.random.default_rng(seed)
    v, d, f, h, k = (TINY[key] for key in ("vocab", "hidden", "ffn", "heads", "kv_heads"))
    hd = d // h
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (v, d)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (h * hd, d),
            f"{p}.self_attn.k_proj.weight": (k * hd, d),
            f"{p}.self_attn.v_proj.weight": (k * hd, d),
            f"{p}.self_attn.o_proj.weight": (d, h * hd),
            f"{p}.mlp.gate_proj.weight": (f, d),
            f"{p}.mlp.up_proj.weight": (f, d),
            f"{p}.mlp.down_proj.weight": (d, f),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in top or hf_name == "lm_head.weight":
        return top.get(hf_name, "output.weight")
    _, _, layer, rest = hf_name.split(".", 3)
    block = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }[rest]
    return f"blk.{layer}.{block}"


def _write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    arch: str = "llama",
    with_vocab_size: bool = True,
    rope_scaling: str | None = None,
) -> Path:
    """A llama GGUF as llama.cpp's converter writes it: q/k rows permuted, metadata under ``{arch}.*``."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(50000.0)
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    if with_vocab_size:
        writer.add_vocab_size(TINY["vocab"])
    else:  # the loader then counts the tokenizer's tokens
        writer.add_token_list([f"t{i}" for i in range(TINY["vocab"])])
    if rope_scaling is not None:
        writer.add_string(f"{arch}.rope.scaling.type", rope_scaling)
    for name, w in tensors.items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, TINY["kv_heads"])
        writer.add_tensor(_gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_loads_the_weights_it_was_written_from(tmp_path: Path, tied: bool) -> None:
    tensors = _hf_tensors(tied)
    model, _ = load_gguf(_write_gguf(tmp_path / "tiny.gguf", tensors), progress=False)
    cfg = model.config
    expected_cfg = LlamaConfig(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["ffn"],
        num_layers=TINY["layers"],
        num_heads=TINY["heads"],
        num_kv_heads=TINY["kv_heads"],
        rms_norm_eps=float(np.float32(1e-6)),  # GGUF stores it as float32
        rope_base=50000.0,
        max_position_embeddings=128,
        tie_embeddings=tied,
    )
    assert cfg == expected_cfg
    # the reference: the original HF-layout tensors through the HF path (no permutation anywhere)
    expected = model_from_tensors(expected_cfg, tensors.__getitem__, set(tensors), progress=False)
    ours, theirs = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(expected))
    # float32 stored, float32 read, rows only moved: bit-exact
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_vocab_size_falls_back_to_the_token_list(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf", _hf_tensors(True), with_vocab_size=False)
    assert load_gguf(path, progress=False)[0].config.vocab_size == TINY["vocab"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"arch": "gpt2"}, r"unsupported GGUF architecture 'gpt2'; lcm loads \['llama', 'gemma3'\]"),
        ({"rope_scaling": "linear"}, "GGUF rope scaling 'linear' is not read yet"),
    ],
)
def test_unsupported_metadata_is_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf", _hf_tensors(True), **kwargs)
    with pytest.raises(ValueError, match=message) as err:
        load_gguf(path, progress=False)
    assert "\n" not in str(err.value)


def _assert_unreadable(path: Path) -> None:
    with pytest.raises(ValueError, match="is not a readable GGUF file") as err:
        load_gguf(path, progress=False)
    assert "\n" not in str(err.value)


def test_corrupt_and_truncated_files_are_rejected(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    _assert_unreadable(garbage)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _assert_unreadable(empty)
    data = _write_gguf(tmp_path / "tiny.gguf", _hf_tensors(True)).read_bytes()
    # cut inside the metadata (the key/value section starts after the 24-byte header)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:100])
    _assert_unreadable(truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf", progress=False)


def test_file_truncated_in_the_tensor_data_is_rejected(tmp_path: Path) -> None:
    data = _write_gguf(tmp_path / "tiny.gguf", _hf_tensors(True)).read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])  # the last tensor loses its tail
    _assert_unreadable(truncated)


# --- the real SmolLM2 GGUF against transformers --------------------------------------------------------------

NUM_TOKENS = 1024


def test_truncated_real_gguf_is_rejected(smollm2_gguf: Path, tmp_path: Path) -> None:
    # the first 64 KiB end inside the tokenizer metadata (49k tokens and merges)
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as source:
        truncated.write_bytes(source.read(64 * 1024))
    _assert_unreadable(truncated)


@pytest.fixture(scope="module")
def smollm2_runs(smollm2_gguf: Path) -> dict[str, typing.Any]:
    """Both models loaded once; the first 1024 tokens of a local text; NLLs and last-position logits of each."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model

    model, tokenizer = load_model(smollm2_gguf, progress=False)
    ids = np.array(tokenizer.encode(inspect.getsource(typing))[:NUM_TOKENS], np.int32)
    assert len(ids) == NUM_TOKENS
    engine = Engine(model, chunk_size=NUM_TOKENS)
    ours_nlls = engine.token_nlls(ids)
    ours_last, _ = engine.prefill(ids, engine.new_cache(1, NUM_TOKENS))

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        output = reference(torch.from_numpy(ids[None].astype(np.int64)), labels=torch.from_numpy(ids[None]).long())
    return {
        "ours_nll": float(ours_nlls.mean()),
        "theirs_nll": float(output.loss),
        "ours_last": np.asarray(ours_last[0]),
        "theirs_last": output.logits[0, -1].numpy(),
    }


def test_smollm2_mean_nll_matches_transformers(smollm2_runs: dict) -> None:
    # Same dequantised float32 weights on both sides (gguf's dequantize is what transformers' loader uses too), so
    # only float32 round-off over 30 layers separates them; measured |diff| ~2e-5 nats on a mean NLL of ~2.5.
    # 2e-3 (the brief's bound, ~100x headroom) still catches any layout or RoPE error, which costs > 0.1 nats.
    assert abs(smollm2_runs["ours_nll"] - smollm2_runs["theirs_nll"]) < 2e-3
    assert 1.0 < smollm2_runs["ours_nll"] < 5.0  # a working LM on Python source, not a uniform guess (10.8)


def test_smollm2_top5_next_tokens_match_transformers(smollm2_runs: dict) -> None:
    ours, theirs = smollm2_runs["ours_last"], smollm2_runs["theirs_last"]
    assert set(np.argsort(ours)[-5:].tolist()) == set(np.argsort(theirs)[-5:].tolist())
    # logits of |x| ~ 20 after 30 float32 layers: measured max difference ~4e-5; 1e-3 leaves ~25x headroom
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
