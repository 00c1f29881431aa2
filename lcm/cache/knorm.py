"""Knorm: keep the keys of smallest L2 norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy
for KV Cache Compression", arXiv 2406.11430; NVIDIA kvpress ``KnormPress``).

The paper finds that a key's L2 norm is inversely related to the attention it receives, so the lowest-norm keys
are the ones to keep; it needs no attention statistic at all, only the keys themselves, which is what
:meth:`lcm.cache.policies.KVPolicy.rank` sees (the layer's whole state). As kvpress does, once after the prompt,
per layer and KV head, nothing protected (no sinks, no recent window). A rotation does not change a norm, so keys
stored rotated or before RoPE rank alike (up to round-off).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lcm.cache.kv import LayerCache
from lcm.cache.policies import KVPolicy


@dataclasses.dataclass(frozen=True)
class Knorm(KVPolicy):
    """The ``budget`` keys of smallest L2 norm per layer and KV head, after the prompt; keys keep their positions."""

    name: ClassVar[str] = "knorm"

    def min_budget(self) -> int:
        return 1

    def promised(self) -> str:
        return "at least 1 token"

    def rank(self, layer: LayerCache, prompt_seen: jax.Array, final: bool) -> Float[Array, "B K S"]:
        """Minus each filled slot's key norm (float32), ``-inf`` for empty slots."""
        norms = jnp.sqrt(jnp.sum(jnp.square(layer.keys.astype(jnp.float32)), axis=-1))  # [B, K, S]
        filled = jnp.arange(norms.shape[-1]) < layer.length
        return jnp.where(filled, -norms, -jnp.inf)
