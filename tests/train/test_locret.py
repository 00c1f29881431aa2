"""Locret training (lcm.train.locret, lcm.train.locret_run) and the heads on disk (lcm.io.retaining).

The layer-by-layer forward against the model's own forward; CIS labels against brute-force numpy (the function on
random rotated projections, and layer 0 of a tiny model computed from its weights, RoPE included); the loss against
its definition; the top-k overlap against set intersection; a short training run lowering the loss; samples; the
save/load roundtrip and its one-line errors.
"""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm.io.retaining import ENV_VAR, heads_dir, load_retaining_heads, model_name, save_retaining_heads
from lcm.models.llama import Llama, LlamaConfig, random_model
from lcm.models.retaining import RetainingHeads, has_retaining_heads
from lcm.train.locret import (
    make_fused_train_step,
    make_optimizer,
    make_train_step,
    retaining_loss,
    top_overlap,
)
from lcm.train.locret_data import make_sample, split_streams
from lcm.train.locret_labels import backbone_of, causal_importance, layerwise_pass, make_example_fn
from lcm.train.locret_run import train_on_streams

TINY = LlamaConfig(
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_base=10000.0,
    tie_embeddings=False,
    attention_q_block=32,  # a few tiles of the chunked attention over 40 tokens; fewer tiles compile faster
    attention_kv_block=32,
)
SEQ, PROMPT = 40, 32


@pytest.fixture(scope="module")
def model() -> Llama:
    return random_model(TINY, 1)


@pytest.fixture(scope="module")
def tokens() -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, SEQ)), jnp.int32)


@pytest.fixture(scope="module")
def passed(model: Llama, tokens: jax.Array):
    return jax.jit(layerwise_pass, static_argnums=2)(backbone_of(model), tokens, PROMPT)


def test_layerwise_forward_equals_the_model(model: Llama, tokens: jax.Array, passed) -> None:
    hidden, example = passed
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), tokens.shape)
    logits, _ = model(tokens, positions)
    # the same float32 ops in the same order except the scan's fusion: measured differences ~1e-6 on logits of
    # scale ~4; 1e-5 is the brief's bound and leaves ~10x headroom
    chex.assert_trees_all_close(model.logits(hidden), logits, atol=1e-5, rtol=1e-5)
    chex.assert_shape(example.q, (2, 2, PROMPT, 4, 8))
    chex.assert_shape([example.k, example.v], (2, 2, PROMPT, 2, 8))
    chex.assert_shape(example.cis, (2, 2, PROMPT, 2))


