"""PyramidKV: budgets that fall with depth (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling", arXiv 2406.02069; NVIDIA kvpress ``PyramidKVPress``, whose arithmetic this
follows).

Lower layers spread their attention widely and upper layers focus it, so lower layers keep more entries. Each layer
ranks as SnapKV does (the last ``window`` prompt queries' attention to the earlier tokens, averaged by a 1-D pool of
``kernel``, the window itself always kept) and keeps its own number of entries; the layers' budgets form an
arithmetic sequence whose mean is ``budget``, so the cache holds what SnapKV's would in all, and after the prompt
each layer's buffer really has its own capacity (the Engine cuts each layer to what it holds).

The budgets, for a prompt of ``L`` tokens, ``N`` layers, mean budget ``B`` (kvpress ``get_layer_budget``, with
``B = L * (1 - compression_ratio)``): ``min = B / beta``, ``max = 2B - min``; if ``max >= L - window`` then
``max = L - window`` and ``min = 2B - max``; unless ``L >= max >= min >= window``, every layer keeps ``B`` (SnapKV);
otherwise layer ``i`` keeps ``round(max - i * (max - min) / (N - 1))`` entries, the window included. They depend on
the prompt's length, and are computed inside the jitted compression (no recompilation per length). When the rule
falls back to equal budgets (short prompts, or ``budget / beta`` below the window: at 2k tokens, budgets 256 and 512
with the window of 32), PyramidKV is SnapKV, and a one-line warning says so.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lcm.cache.kv import KVCache
from lcm.cache.policies import CacheOps, ChunkDone, SnapKV


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV's ranking with per-layer budgets falling linearly with depth, their mean ``budget``."""

    beta: int = 20  # how steep the pyramid is: the top layer keeps about budget / beta (kvpress's default 20)

    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, int) or self.beta < 1:
            raise ValueError(f"pyramidkv: beta={self.beta!r} must be an integer >= 1 (kvpress's default 20)")
        super().__post_init__()

    def layer_budget(self, index: int, num_layers: int, prompt_seen: jax.Array) -> jax.Array:
        return self._budget(jnp, index, num_layers, jnp.asarray(prompt_seen, jnp.float32)).astype(jnp.int32)

    def falls_back(self, num_layers: int, prompt_length: int) -> bool:
        """Whether kvpress's rule gives every layer the same budget for this prompt (SnapKV's)."""
        budgets = {int(self._budget(np, i, num_layers, float(prompt_length))) for i in range(num_layers)}
        return budgets == {self.budget}

    def after_chunk(self, cache: KVCache, chunk: ChunkDone, run: CacheOps) -> tuple[KVCache, int]:
        if chunk.last and chunk.filled > self.budget and self.falls_back(chunk.num_layers, chunk.prompt_seen):
            warnings.warn(
                f"pyramidkv: a budget of {self.budget} over {chunk.prompt_seen} tokens gives every layer the same "
                f"budget by kvpress's rule (it needs prompt >= top layer's >= bottom layer's >= window={self.window}, "
                f"the bottom about budget / beta={self.beta}): this is SnapKV",
                stacklevel=2,
            )
        return super().after_chunk(cache, chunk, run)

    def _budget(self, xp: Any, index: int, num_layers: int, length: Any) -> Any:
        """Layer ``index``'s budget by kvpress's arithmetic (module docstring), in ``xp`` (numpy or jax.numpy)."""
        mean, window = float(self.budget), float(self.window)
        low = mean / self.beta
        high = 2 * mean - low
        capped = high >= length - window
        high = xp.where(capped, length - window, high)
        low = xp.where(capped, 2 * mean - high, low)
        pyramid = (length >= high) & (high >= low) & (low >= window)
        step = (high - low) / max(num_layers - 1, 1)
        return xp.where(pyramid, xp.round(high - index * step), mean)
