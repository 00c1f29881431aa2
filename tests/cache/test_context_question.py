"""Context + question (kvpress's ``question=``): the policy compresses the context alone and the question is appended
uncompressed. The reference feeds the question token by token, through the model's own step, into the cache the
policy left after the context alone: a different path (no chunking, no policy) to the same numbers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm.cache.policies import make_policy
from lcm.generate import Engine
from lcm.models.llama import Llama

CONTEXT, QUESTION, CHUNK = 45, 11, 8


def _question_after(engine: Engine, context: np.ndarray, question: np.ndarray):
    """The policy's cache after the context alone, then the question fed one token at a time at the positions the
    policy gives: the logits after the last question token, and the cache."""
    _, cache = engine.prefill(context, engine.new_cache(1, engine.prompt_capacity(CONTEXT, 0) + QUESTION + CHUNK))
    model = nnx.merge(engine.graphdef, engine.params)
    filled = int(cache.layers[0].length)
    for offset, token in enumerate(question[0]):
        position = engine.policy.first_position(CONTEXT + offset, filled + offset)
        hidden, cache = model.hidden_states(jnp.asarray([[token]]), jnp.asarray([[position]]), cache)
    return model.logits(hidden[:, 0]), cache


@pytest.mark.parametrize(
    ("name", "budget", "params"),
    [("snapkv", 20, {"window": 4}), ("h2o", 16, {}), ("streamingllm", 16, {}), ("knorm", 20, {}), ("full", 0, {})],
)
def test_the_question_is_appended_to_the_compressed_context(model: Llama, name: str, budget: int, params) -> None:
    rng = np.random.default_rng(4)
    context = rng.integers(0, model.config.vocab_size, (1, CONTEXT))
    question = rng.integers(0, model.config.vocab_size, (1, QUESTION))
    engine = Engine(model, chunk_size=CHUNK, policy=make_policy(name, budget, **params))
    prompt = np.concatenate([context, question], axis=1)
    capacity = engine.prompt_capacity(CONTEXT + QUESTION, QUESTION)
    got_logits, got = engine.prefill(prompt, engine.new_cache(1, capacity), question=QUESTION)
    want_logits, want = _question_after(engine, context, question)
    kept = budget or CONTEXT  # the context's entries the policy keeps, then the whole question
    assert int(got.layers[0].length) == kept + QUESTION
    for mine, ref in zip(got.layers, want.layers, strict=True):
        n = kept + QUESTION
        # the same kept context entries (one compression path), the question's own keys by a chunk vs one at a time
        np.testing.assert_allclose(np.asarray(mine.keys[..., :n, :]), np.asarray(ref.keys[..., :n, :]), atol=2e-5)
    # float32, a chunk at once against one token at a time: round-off ~1e-6 on O(1) logits
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-4, rtol=1e-4)
    together = engine.generate(context, 5, question=question)
    assert together.shape == (1, 5) and together[0, 0] == int(np.argmax(np.asarray(got_logits)))


def test_without_a_question_the_question_is_compressed_with_the_context(model: Llama) -> None:
    rng = np.random.default_rng(5)
    context = rng.integers(0, model.config.vocab_size, (1, CONTEXT))
    question = rng.integers(0, model.config.vocab_size, (1, QUESTION))
    engine = Engine(model, chunk_size=CHUNK, policy=make_policy("snapkv", 20, window=4))
    prompt = np.concatenate([context, question], 1)
    apart, _ = engine.prefill(prompt, engine.new_cache(1, 64), question=QUESTION)
    together, cache = engine.prefill(prompt, engine.new_cache(1, 64))
    assert int(cache.layers[0].length) == 20  # the question itself was compressed into the budget
    assert not np.allclose(np.asarray(apart), np.asarray(together))
    full = Engine(model, chunk_size=CHUNK)  # a policy that keeps everything: question or not, the same program
    np.testing.assert_array_equal(
        full.generate(context, 4, question=question), full.generate(np.concatenate([context, question], 1), 4)
    )


def test_bad_questions_are_one_line_errors(model: Llama) -> None:
    engine = Engine(model, chunk_size=CHUNK, policy=make_policy("snapkv", 20, window=4))
    with pytest.raises(ValueError, match=r"question has 2 rows for 1 prompts"):
        engine.generate(np.zeros((1, 30), int), 2, question=np.zeros((2, 3), int))
    with pytest.raises(ValueError, match=r"tokens must be a non-empty"):
        engine.generate(np.zeros((1, 30), int), 2, question=np.zeros((1, 0), int))
    with pytest.raises(ValueError, match=r"question=30 must be a number of tokens in \[0, 30\)"):
        engine.prefill(np.zeros((1, 30), int), engine.new_cache(1, 64), question=30)
