"""The logits lcm computes for a batch of token ids in one jitted forward over a fresh cache (the parity tests'
side of each comparison with transformers)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm.models.llama import forward


@functools.cache
def _jit_forward(graphdef: nnx.GraphDef):
    return jax.jit(functools.partial(forward, graphdef))


def lcm_logits(model: Any, tokens: np.ndarray) -> jax.Array:
    """``[B, T, V]`` logits of ``tokens [B, T]`` at positions ``0..T-1``, any model family."""
    batch, length = tokens.shape
    graphdef, params = nnx.split(model)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    cache = model.init_cache(batch, length)
    return _jit_forward(graphdef)(params, jnp.asarray(tokens, jnp.int32), positions, cache)[0]