def _reference_cis(q_rot: np.ndarray, k_rot: np.ndarray) -> np.ndarray:
    """Brute force: for every prompt key j and KV head g, the max over answer queries p and heads h of group g."""
    batch, answer, heads, dim = q_rot.shape
    prompt, kv_heads = k_rot.shape[1], k_rot.shape[2]
    group = heads // kv_heads
    out = np.full((batch, prompt, kv_heads), -np.inf)
    for b in range(batch):
        for j in range(prompt):
            for h in range(heads):
                for p in range(answer):
                    logit = q_rot[b, p, h] @ k_rot[b, j, h // group] / np.sqrt(dim)
                    out[b, j, h // group] = max(out[b, j, h // group], logit)
    return out


def test_causal_importance_is_the_max_logit_over_answer_queries_and_the_group() -> None:
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 5, 6, 4))  # 5 answer queries, 6 query heads in 3 groups of 2
    k = rng.normal(size=(2, 7, 3, 4))  # 7 prompt keys
    out = causal_importance(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
    # float32 dot products of 4 unit-scale terms against float64: ~1e-7; 1e-5 leaves headroom
    np.testing.assert_allclose(np.asarray(out), _reference_cis(q, k), atol=1e-5, rtol=1e-5)


def _numpy_rope(x: np.ndarray, base: float) -> np.ndarray:
    """HF half-split RoPE at positions 0…T-1 of ``x [B, T, H, D]``, written out in numpy."""
    dim = x.shape[-1]
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    angles = np.arange(x.shape[1])[:, None] * inv_freq[None]  # [T, D/2]
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_layer0_labels_use_rotated_queries_and_keys(model: Llama, tokens: jax.Array, passed) -> None:
    _, example = passed
    block = model.layers[0]
    x = np.asarray(model.embed[...], np.float64)[np.asarray(tokens)]
    scale = np.asarray(block.input_norm.scale[...], np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + TINY.rms_norm_eps) * scale
    q = np.einsum("btd,dhk->bthk", x, np.asarray(block.attn.q_proj[...], np.float64))
    k = np.einsum("btd,dhk->bthk", x, np.asarray(block.attn.k_proj[...], np.float64))
    q_rot, k_rot = _numpy_rope(q, TINY.rope_base), _numpy_rope(k, TINY.rope_base)
    expected = _reference_cis(q_rot[:, PROMPT:], k_rot[:, :PROMPT])
    # float32 model vs float64 numpy: logits of scale ~1, round-off ~1e-6; 1e-5 leaves headroom
    np.testing.assert_allclose(np.asarray(example.cis[0]), expected, atol=1e-5, rtol=1e-5)
    # the features are the *unrotated* projections of the prompt
    np.testing.assert_allclose(np.asarray(example.q[0]), q[:, :PROMPT], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(example.k[0]), k[:, :PROMPT], atol=1e-5, rtol=1e-5)
    # and the labels differ from unrotated ones (the choice matters on this example)
    assert np.abs(expected - _reference_cis(q[:, PROMPT:], k[:, :PROMPT])).max() > 1e-2


def test_loss_is_smooth_l1_plus_summed_smoothness() -> None:
    rng = np.random.default_rng(4)
    pred = rng.normal(size=(3, 1, 6, 2)) * 2
    target = rng.normal(size=(3, 1, 6, 2)) * 2
    total, parts = retaining_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), alpha=0.5)
    diff = np.abs(pred - target)
    smooth_l1 = np.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    smoothness = sum(np.mean((pred[layer, :, 1:] - pred[layer, :, :-1]) ** 2) for layer in range(3))
    # float32 means of a few dozen terms: relative round-off ~1e-7
    np.testing.assert_allclose(float(parts["smooth_l1"]), smooth_l1, rtol=1e-5)
    np.testing.assert_allclose(float(parts["smoothness"]), smoothness, rtol=1e-5)
    np.testing.assert_allclose(float(total), smooth_l1 + 0.5 * smoothness, rtol=1e-5)


def test_top_overlap_is_the_share_of_the_true_top_k() -> None:
    rng = np.random.default_rng(5)
    scores, target = rng.normal(size=(2, 3, 20, 2)), rng.normal(size=(2, 3, 20, 2))
    out = np.asarray(top_overlap(jnp.asarray(scores), jnp.asarray(target), 5))
    for layer in range(2):
        shares = [
            len(set(np.argsort(-scores[layer, b, :, g])[:5]) & set(np.argsort(-target[layer, b, :, g])[:5])) / 5
            for b in range(3)
            for g in range(2)
        ]
        assert out[layer] == pytest.approx(np.mean(shares))
    np.testing.assert_allclose(np.asarray(top_overlap(jnp.asarray(target), jnp.asarray(target), 5)), 1.0)


def test_samples_copy_a_span_of_the_prompt_or_continue_the_text() -> None:
    stream = np.arange(1000, dtype=np.int32)
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(20):
        tokens, kind = make_sample(rng, [stream], 50, 10, copy_fraction=0.5)
        assert tokens.shape == (60,)
        prompt, answer = tokens[:50], tokens[50:]
        np.testing.assert_array_equal(np.diff(prompt), 1)  # a window of the text
        if kind == "copy":
            assert answer[0] in prompt and np.all(np.diff(answer) == 1)
        else:
            np.testing.assert_array_equal(answer, prompt[-1] + 1 + np.arange(10))
        kinds.add(kind)
    assert kinds == {"copy", "continuation"}
    train, held_out = split_streams([stream], 60)
    assert len(train[0]) == 900 and len(held_out[0]) == 100
    with pytest.raises(ValueError, match="texts too short"):
        split_streams([stream[:100]], 60)


