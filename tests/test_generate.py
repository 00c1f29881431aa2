"""Tests for lcm.generate.Engine on a tiny random decoder.

Greedy ``generate`` against an argmax loop that recomputes a full forward from scratch at every step (no cache
reuse, no chunking), ``token_nlls`` against ``log_softmax`` of one full forward, chunk sizes that do not divide the
prompt, a batch of two prompts, ``stop_ids``, and the input errors.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm.generate import Engine
from lcm.models.llama import Llama, LlamaConfig, forward, random_model

TINY = LlamaConfig(
    rms_norm_eps=1e-5,
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_base=10000.0,
    max_position_embeddings=64,
    tie_embeddings=False,  # a tied random model just repeats its last token (its embedding matches itself best)
    attention_q_block=4,
    attention_kv_block=4,
    attention_decode_kv_block=8,  # decode tiles differ from prefill tiles, and the cache spans several of them
)
PROMPT, NEW_TOKENS = 7, 6
# Two float32 evaluations of the same model that differ only in attention tiling and chunking (the Engine's cached,
# chunked pass vs one full forward): NLLs are O(5) (log 128 = 4.85 for a random model), round-off ~1e-6.
NLL_TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def model() -> Llama:
    return random_model(TINY, 0)


def _prompts(seed: int, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, length)).astype(np.int32)


@functools.cache
def _full_forward(graphdef: nnx.GraphDef):
    """Logits ``[B, L, V]`` of one forward over all ``L`` tokens, from an empty cache of exactly ``L`` slots."""

    def run(params: nnx.State, tokens_BxL: jax.Array) -> jax.Array:
        batch, length = tokens_BxL.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        cache = nnx.merge(graphdef, params).init_cache(batch, length)
        return forward(graphdef, params, tokens_BxL, positions, cache)[0]

    return jax.jit(run)


def _reference_greedy(model: Llama, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """Argmax loop; every step runs the model from scratch over the whole sequence so far.

    The sequence lives in a fixed [B, T + N] buffer whose unfilled tail is zeros: attention is causal, so the logits
    at position n - 1 do not depend on positions >= n, and one compiled program serves every step.
    """
    batch, length = prompts.shape
    graphdef, params = nnx.split(model)
    buffer = np.zeros((batch, length + new_tokens), np.int32)
    buffer[:, :length] = prompts
    for step in range(new_tokens):
        logits = np.asarray(_full_forward(graphdef)(params, buffer))[:, length + step - 1]
        top_two = np.sort(logits, axis=-1)[:, -2:]
        # exact token equality with the Engine needs argmaxes clear of float32 round-off (~1e-6 on logits of std 1)
        assert np.all(top_two[:, 1] - top_two[:, 0] > 1e-4), "near-tie in the reference; choose another seed"
        buffer[:, length + step] = np.argmax(logits, axis=-1)
    return buffer[:, length:]


@pytest.mark.parametrize("chunk_size", [3, 16], ids=["chunk3_ragged", "chunk16_one_chunk"])
def test_generate_matches_recomputed_greedy(model: Llama, chunk_size: int) -> None:
    prompts = _prompts(0, 2, PROMPT)
    out = Engine(model, chunk_size=chunk_size).generate(prompts, NEW_TOKENS)
    chex.assert_shape(out, (2, NEW_TOKENS))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, _reference_greedy(model, prompts, NEW_TOKENS))
    # the two rows are different prompts and must not leak into each other
    assert not np.array_equal(out[0], out[1])


def test_generate_accepts_a_single_prompt(model: Llama) -> None:
    prompts = _prompts(0, 2, PROMPT)
    one = Engine(model, chunk_size=3).generate(prompts[1], NEW_TOKENS)  # a 1-D prompt is a batch of one
    chex.assert_shape(one, (1, NEW_TOKENS))
    np.testing.assert_array_equal(one[0], _reference_greedy(model, prompts, NEW_TOKENS)[1])


def test_decode_from_a_large_cache_bucket_matches_recomputed_greedy(model: Llama) -> None:
    # a cache far larger than the sequence (decode tiles of 8 keys: 6 of them empty) attends to the filled blocks
    # only; the tokens equal the from-scratch greedy loop's
    engine = Engine(model, chunk_size=4)
    prompts = _prompts(1, 2, PROMPT)
    logits, cache = engine.prefill(prompts, engine.new_cache(2, 64))
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out, cache = engine.decode(first, PROMPT, cache, NEW_TOKENS)
    np.testing.assert_array_equal(out, _reference_greedy(model, prompts, NEW_TOKENS))
    assert int(cache.length) == PROMPT + NEW_TOKENS - 1  # the last token is sampled, not yet written


def test_decode_rejects_a_cache_too_small(model: Llama) -> None:
    engine = Engine(model, chunk_size=4)
    _, cache = engine.prefill(_prompts(1, 1, PROMPT), engine.new_cache(1, 8))
    with pytest.raises(ValueError, match="needs a cache capacity of at least 13, got 8"):
        engine.decode(jnp.zeros((1,), jnp.int32), PROMPT, cache, 7)


def _expected_with_stops(full: np.ndarray, stop_ids: list[int]) -> np.ndarray:
    """``generate``'s rule applied to the unstopped output: a row is done after its first stop id (kept), and
    decoding ends once every row is done."""
    ends = [next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row)) for row in full]
    return full[:, : max(ends)]


def test_generate_stops_when_every_row_has_stopped(model: Llama) -> None:
    engine = Engine(model, chunk_size=3)
    prompts = _prompts(0, 2, PROMPT)
    full = engine.generate(prompts, NEW_TOKENS)
    # both rows' first tokens: one token each
    first = full[:, 0].tolist()
    np.testing.assert_array_equal(engine.generate(prompts, NEW_TOKENS, stop_ids=first), full[:, :1])
    # row 0 stops at once, row 1 later: decoding continues for row 1 (row 0 keeps producing tokens meanwhile)
    stop_ids = [int(full[0, 0]), int(full[1, 3])]
    expected = _expected_with_stops(full, stop_ids)
    assert 1 < expected.shape[1] <= 4
    np.testing.assert_array_equal(engine.generate(prompts, NEW_TOKENS, stop_ids=stop_ids), expected)


@pytest.mark.parametrize("chunk_size", [3, 16], ids=["chunk3_ragged", "chunk16_one_chunk"])
def test_token_nlls_match_one_full_forward(model: Llama, chunk_size: int) -> None:
    tokens = _prompts(1, 2, 13)
    nlls = Engine(model, chunk_size=chunk_size).token_nlls(tokens)
    chex.assert_shape(nlls, (2, 12))
    graphdef, params = nnx.split(model)
    logprobs = jax.nn.log_softmax(_full_forward(graphdef)(params, tokens), axis=-1)
    expected = -np.take_along_axis(np.asarray(logprobs[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
    chex.assert_trees_all_close(nlls, expected, **NLL_TOL)


def test_prefill_logits_match_full_forward(model: Llama) -> None:
    engine = Engine(model, chunk_size=3)
    tokens = _prompts(2, 2, PROMPT)
    logits, cache = engine.prefill(tokens, engine.new_cache(2, PROMPT + NEW_TOKENS))
    assert cache.capacity == 15  # PROMPT + NEW_TOKENS = 13 rounded up to the chunk
    assert int(cache.length) == PROMPT
    graphdef, params = nnx.split(model)
    expected = _full_forward(graphdef)(params, tokens)[:, -1]
    chex.assert_trees_all_close(logits, expected, atol=1e-5, rtol=1e-5)  # as NLL_TOL: logits of std ~1


def test_prefill_with_a_cache_that_is_not_a_multiple_of_the_chunk(model: Llama) -> None:
    engine = Engine(model, chunk_size=3)
    tokens = _prompts(2, 2, PROMPT)
    # capacity 7 = the prompt exactly; the last chunk (token 6 + two pads) would need slots 6..8
    try:
        logits, _ = engine.prefill(tokens, model.init_cache(2, PROMPT))
    except ValueError as err:  # rejecting such a cache up front is a fix too
        assert "\n" not in str(err)
        return
    graphdef, params = nnx.split(model)
    expected = _full_forward(graphdef)(params, tokens)[:, -1]
    chex.assert_trees_all_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "tokens,message",
    [
        (np.array([[1, 2, 128]]), r"token ids must lie in \[0, 128\), got \[1, 128\]"),
        (np.array([[-1, 2, 3]]), r"token ids must lie in \[0, 128\), got \[-1, 3\]"),
        (np.zeros((0,), np.int32), "tokens must be a non-empty"),
        (np.zeros((2, 0), np.int32), "tokens must be a non-empty"),
        (np.zeros((1, 2, 3), np.int32), "tokens must be a non-empty"),
        (np.array([[1.0, 2.0]]), "tokens must be integers"),
    ],
)
def test_bad_tokens_are_rejected(model: Llama, tokens: np.ndarray, message: str) -> None:
    engine = Engine(model, chunk_size=3)
    for call in (lambda: engine.generate(tokens, 2), lambda: engine.token_nlls(tokens)):
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_bad_arguments_are_rejected(model: Llama) -> None:
    engine = Engine(model, chunk_size=3)
    prompt = _prompts(0, 1, 4)
    for new_tokens in (0, -2):
        with pytest.raises(ValueError, match=f"max_new_tokens={new_tokens} must be positive"):
            engine.generate(prompt, new_tokens)
    with pytest.raises(ValueError, match="need at least 2 tokens for a next-token NLL, got 1"):
        engine.token_nlls(prompt[:, :1])
    with pytest.raises(ValueError, match="chunk_size=0 must be positive"):
        Engine(model, chunk_size=0)
    with pytest.raises(
        ValueError, match="a prompt of 4 tokens in chunks of 3 needs a cache capacity of at least 6, got 3"
    ):
        engine.prefill(prompt, engine.new_cache(1, 2))


# Left padding: a padded row against the same prompt alone. Both are float32 evaluations of the same model that
# differ only in which masked key slots join the online-softmax blocks (their weight is exactly zero) and in the
# blocks' summation order: logits O(1), round-off ~1e-6.
PAD_TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_left_padded_prefill_matches_each_prompt_alone(model: Llama, keys_pre_rope: bool) -> None:
    engine = Engine(model, chunk_size=8, keys_pre_rope=keys_pre_rope)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (5, 19, 11, 3)]  # pads up to 16 = 2 chunks
    tokens, starts = engine.left_pad(prompts)
    assert tokens.shape == (4, 19) and starts.tolist() == [14, 0, 8, 16]
    batched, _ = engine.prefill(tokens, engine.new_cache(4, 19, starts))
    for row, prompt in enumerate(prompts):
        alone, _ = engine.prefill(np.array([prompt]), engine.new_cache(1, len(prompt)))
        chex.assert_trees_all_close(batched[row], alone[0], **PAD_TOL)


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_generate_many_matches_greedy_of_each_prompt(model: Llama, batch_size: int) -> None:
    engine = Engine(model, chunk_size=8)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (6, 13, 2, 9)]
    outputs = engine.generate_many(prompts, NEW_TOKENS, batch_size=batch_size)
    for prompt, out in zip(prompts, outputs, strict=True):
        np.testing.assert_array_equal(out, _reference_greedy(model, np.array([prompt]), NEW_TOKENS)[0])


def test_generate_many_cuts_each_row_after_its_stop_token(model: Llama) -> None:
    engine = Engine(model, chunk_size=8)
    prompts = [_prompts(5, 1, 9)[0].tolist(), _prompts(6, 1, 4)[0].tolist()]
    full = [engine.generate(np.array([p]), NEW_TOKENS)[0] for p in prompts]
    stop = int(full[0][2])
    outputs = engine.generate_many(prompts, NEW_TOKENS, stop_ids=[stop], batch_size=2)
    for whole, out in zip(full, outputs, strict=True):
        hits = np.flatnonzero(whole == stop)
        np.testing.assert_array_equal(out, whole[: hits[0] + 1] if hits.size else whole)


# --- reuse_prefix: the previous prompt's cache serves the chunks a next prompt shares with it ----------------------


@pytest.mark.parametrize("implementation", ["xla", "auto"])
def test_reuse_prefix_changes_no_bit(implementation: str) -> None:
    """A prompt sharing 21 tokens with the previous one reuses its first two 8-token chunks; its tokens and its
    whole cache are bit-identical to those of an engine that prefills it from scratch."""
    import dataclasses

    model = random_model(dataclasses.replace(TINY, attention_implementation=implementation), 0)
    first, second = _prompts(11, 1, 40), _prompts(12, 1, 40)
    second[:, :21] = first[:, :21]
    reusing, fresh = Engine(model, chunk_size=8, reuse_prefix=True), Engine(model, chunk_size=8, reuse_prefix=True)
    reusing.generate(first, NEW_TOKENS)
    assert reusing.last_reused_tokens == 0
    out = reusing.generate(second, NEW_TOKENS)
    assert reusing.last_reused_tokens == 16  # whole chunks below the first difference (token 21)
    expected = fresh.generate(second, NEW_TOKENS)
    assert fresh.last_reused_tokens == 0
    np.testing.assert_array_equal(out, expected)
    filled = 40 + NEW_TOKENS - 1
    for index, (got_layer, want_layer) in enumerate(
        zip(reusing._previous[1].layers, fresh._previous[1].layers, strict=True)
    ):
        for name, filled_part in (("keys", np.s_[:, :, :filled]), ("values", np.s_[:, :, :filled]),
                                  ("positions", np.s_[:, :filled])):  # fmt: skip
            got, want = np.asarray(getattr(got_layer, name)), np.asarray(getattr(want_layer, name))
            np.testing.assert_array_equal(got[filled_part], want[filled_part], err_msg=f"layer {index} {name}")
    # the same prompt again reuses every chunk but the last; a prompt of another length reuses nothing
    np.testing.assert_array_equal(reusing.generate(second, NEW_TOKENS), expected)
    assert reusing.last_reused_tokens == 32
    reusing.generate(second[:, :39], NEW_TOKENS)
    assert reusing.last_reused_tokens == 0


def test_reuse_prefix_is_off_by_default_and_for_bounded_policies(model: Llama) -> None:
    from lcm.cache.policies import make_policy

    prompt = _prompts(13, 1, 40)
    plain = Engine(model, chunk_size=8)
    plain.generate(prompt, 2)
    plain.generate(prompt, 2)
    assert plain.last_reused_tokens == 0 and plain._previous is None
    bounded = Engine(model, chunk_size=8, reuse_prefix=True, policy=make_policy("streamingllm", budget=16))
    bounded.generate(prompt, 2)
    bounded.generate(prompt, 2)
    assert bounded.last_reused_tokens == 0 and bounded._previous is None
    with pytest.raises(ValueError, match="prefill start=4 must be a multiple of chunk_size=8"):
        plain.prefill(prompt, plain.new_cache(1, 48), start=4)
    with pytest.raises(ValueError, match="prefill start=8 needs a cache holding exactly 8 tokens, got 0"):
        plain.prefill(prompt, plain.new_cache(1, 48), start=8)


@pytest.mark.parametrize("block", [1, 3, 32])
def test_decoding_on_device_in_blocks(model: Llama, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The on-device loop gives the from-scratch greedy tokens whatever its block, stops where generate's rule
    says (a stop id mid-block included), and returns to the host once per block, not per token."""
    from lcm import steps

    calls = []
    real = steps.decode_block
    monkeypatch.setattr(steps, "decode_block", lambda *args: calls.append(args[6]) or real(*args))
    prompts = _prompts(5, 2, PROMPT)
    new_tokens = 11
    full = _reference_greedy(model, prompts, new_tokens)
    engine = Engine(model, chunk_size=4, decode_block=block)
    np.testing.assert_array_equal(engine.generate(prompts, new_tokens), full)
    assert len(calls) == -(-(new_tokens - 1) // block) and sum(int(c) for c in calls) == new_tokens - 1
    stop_ids = [int(full[0, 4]), int(full[1, 6])]  # row 0 stops at its 5th token, row 1 at its 7th (or earlier)
    np.testing.assert_array_equal(engine.generate(prompts, new_tokens, stop_ids), _expected_with_stops(full, stop_ids))
    with pytest.raises(ValueError, match="decode_block=0 must be positive"):
        Engine(model, decode_block=0)
