"""Tests for lcm.kernels.attention: every implementation against ``reference_attention``, forward and VJP.

One parametrised base (STYLE.md rule 7): each registered implementation runs the same cases — GQA groups 1, 3
and 4, head dims 16, 64 and 128, ragged query counts and caches that are not a whole number of tiles, a query
offset with an empty cache tail, sliding windows with and without sinks, rows that see no key, a stacked
``[L, B, K, S, D]`` cache read at a layer — and must match the plain masked reference. The CPU kernel's own
tiles are set small in some cases so that partial query tiles and partial key blocks are exercised at small
shapes; decode steps (one query, one tile per KV head) take the kernel's split-K path, whose partial softmaxes
are merged at the end. Then dispatch: ``"auto"`` falls through to XLA where the kernel declines (document masks,
bfloat16), ``"cpu"`` alone raises, unknown names are one-line errors; and a whole model gives the same
logits with either implementation.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.kernels.attention import api, cpu
from lcm.ops.attention import reference_attention

# Both sides accumulate in float32; the kernel's exp is Cephes' polynomial (~1 ulp) and it sums in a different
# order (online softmax over 16-64-key blocks). Outputs are weighted means of N(0, 1) values: measured worst case
# ~1e-6; 1e-5 leaves 10x headroom. Gradients run the XLA backward on both sides of the comparison, with larger
# sums (|grad| up to ~30): 1e-4 relative.
F32_TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}


@functools.cache
def _cpu_available() -> bool:
    return cpu.available()


def _require(implementation: str) -> None:
    if implementation == "cpu" and not _cpu_available():
        if os.environ.get("CI"):
            pytest.fail("the CPU attention kernel could not be built in CI")
        pytest.skip("the CPU attention kernel is not available here (no compiler or no AVX2)")


def _qkv(seed: int, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int, dim: int, dtype: Any = jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(batch, q_len, heads, dim), (batch, kv_len, kv_heads, dim), (batch, kv_len, kv_heads, dim)]
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


# (batch, T, S, H, K, D, q_offset, kv_length, window, sinks, cpu_q_block, cpu_kv_block)
CASES = {
    "prefill_mha_d16": (2, 40, 40, 4, 4, 16, 0, 40, None, 0, 64, 64),
    "smollm2_shapes_chunk": (1, 96, 300, 9, 3, 64, 150, 246, None, 0, 64, 64),
    "gqa4_d128_partial_tiles": (1, 37, 75, 8, 2, 128, 20, 57, None, 0, 8, 16),
    "gqa3_empty_tail_small_tiles": (2, 29, 64, 6, 2, 16, 9, 38, None, 0, 5, 16),
    "window_gqa3": (1, 33, 90, 6, 2, 32, 40, 73, 11, 0, 7, 16),
    "sinks_window_gap": (2, 21, 96, 3, 1, 16, 60, 81, 9, 5, 4, 16),
    "sinks_straddle_blocks": (1, 17, 80, 4, 4, 16, 50, 67, 6, 20, 3, 16),
    "rows_with_no_visible_key": (1, 16, 48, 2, 1, 16, 30, 20, 4, 0, 4, 16),
    # decode steps: with one KV head (one tile per call) the kernel splits the keys, 256+ per split (2 splits here)
    "decode_split_keys": (1, 1, 700, 3, 1, 64, 650, 651, None, 0, 64, 16),
    "decode_split_window_sinks": (1, 1, 900, 4, 1, 16, 800, 801, 100, 4, 64, 16),
    "decode_split_empty_tail": (1, 1, 1000, 2, 1, 32, 599, 600, None, 0, 64, 32),
    "decode_smollm2_batch2": (2, 1, 600, 9, 3, 64, 500, 501, None, 0, 64, 64),
    "five_queries_split_keys": (1, 5, 800, 2, 1, 16, 700, 705, None, 0, 64, 16),
}


@functools.cache
def _with_grads(implementation: str, window: int | None, sinks: int, q_block: int, kv_block: int):
    """Jitted ``(out, dq, dk, dv)`` of ``sum(d_out * attention(q, k, v))``; implementation "reference" is the
    plain masked reference under autodiff."""

    def run(q, k, v, d_out, q_offset, kv_length):
        def attend(q, k, v):
            kwargs = {"q_offset": q_offset, "kv_length": kv_length, "window": window, "sinks": sinks}
            if implementation == "reference":
                return reference_attention(q, k, v, **kwargs)
            tiles = {"cpu_q_block": q_block, "cpu_kv_block": kv_block, "q_block": 8, "kv_block": 16}
            return api.attention(q, k, v, **kwargs, **tiles, implementation=implementation)

        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run)


# gradients: the CPU kernel's VJP is the XLA backward, tested in full in tests/ops/test_attention.py; here a few
# cases check that the custom VJP is wired to the right arguments (compiling each backward costs seconds)
GRAD_CASES = ("gqa3_empty_tail_small_tiles", "sinks_window_gap", "smollm2_shapes_chunk")


@pytest.mark.parametrize("implementation", sorted(api.IMPLEMENTATIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_implementation_matches_reference(implementation: str, case: str) -> None:
    _require(implementation)
    batch, t, s, h, kh, d, q_offset, kv_length, window, sinks, q_block, kv_block = CASES[case]
    q, k, v = _qkv(0, batch, t, s, h, kh, d)
    kwargs = {"q_offset": q_offset, "kv_length": kv_length, "window": window, "sinks": sinks}
    tiles = {"cpu_q_block": q_block, "cpu_kv_block": kv_block, "q_block": 8, "kv_block": 16}
    got = api.attention(q, k, v, **kwargs, **tiles, implementation=implementation)
    want = reference_attention(q, k, v, **kwargs)
    np.testing.assert_allclose(got, want, **F32_TOL, err_msg=f"{implementation} {case}")


@pytest.mark.parametrize("implementation", sorted(api.IMPLEMENTATIONS))
@pytest.mark.parametrize("case", GRAD_CASES)
def test_implementation_gradients_match_reference(implementation: str, case: str) -> None:
    _require(implementation)
    batch, t, s, h, kh, d, q_offset, kv_length, window, sinks, q_block, kv_block = CASES[case]
    q, k, v = _qkv(0, batch, t, s, h, kh, d)
    d_out = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    got = _with_grads(implementation, window, sinks, q_block, kv_block)(q, k, v, d_out, q_offset, kv_length)
    want = _with_grads("reference", window, sinks, 0, 0)(q, k, v, d_out, q_offset, kv_length)
    np.testing.assert_allclose(got[0], want[0], **F32_TOL, err_msg=f"{implementation} {case} output")
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL, err_msg=f"{implementation} {case} {name}")


@pytest.mark.parametrize("implementation", sorted(api.IMPLEMENTATIONS))
def test_stacked_cache_at_a_layer(implementation: str) -> None:
    """The model's call: keys and values as the stacked heads-first cache, read at a traced layer index."""
    _require(implementation)
    q, _, _ = _qkv(2, 1, 48, 1, 9, 3, 64)
    rng = np.random.default_rng(3)
    keys, values = (jnp.asarray(rng.standard_normal((4, 1, 3, 130, 64)), jnp.float32) for _ in range(2))

    @jax.jit
    def run(q, keys, values, layer):
        return api.attention(
            q, keys, values, q_offset=70, kv_length=118, heads_first=True, layer=layer, implementation=implementation
        )

    for layer in (0, 2):
        want = reference_attention(
            q, keys[layer].swapaxes(1, 2), values[layer].swapaxes(1, 2), q_offset=70, kv_length=118
        )
        np.testing.assert_allclose(run(q, keys, values, jnp.int32(layer)), want, **F32_TOL)