def test_needle_samples_plant_the_answer_in_a_filler() -> None:
    """Needles: the answer is spans found, in order and whole, in the prompt; the rest of the prompt is a window of
    the text or one span repeated; digit needles draw from the digit ids only."""
    stream = np.arange(100, 5100, dtype=np.int32)  # every token distinct, so where each came from is unambiguous
    digits = np.arange(10, 20, dtype=np.int32)  # not in the stream
    rng = np.random.default_rng(1)
    fillers, needle_kinds = set(), set()
    for _ in range(40):
        tokens, kind = make_sample(rng, [stream], 300, 40, needle_fraction=1.0, digit_ids=digits)
        assert kind == "needles" and tokens.shape == (340,) and tokens.dtype == np.int32
        prompt, answer = tokens[:300], tokens[300:]
        spans = np.split(answer, [10, 20, 30])  # 40 answer tokens, 4 needles of 10
        at = 0
        for span in spans:  # each needle occurs in the prompt after the previous one
            hits = [i for i in range(at, 300 - 9) if np.array_equal(prompt[i : i + 10], span)]
            assert hits, (span, prompt)
            at = hits[0] + 10
            is_digits = np.isin(span, digits)
            assert is_digits.all() or not is_digits.any()
            needle_kinds.add(bool(is_digits.all()))
            if not is_digits.any():
                np.testing.assert_array_equal(np.diff(span), 1)  # a span of the text
        planted = np.zeros(300, bool)
        for span in spans:
            i = next(
                i for i in range(300 - 9) if np.array_equal(prompt[i : i + 10], span) and not planted[i : i + 10].any()
            )
            planted[i : i + 10] = True
        filler = prompt[~planted]
        assert len(filler) == 260 and not np.isin(filler, digits).any()
        steps = np.diff(filler)
        fillers.add("window" if np.all(steps == 1) else "repeated")
        if not np.all(steps == 1):  # one span of 16-128 tokens, tiled
            period = int(np.argmax(filler[1:] == filler[0])) + 1
            assert 16 <= period <= 128
            np.testing.assert_array_equal(filler, np.resize(filler[:period], 260))
    assert fillers == {"window", "repeated"} and needle_kinds == {True, False}
    # no digit ids: text needles only; fraction 0: the old kinds only
    tokens, _ = make_sample(rng, [stream], 300, 40, needle_fraction=1.0)
    assert not np.isin(tokens, digits).any()
    kinds = {make_sample(rng, [stream], 300, 40, needle_fraction=0.0)[1] for _ in range(20)}
    assert kinds == {"copy", "continuation"}


def test_a_short_training_run_lowers_the_loss(model: Llama) -> None:
    streams = [np.random.default_rng(1).integers(0, TINY.vocab_size, 3000).astype(np.int32)]
    heads, metrics = train_on_streams(
        model,
        streams,
        steps=30,
        samples=6,
        prompt_tokens=32,
        answer_tokens=8,
        learning_rate=5e-3,  # a tiny model and 30 steps: the paper's 5e-4 would barely move
        warmup_fraction=0.1,
        eval_samples=2,
        progress=False,
    )
    assert isinstance(heads, RetainingHeads) and heads.hidden_width == 16
    assert len(metrics["train_loss"]) == 30 and metrics["features"] == "stored"
    assert metrics["train_loss_end"] < 0.75 * metrics["train_loss_start"], metrics["train_loss"]
    held = metrics["held_out"]
    assert held["trained"]["loss"] < held["initial"]["loss"]
    assert len(held["trained"]["recall_per_layer"]) == 2
    for method in ("trained", "trained+stabilizers", "initial", "initial+stabilizers", "random", "recent"):
        assert 0 <= held[method]["recall"] <= 1, method
    json.dumps(metrics)  # JSON-ready, for the sidecar


