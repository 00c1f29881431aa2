"""Locret retaining heads: the head against a numpy MLP on the concatenated [q, k, v] (the official order),
shapes and float32 output, the hidden width for SmolLM2-135M (abstract shapes only: ~2.5% of the model),
attaching heads to a copy of a model, and bad widths."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm.models.llama import Llama, LlamaConfig, param_count, random_model
from lcm.models.retaining import (
    RetainingHead,
    RetainingHeads,
    attach_retaining_heads,
    has_retaining_heads,
    retaining_hidden_width,
    retaining_in_features,
)

TINY = LlamaConfig(
    rms_norm_eps=1e-5,
    rope_base=100000.0,
    max_position_embeddings=8192,
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    tie_embeddings=False,
    attention_q_block=8,
    attention_kv_block=8,
)


@pytest.fixture(scope="module")
def model() -> Llama:
    return random_model(TINY, 1)


def test_head_is_w2_silu_w1_of_the_concatenated_projections() -> None:
    head = RetainingHead(TINY, 16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    out = head(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    chex.assert_shape(out, (2, 5, 2))
    assert out.dtype == jnp.float32
    # independent float64 reference: all query heads, then keys, then values, each head-major (torch.cat order)
    x = np.concatenate([q.reshape(2, 5, 32), k.reshape(2, 5, 16), v.reshape(2, 5, 16)], axis=-1).astype(np.float64)
    pre = x @ np.asarray(head.w1[...], np.float64)
    expected = (pre / (1 + np.exp(-pre))) @ np.asarray(head.w2[...], np.float64)
    # float32 matmuls over 64 and 16 inputs of unit scale: round-off ~1e-6; 1e-5 leaves headroom
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


def test_head_reads_bfloat16_projections_and_scores_in_float32() -> None:
    head = RetainingHead(TINY, 16, rngs=nnx.Rngs(0))
    q, k = jnp.ones((1, 3, 4, 8), jnp.bfloat16), jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    assert head(q, k, k).dtype == jnp.float32


def test_head_rejects_wrong_shapes() -> None:
    head = RetainingHead(TINY, 16, rngs=nnx.Rngs(0))
    with pytest.raises(AssertionError):
        head(jnp.ones((1, 3, 4, 8)), jnp.ones((1, 3, 4, 8)), jnp.ones((1, 3, 2, 8)))


def test_smollm2_heads_hold_about_two_and_a_half_percent_of_the_model() -> None:
    config = LlamaConfig.preset("smollm2-135m")  # SmolLM2-135M
    assert retaining_in_features(config) == 576 + 192 + 192
    width = retaining_hidden_width(config)
    assert width % 16 == 0 and 96 <= width <= 144, width
    heads = nnx.eval_shape(lambda: RetainingHeads(config, rngs=nnx.Rngs(0)))
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    head_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(heads, nnx.Param)))
    assert head_params == config.num_layers * (960 * width + width * 3)
    share = head_params / param_count(abstract)
    assert 0.02 <= share <= 0.03, share


def test_hidden_width_scales_with_the_fraction_and_has_a_floor() -> None:
    config = LlamaConfig.preset("smollm2-135m")
    assert retaining_hidden_width(config, 0.05) > retaining_hidden_width(config, 0.025)
    assert retaining_hidden_width(TINY, 1e-6) == 16
    for bad in (0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="fraction"):
            retaining_hidden_width(config, bad)
    with pytest.raises(ValueError, match="hidden_width"):
        RetainingHead(TINY, 0, rngs=nnx.Rngs(0))


def test_attach_leaves_the_original_model_unchanged(model: Llama) -> None:
    before = jax.tree.map(np.asarray, nnx.state(model))
    heads = RetainingHeads(TINY, 16, rngs=nnx.Rngs(2))
    attached = attach_retaining_heads(model, heads)
    assert has_retaining_heads(attached) and not has_retaining_heads(model)
    assert not any(hasattr(block, "retaining") for block in model.layers)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(model)), before)
    for block, head in zip(attached.layers, heads.heads, strict=True):
        assert block.retaining is not head  # a copy: training the heads later does not touch the model
        chex.assert_trees_all_equal(block.retaining.w1[...], head.w1[...])
    # the backbone's parameters are the same values
    chex.assert_trees_all_equal(attached.layers[0].attn.q_proj[...], model.layers[0].attn.q_proj[...])
    # the decoder layer's call: block.retaining(q, k, v) on pre-RoPE projections
    q, k, v = attached.layers[0].attn.project_qkv(jnp.ones((1, 3, 32)))
    chex.assert_shape(attached.layers[0].retaining(q, k, v), (1, 3, 2))


def test_attach_rejects_heads_of_another_shape(model: Llama) -> None:
    other = LlamaConfig(**{**TINY.__dict__, "num_layers": 3})
    with pytest.raises(ValueError, match="retaining heads were built for"):
        attach_retaining_heads(model, RetainingHeads(other, 16, rngs=nnx.Rngs(0)))