# (batch, T, S, H, K, D, q_offset, kv_length, window, cpu_kv_block): left-padded rows, prompts starting at STARTS
PADDED = {
    "prefill_chunk": (3, 40, 96, 6, 2, 16, 30, 70, None, 16),
    "first_chunk_from_slot_0": (3, 48, 64, 4, 1, 32, 0, 48, None, 16),
    "decode_split_keys": (3, 1, 900, 3, 1, 64, 800, 801, None, 16),
    "window": (3, 33, 120, 6, 2, 16, 60, 93, 20, 16),
}
STARTS = [0, 13, 37]


@pytest.mark.parametrize("implementation", sorted(api.IMPLEMENTATIONS))
@pytest.mark.parametrize("case", sorted(PADDED))
def test_left_padding_is_the_two_document_mask(implementation: str, case: str) -> None:
    """``kv_start`` (left padding) equals the reference with padding and prompt as documents 0 and 1, built here
    from slot numbers; the kernel takes it natively (skipping padding blocks), XLA through the same segments."""
    _require(implementation)
    batch, t, s, h, kh, d, q_offset, kv_length, window, kv_block = PADDED[case]
    q, k, v = _qkv(5, batch, t, s, h, kh, d)
    starts = np.asarray(STARTS, np.int32)
    q_segments = (np.arange(q_offset, q_offset + t)[None] >= starts[:, None]).astype(np.int32)
    k_segments = (np.arange(s)[None] >= starts[:, None]).astype(np.int32)
    kwargs = {"q_offset": q_offset, "kv_length": kv_length, "window": window}
    want = reference_attention(q, k, v, **kwargs, q_segments=q_segments, k_segments=k_segments)
    tiles = {"cpu_kv_block": kv_block, "cpu_min_split_keys": 64, "q_block": 8, "kv_block": 16}
    got = api.attention(q, k, v, **kwargs, kv_start=jnp.asarray(starts), **tiles, implementation=implementation)
    np.testing.assert_allclose(got, want, **F32_TOL, err_msg=f"{implementation} {case}")
    with pytest.raises(ValueError, match="not both"):
        api.attention(q, k, v, kv_start=jnp.asarray(starts), q_segments=q_segments, k_segments=k_segments)
    with pytest.raises(ValueError, match="kv_start must be integer"):
        api.attention(q, k, v, kv_start=jnp.zeros((batch,), jnp.float32), implementation=implementation)


