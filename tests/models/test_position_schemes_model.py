"""Position schemes (SelfExtend, DCA, ReRoPE) inside a model: the cached, chunked inference path (prefill chunks
and decode steps over keys stored pre-RoPE) equals the training forward under the same scheme, which the ops tests
check against float64 definitions; where a scheme is the identity the model equals plain RoPE; composition with KV
policies is allowed where the statistics stay the model's own, and a one-line error elsewhere."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache.policies import make_policy
from lcm.generate import Engine
from lcm.models.llama import LlamaConfig, random_model, with_config
from lcm.ops import position_schemes as ps

TINY = LlamaConfig(
    rms_norm_eps=1e-5,
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_base=10000.0,
    max_position_embeddings=32,
    tie_embeddings=False,
    attention_q_block=8,
    attention_kv_block=8,
    attention_decode_kv_block=16,
)
LENGTH = 45  # past the tiny model's trained 32 positions
# two float32 evaluations differing in tiling, chunking and the rotation tables they share: ~1e-6 on NLLs of O(5)
NLL_TOL = {"atol": 2e-5, "rtol": 2e-5}
SCHEMES = {
    "selfextend": ps.SelfExtend(group=3, window=8),
    "dca": ps.DualChunk(chunk=24, window=4),
    "rerope": ps.ReRoPE(window=6),
    "leaky_rerope": ps.ReRoPE(window=6, leak=3.0),
}


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, 0)


def _tokens(seed: int, batch: int = 1, length: int = LENGTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, length)).astype(np.int32)


def _train_nlls(model, tokens: np.ndarray) -> np.ndarray:
    """NLLs of tokens 1.. from the training forward (no cache: fresh keys, one call over the whole row)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, _ = model.train_forward(jnp.asarray(tokens), positions)
    logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)
    return -np.take_along_axis(np.asarray(logp[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_cached_chunks_equal_the_training_forward(model, name: str) -> None:
    """Engine.token_nlls (chunks of 16 into a pre-RoPE cache) == the training forward, both under the scheme; and
    the scheme changes the model past its window (the test would pass vacuously otherwise)."""
    scheme_model = with_config(model, TINY.with_position_scheme(SCHEMES[name]))
    tokens = _tokens(1, batch=2)
    cached = Engine(scheme_model, chunk_size=16).token_nlls(tokens)
    np.testing.assert_allclose(cached, _train_nlls(scheme_model, tokens), **NLL_TOL, err_msg=name)
    plain = Engine(model, chunk_size=16).token_nlls(tokens)
    assert np.abs(cached - plain).max() > 1e-3, name


@pytest.mark.parametrize("name", ["selfextend", "dca"])
def test_decode_steps_equal_the_training_forward(model, name: str) -> None:
    """Greedy decoding past the window: each step's token is the training forward's argmax over the sequence so far."""
    scheme_model = with_config(model, TINY.with_position_scheme(SCHEMES[name]))
    prompt = _tokens(2, length=30)
    out = Engine(scheme_model, chunk_size=8).generate(prompt, max_new_tokens=10)
    sequence = np.concatenate([prompt, out[:, :10]], axis=1)
    positions = jnp.broadcast_to(jnp.arange(sequence.shape[1], dtype=jnp.int32), sequence.shape)
    hidden, _ = scheme_model.train_forward(jnp.asarray(sequence), positions)
    greedy = np.asarray(jnp.argmax(scheme_model.logits(hidden), -1))[:, 29:-1]
    np.testing.assert_array_equal(out[:, :10], greedy)


@pytest.mark.parametrize(
    "scheme", [ps.SelfExtend(group=4, window=LENGTH), ps.DualChunk(chunk=60, window=8), ps.ReRoPE(window=LENGTH)]
)
def test_identity_equals_plain_rope_model(model, scheme) -> None:
    """Every distance inside the window (DCA: one chunk): the model's NLLs are plain RoPE's to float32 round-off."""
    scheme_model = with_config(
        model, dataclasses.replace(TINY, max_position_embeddings=80).with_position_scheme(scheme)
    )
    tokens = _tokens(3)
    np.testing.assert_allclose(
        Engine(scheme_model, chunk_size=16).token_nlls(tokens),
        Engine(model, chunk_size=16).token_nlls(tokens),
        **NLL_TOL,
    )


def test_policies_compose_where_their_statistics_are_the_models(model) -> None:
    scheme_model = with_config(model, TINY.with_position_scheme(SCHEMES["selfextend"]))
    for spec in ("h2o", "snapkv", "streamingllm", "tokenselect"):
        with pytest.raises(ValueError, match="does not combine with the position scheme 'selfextend'"):
            Engine(scheme_model, policy=make_policy(spec, 64))
    engine = Engine(scheme_model, chunk_size=16, policy=make_policy("knorm", 32))
    assert engine.keys_pre_rope
    assert engine.generate(_tokens(4), max_new_tokens=3).shape == (1, 3)


def test_config_errors_and_defaults() -> None:
    cfg = TINY.with_position_scheme(ps.DualChunk())
    assert cfg.position_scheme == ps.DualChunk(chunk=24, window=2)  # 3L/4 and L/16 of the trained 32
    assert cfg.with_rope("yarn", {"factor": 2.0}).position_scheme is None
    with pytest.raises(ValueError, match="runs on plain RoPE and full attention"):
        dataclasses.replace(TINY, sliding_window=8, position_scheme=ps.SelfExtend())