def test_the_fused_step_equals_a_step_on_stored_features(model: Llama, tokens: jax.Array) -> None:
    graphdef, state = nnx.split(RetainingHeads(TINY, 16, rngs=nnx.Rngs(3)))
    optimizer = make_optimizer(10, learning_rate=1e-2, warmup_fraction=0.1)
    backbone = backbone_of(model)
    copy = jax.tree.map(jnp.copy, state)
    fused, _, fused_parts = make_fused_train_step(graphdef, optimizer, PROMPT)(
        backbone, copy, optimizer.init(copy), tokens
    )
    example = make_example_fn(PROMPT, feature_dtype=jnp.float32)(backbone, tokens)
    stored, _, stored_parts = make_train_step(graphdef, optimizer)(state, optimizer.init(state), example)
    # the same float32 program split in two: XLA may fuse differently, round-off ~1e-7 on values of scale ~1
    chex.assert_trees_all_close(fused, stored, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(fused_parts, stored_parts, atol=1e-6, rtol=1e-6)


def test_one_fresh_sample_per_step_when_samples_cover_the_steps(model: Llama) -> None:
    streams = [np.random.default_rng(2).integers(0, TINY.vocab_size, 1000).astype(np.int32)]
    _, metrics = train_on_streams(
        model, streams, steps=2, samples=2, prompt_tokens=16, answer_tokens=4, eval_samples=0, progress=False
    )
    assert metrics["features"] == "fresh" and len(metrics["train_loss"]) == 2 and "held_out" not in metrics


def test_bad_training_arguments(model: Llama) -> None:
    streams = [np.zeros(1000, np.int32)]
    with pytest.raises(ValueError, match="steps=0"):
        train_on_streams(model, streams, steps=0, prompt_tokens=8, answer_tokens=4)
    with pytest.raises(ValueError, match="answer_tokens=9 must not exceed prompt_tokens=8"):
        train_on_streams(model, streams, steps=1, prompt_tokens=8, answer_tokens=9)


def test_save_and_load_roundtrip(model: Llama, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    heads = RetainingHeads(TINY, 16, rngs=nnx.Rngs(7))
    folder = save_retaining_heads(heads, "tiny/model.gguf", {"metrics": {"recall": np.float32(0.5)}})
    assert folder == heads_dir("tiny/model.gguf") == tmp_path / "model"
    meta = json.loads((folder / "locret.json").read_text())
    assert meta["model"] == "model" and meta["hidden_width"] == 16 and meta["metrics"]["recall"] == 0.5
    assert (meta["num_layers"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == (2, 4, 2, 8)
    loaded = load_retaining_heads(model, "elsewhere/model")  # the same stem finds the same heads
    assert has_retaining_heads(loaded) and not has_retaining_heads(model)
    chex.assert_trees_all_equal(
        [(b.retaining.w1[...], b.retaining.w2[...]) for b in loaded.layers],
        [(h.w1[...], h.w2[...]) for h in heads.heads],
    )
    # saving again replaces the heads
    save_retaining_heads(RetainingHeads(TINY, 32, rngs=nnx.Rngs(8)), "model")
    assert load_retaining_heads(model, "model").layers[0].retaining.w1[...].shape == (64, 32)


def test_missing_heads_say_how_to_train_them(model: Llama, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_retaining_heads(model, "smollm2")
    message = str(err.value)
    assert message == (
        f"no trained Locret retaining heads for model 'smollm2' in {tmp_path / 'smollm2'}; "
        "train them with: lcm run configs/locret_smollm2.py"
    )
    assert "\n" not in message
    assert model_name("smollm2") == "smollm2" and model_name("/a/b/hf_folder/") == "hf_folder"


def test_heads_of_another_shape_are_refused(model: Llama, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    other = LlamaConfig(**{**TINY.__dict__, "num_layers": 3})
    save_retaining_heads(RetainingHeads(other, 16, rngs=nnx.Rngs(0)), "tiny")
    expected = r"trained for \{'num_layers': 3.*but model 'tiny' has \{'num_layers': 2"
    with pytest.raises(ValueError, match=expected) as err:
        load_retaining_heads(model, "tiny")
    assert "\n" not in str(err.value)