def test_auto_falls_through_where_the_kernel_declines() -> None:
    """Document masks and bfloat16: "cpu" alone declines, "auto" gives the XLA result."""
    _require("cpu")
    q, k, v = _qkv(4, 1, 24, 40, 4, 2, 16)
    segments = {"q_segments": jnp.ones((1, 24), jnp.int32), "k_segments": jnp.ones((1, 40), jnp.int32)}
    declined = {
        "documents": ((q, k, v), {"q_offset": 10, **segments}),
        "bfloat16": (tuple(x.astype(jnp.bfloat16) for x in (q, k, v)), {"q_offset": 10}),
    }
    for name, (args, kwargs) in declined.items():
        with pytest.raises(NotImplementedError):
            api.attention(*args, **kwargs, implementation="cpu")
        got = api.attention(*args, **kwargs, implementation="auto")
        want = api.attention(*args, **kwargs, implementation="xla")
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=name)


def test_resolve_names_and_errors() -> None:
    assert api.resolve("auto") == ("cpu", "xla")
    assert api.resolve("xla") == ("xla",)
    assert api.resolve("cpu, xla") == ("cpu", "xla")
    assert api.resolve(["xla"]) == ("xla",)
    with pytest.raises(ValueError, match=r"unknown attention implementation 'pallas'; choose from"):
        api.resolve("pallas")
    with pytest.raises(ValueError, match="must name at least one"):
        api.resolve([])
    q, k, v = _qkv(5, 1, 16, 16, 2, 1, 16)
    with pytest.raises(ValueError, match="cpu_kv_block=24 must be a multiple of 16"):
        api.attention(q, k, v, cpu_kv_block=24, implementation="cpu")
    with pytest.raises(ValueError, match="cpu_long_keys=-1 must be >= 0"):
        api.attention(q, k, v, cpu_long_keys=-1, implementation="cpu")


