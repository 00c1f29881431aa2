"""Gemma 3's sliding-window layers with window buffers vs every layer full: KV memory and decode time per token.

    python benchmarks/gemma3_window.py [--lengths 8192,32768] [--steps 16] [--reps 3]

The model is Gemma 3 270M's architecture (``gemma3-270m`` preset: 18 layers, 15 of them local with a 512-token
window, 1 KV head of 256) with random weights in float32 — decode time does not depend on the weights' values.
For each filled length ``L`` (the cache's capacity ``L + 64``):

- ``window``: what :meth:`lcm.models.gemma3.Gemma3.init_cache` builds: the 15 local layers hold their 512 latest
  entries (:class:`lcm.cache.kv.WindowCache`), the 3 global layers all ``L``;
- ``full``: every layer a full buffer of ``L + 64`` slots (the local layers' window then a mask over it, the same
  outputs: tests/models/test_gemma3.py).

Memory is the cache's bytes (keys, values, positions), from shapes only. Decode time is ``lcm.steps.decode_step``
(one jitted greedy step, the cache donated) on a cache whose filled slots hold random keys and values, the median
over ``--reps`` of the mean of ``--steps`` steps, both layouts alternating in one process; the first token of each
is compared (equal caches give equal tokens, so the two layouts must agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm import steps
from lcm.cache.kv import KVCache, WindowCache, init_cache
from lcm.models import families
from lcm.models.gemma3 import Gemma3, random_model

FREE = 64


def _filled(model: Gemma3, length: int, window_layers: bool, seed: int) -> KVCache:
    """A cache for ``length + FREE`` entries whose first ``length`` hold random keys/values at positions 0..;
    window layers hold the latest ``window`` of the same entries (so both layouts hold the same sequence)."""
    cfg = model.config
    capacity = length + FREE
    full = init_cache(cfg.num_layers, 1, capacity, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype)
    rng = np.random.default_rng(seed)
    layers = []
    template = model.init_cache(1, capacity) if window_layers else full
    for layer in template.layers:
        shape = (1, cfg.num_kv_heads, capacity, cfg.head_dim)
        keys = rng.standard_normal(shape, np.float32)
        values = rng.standard_normal(shape, np.float32)
        positions = np.arange(capacity, dtype=np.int32)[None]
        if isinstance(layer, WindowCache):  # the window's latest entries, right-aligned
            latest = slice(length - layer.window, length)
            keys, values, positions = keys[:, :, latest], values[:, :, latest], positions[:, latest]
        layers.append(
            dataclasses.replace(
                layer,
                keys=jnp.asarray(keys),
                values=jnp.asarray(values),
                positions=jnp.asarray(positions),
                length=jnp.int32(length),
            )
        )
    return dataclasses.replace(template, layers=tuple(layers))


def _bytes(model: Gemma3, capacity: int, window_layers: bool) -> int:
    cfg = model.config
    if window_layers:
        shapes = jax.eval_shape(lambda: model.init_cache(1, capacity))
    else:
        shapes = jax.eval_shape(
            lambda: init_cache(cfg.num_layers, 1, capacity, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype)
        )
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    model = random_model(families.preset("gemma3-270m"), seed=0)
    graphdef, params = nnx.split(model)
    print(f"# {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| filled | layout | KV cache MiB | decode ms/token (median of reps) | first token |")
    print("|---|---|---|---|---|")
    for length in [int(x) for x in args.lengths.split(",")]:
        times: dict[bool, list[float]] = {True: [], False: []}
        first: dict[bool, int] = {}
        for rep in range(args.reps + 1):  # rep 0 compiles
            for window_layers in (True, False) if rep % 2 else (False, True):
                cache = _filled(model, length, window_layers, seed=length)
                token = jnp.zeros((1,), jnp.int32)
                token, cache = steps.decode_step(graphdef, params, token, jnp.asarray([length]), cache)
                jax.block_until_ready(token)
                first[window_layers] = int(token[0])
                started = time.perf_counter()
                for i in range(args.steps):
                    token, cache = steps.decode_step(graphdef, params, token, jnp.asarray([length + 1 + i]), cache)
                jax.block_until_ready(token)
                if rep:
                    times[window_layers].append(1e3 * (time.perf_counter() - started) / args.steps)
        for window_layers in (True, False):
            mib = _bytes(model, length + FREE, window_layers) / 2**20
            name = "window" if window_layers else "full"
            ms = statistics.median(times[window_layers])
            print(f"| {length} | {name} | {mib:.1f} | {ms:.1f} | {first[window_layers]} |")
        if first[True] != first[False]:
            raise SystemExit(f"the layouts disagree at {length}: first tokens {first[True]} vs {first[False]}")


if __name__ == "__main__":
    main()
