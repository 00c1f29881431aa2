"""A/B timing of one prefill chunk with and without attention-mass observers, in one process.

H2O and SnapKV rank cached entries by the attention they receive: their prefill chunks add each layer's
attention mass to each layer's ``scores`` (``observers``). This times exactly the Engine's compiled chunk
(:func:`lcm.steps.prefill_chunk`) of a SmolLM2-shaped model (random weights: the time does not depend on them)
written after ``--lengths`` filled slots, observed by every query and by none (the anchor: the full cache's
chunk), alternately, so that the drift of a shared machine hits both alike. Reported: minimum and median
seconds per chunk, their ratio, and how many copies of the whole stacked ``[L, B, K, S, D]`` keys or values and
``[L, B, K, S]`` scores the compiled chunk makes (XLA's ``copy`` ops of those shapes: 0 when it writes in place).

    python benchmarks/observed_prefill_ab.py --lengths 2048,7680 --chunk 512
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm.cli import int_list
from lcm.models.llama import Llama, LlamaConfig
from lcm.steps import prefill_chunk


def _time_length(
    model: Llama, graphdef: nnx.GraphDef, params: nnx.State, length: int, chunk: int, reps: int, keys_pre_rope: bool
) -> None:
    """Print the rows of one filled length: the chunk observed by no query (the anchor) and by every query."""
    cache = model.init_cache(1, length + chunk, keys_pre_rope=keys_pre_rope)
    rng = np.random.default_rng(length)
    shape = cache.layers[0].keys.shape
    keys = [rng.standard_normal(shape, np.float32) for _ in cache.layers]
    values = [rng.standard_normal(shape, np.float32) for _ in cache.layers]
    tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (1, chunk), dtype=np.int32))
    positions = jnp.arange(length, length + chunk, dtype=jnp.int32)[None]
    runs = {"unobserved": None, "observed": jnp.ones((1, chunk), bool)}

    def fresh():  # the chunk donates its cache: a new copy for every call, built outside the timed call
        filled = cache.replace_layers(
            keys=[jnp.asarray(k) for k in keys],
            values=[jnp.asarray(v) for v in values],
            scores=[jnp.zeros(shape[:3], jnp.float32) for _ in cache.layers],
            positions=jnp.arange(cache.capacity, dtype=jnp.int32)[None],
            length=jnp.int32(length),
        )
        return (graphdef, params, tokens, positions, jnp.int32(chunk), jnp.int32(length + chunk), filled)

    shapes = {"f32[{}]".format(",".join(map(str, s))) for s in (shape, shape[:3])}
    copies = {}
    for name, observers in runs.items():
        hlo = prefill_chunk.lower(*fresh(), observers).compile().as_text()
        copies[name] = sum(shape in shapes for shape in re.findall(r"= (f32\[[^\]]*\])\S* copy\(", hlo))
        jax.block_until_ready(prefill_chunk(*fresh(), observers))
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, observers in runs.items():
            arguments = jax.block_until_ready(fresh())
            start = time.perf_counter()
            jax.block_until_ready(prefill_chunk(*arguments, observers))
            times[name].append(time.perf_counter() - start)
    anchor = statistics.median(times["unobserved"])
    for name, t in times.items():
        median = statistics.median(t)
        cells = [length, name, copies[name], f"{min(t):.3f}", f"{median:.3f}", f"{median / anchor:.2f}x"]
        print("| " + " | ".join(map(str, cells)) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int_list, default="2048,7680", help="filled slots before the chunk")
    parser.add_argument("--chunk", type=int, default=512, help="chunk tokens")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--keys-pre-rope", action="store_true", help="keys stored before RoPE (re-rotated per read)")
    args = parser.parse_args(argv)
    if args.chunk <= 0 or args.reps <= 0 or min(args.lengths) < 0:
        parser.error("need a positive --chunk and --reps and non-negative --lengths")

    model = Llama(LlamaConfig.preset("smollm2-135m"), rngs=nnx.Rngs(0))  # SmolLM2's shapes are the config defaults
    graphdef, params = nnx.split(model)
    chunk = args.chunk
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; chunk {chunk}, reps {args.reps}")
    print("| filled | chunk observed | stacked copies | s/chunk min | s/chunk median | median / unobserved |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        _time_length(model, graphdef, params, length, chunk, args.reps, args.keys_pre_rope)


if __name__ == "__main__":
    main()