def test_long_query_tiles_past_the_key_threshold() -> None:
    """A SmolLM2-shaped late prefill chunk (256 queries after 700 keys): 128-query tiles once a call sees
    ``cpu_long_keys`` keys give the reference's result, and so does a threshold the call stays below."""
    _require("cpu")
    q, k, v = _qkv(3, 1, 256, 1024, 9, 3, 64)
    kwargs = {"q_offset": 700, "kv_length": 956}
    want = reference_attention(q, k, v, **kwargs)
    for long_keys in (956, 957, 0):  # at the threshold, just below it, never
        got = api.attention(q, k, v, **kwargs, cpu_long_q_block=128, cpu_long_keys=long_keys, implementation="cpu")
        np.testing.assert_allclose(got, want, **F32_TOL, err_msg=f"cpu_long_keys={long_keys}")


def test_model_logits_equal_across_implementations() -> None:
    """A random SmolLM2-shaped model (2 layers): the same token NLLs (chunked prefill) and greedy tokens."""
    _require("cpu")
    import dataclasses

    from lcm.generate import Engine
    from lcm.models.llama import LlamaConfig, random_model

    tokens = np.random.default_rng(6).integers(0, 512, (1, 100)).astype(np.int32)
    nlls, generated = {}, {}
    for implementation in ("xla", "cpu,xla"):
        cfg = dataclasses.replace(LlamaConfig(vocab_size=512, num_layers=2), attention_implementation=implementation)
        engine = Engine(random_model(cfg, seed=0), chunk_size=32)
        nlls[implementation] = engine.token_nlls(tokens)
        generated[implementation] = engine.generate(tokens, max_new_tokens=8)
    # two layers of float32 with different summation orders: NLLs (~6 nats) agree to ~1e-6 relative
    np.testing.assert_allclose(nlls["cpu,xla"], nlls["xla"], atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(generated["cpu,xla"], generated["xla"])


def test_bad_implementation_name_in_config() -> None:
    from lcm.models.llama import LlamaConfig

    with pytest.raises(ValueError, match="unknown attention implementation 'gpu'"):
        LlamaConfig(attention_implementation="gpu")
    with pytest.raises(ValueError, match="attention_implementation='cpu' must end with 'xla'"):
        LlamaConfig(attention_implementation="cpu")


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 70), st.sampled_from([(2, 1), (6, 2), (4, 4)])),
    cache=st.tuples(st.integers(0, 60), st.integers(1, 140)),
    mask=st.tuples(st.one_of(st.none(), st.integers(1, 50)), st.integers(0, 12)),
    tiles=st.tuples(st.integers(1, 70), st.sampled_from([16, 32, 48]), st.sampled_from([0, 16, 40])),
    padding=st.one_of(st.none(), st.lists(st.floats(0, 1), min_size=2, max_size=2)),
    long_tiles=st.tuples(st.integers(1, 70), st.sampled_from([0, 1, 40, 100])),
)
def test_cpu_kernel_matches_reference_hypothesis(shape, cache, mask, tiles, padding, long_tiles) -> None:
    """Forward only, any query count, offset, filled length, window, sinks, tile sizes, split-K size, left
    padding (each row's prompt starting anywhere in the cache) and long query tiles past any number of keys."""
    _require("cpu")
    (batch, t, (h, kh)), (q_offset, extra), (window, sinks), (q_block, kv_block, split) = shape, cache, mask, tiles
    s = q_offset + t + extra // 2
    kv_length = min(q_offset + t, s) if extra % 2 else s  # the chunk's end, or the whole buffer
    q, k, v = _qkv(7, batch, t, s, h, kh, 16)
    kwargs = {"q_offset": q_offset, "kv_length": kv_length, "window": window, "sinks": sinks}
    if padding is not None:
        kwargs["kv_start"] = jnp.asarray([int(f * s) for f in padding[:batch]], jnp.int32)
    tiles = {"cpu_q_block": q_block, "cpu_kv_block": kv_block, "cpu_min_split_keys": split}
    tiles |= {"cpu_long_q_block": long_tiles[0], "cpu_long_keys": long_tiles[1]}
    got = api.attention(q, k, v, **kwargs, **tiles, implementation="cpu")
    np.testing.assert_allclose(got, reference_attention(q, k, v, **kwargs), **F32_TOL)
