"""A sliding-window layer's state (:class:`lcm.cache.kv.WindowCache`) against a full buffer with the same window
mask: one decoder layer fed chunk by chunk and step by step gives the same outputs while holding only
``sinks + window`` slots; the sinks stay, the latest entries rotate in."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm.cache.kv import UNBOUNDED, WindowCache, init_layer, init_window_layer
from lcm.models import decoder
from lcm.models.decoder_layer import LayerSettings, decoder_layer
from lcm.models.llama import LlamaConfig, random_model
from lcm.ops import masks

CFG = LlamaConfig(
    vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
    rms_norm_eps=1e-5, rope_base=10000.0, max_position_embeddings=128, tie_embeddings=True,
)  # fmt: skip
TOL = {"atol": 2e-5, "rtol": 0.0}  # float32, the same layer; the paths differ in tiling and summation order


def _run(state, x: np.ndarray, chunks: list[int], window: int, sinks: int, starts=None):
    model = random_model(CFG, seed=2)
    graphdef, params = nnx.split(model.layers[0])
    inv_freq, factor = model.rope_tables(x.shape[1])
    outs, states, start = [], [], 0
    mask = masks.causal() & masks.sliding_window(window, sinks=sinks)
    if starts is not None:
        mask &= masks.left_padding(jnp.asarray(starts, jnp.int32))
    for size in chunks:
        positions = jnp.broadcast_to(jnp.arange(start, start + size), (x.shape[0], size))
        inputs = decoder.layer_inputs(positions, state, False, inv_freq, factor, mask, jnp.int32(size), None)
        out, state = decoder_layer(
            LayerSettings(), graphdef, params, jnp.asarray(x[:, start : start + size]), state, inputs
        )
        outs.append(np.asarray(out))
        states.append(state)
        start += size
    return np.concatenate(outs, axis=1), states


@pytest.mark.parametrize(
    "window,sinks,chunks",
    [
        (5, 0, [8, 3, 1, 1, 12, 1, 4]),  # chunks longer and shorter than the window, then steps
        (6, 3, [2, 1, 6, 1, 1, 5, 6, 1, 1, 6]),  # sinks filling over several chunks, then rotating
        (4, 2, [1] * 14),  # decode steps only
        (6, 2, [6, 6, 6, 1, 1]),  # the first chunk holds the sinks
    ],
)
def test_window_state_equals_the_full_buffer_with_its_window_mask(window: int, sinks: int, chunks: list[int]) -> None:
    total = sum(chunks)
    x = np.random.default_rng(window * 10 + sinks).standard_normal((2, total, CFG.hidden_size)).astype(np.float32)
    full = init_layer(2, total, CFG.num_kv_heads, CFG.head_dim)
    small = init_window_layer(2, window, CFG.num_kv_heads, CFG.head_dim, sinks=sinks)
    assert isinstance(small, WindowCache)
    expected, _ = _run(full, x, chunks, window, sinks)
    got, states = _run(small, x, chunks, window, sinks)
    chex.assert_trees_all_close(got, expected, **TOL)
    seen = 0
    for size, state in zip(chunks, states, strict=True):
        seen += size
        chex.assert_shape(state.keys, (2, CFG.num_kv_heads, sinks + window, CFG.head_dim))
        assert int(state.length) == seen and state.capacity == UNBOUNDED
        held = np.asarray(state.positions[0])
        if seen <= sinks + window:  # nothing dropped yet: everything, right-aligned
            np.testing.assert_array_equal(held[sinks + window - seen :], np.arange(seen))
        else:  # the sinks, then the latest window
            kept = np.concatenate([np.arange(sinks), np.arange(seen - window, seen)])
            np.testing.assert_array_equal(held, kept)


def test_left_padding_without_sinks() -> None:
    x = np.random.default_rng(0).standard_normal((2, 20, CFG.hidden_size)).astype(np.float32)
    chunks, starts = [8, 8, 1, 1, 1, 1], [0, 11]
    expected, _ = _run(init_layer(2, 20, CFG.num_kv_heads, CFG.head_dim), x, chunks, 5, 0, starts)
    got, _ = _run(init_window_layer(2, 5, CFG.num_kv_heads, CFG.head_dim), x, chunks, 5, 0, starts)
    real = np.arange(20)[None, :, None] >= np.asarray(starts)[:, None, None]  # padding queries' outputs are unused
    chex.assert_trees_all_close(np.where(real, got, 0), np.where(real, expected, 0), **TOL)


def test_misuse_is_a_one_line_error() -> None:
    x = np.zeros((1, 8, CFG.hidden_size), np.float32)
    state = init_window_layer(1, 4, CFG.num_kv_heads, CFG.head_dim, sinks=2)
    with pytest.raises(ValueError, match="chunks of at most window=4 tokens") as err:
        _run(state, x, [8], 4, 2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="attended with a mask of window=5, sinks=2"):
        _run(state, x, [2], 5, 2)
    with pytest.raises(ValueError, match="positive window"):
        WindowCache(**{k: getattr(state, k) for k in ("keys", "values", "positions", "length")}, window=0)
