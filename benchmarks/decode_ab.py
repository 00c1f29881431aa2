"""A/B timing of whole-model decode steps with different attention implementations, in one process.

A decode step is one token through the 30 layers of a SmolLM2-shaped model (random weights: the time does not
depend on them) against a cache filled to each ``--lengths`` value, exactly the Engine's compiled step
(:func:`lcm.steps.decode_step`). Every implementation is compiled once per length (compile time reported),
then the implementations are timed alternately, ``--steps`` greedy steps per repetition, so that the drift of a
shared machine hits them alike. Reported: compile seconds, minimum and median ms/token, and whether the
implementations produced the same tokens.

    python benchmarks/decode_ab.py --implementations xla,auto --lengths 2048,8192,16384
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm.cli import int_list, str_list
from lcm.kernels.attention import api
from lcm.models.llama import Llama, LlamaConfig
from lcm.steps import decode_step


def filled_cache(model: Llama, length: int, seed: int, free: int = 64):
    """``fresh()``: a new copy of a cache of capacity ``length + free`` whose first ``length`` slots hold random
    keys and values (the same every call)."""
    cache = model.init_cache(1, length + free)
    rng = np.random.default_rng(seed)
    shape = cache.layers[0].keys.shape
    keys = [rng.standard_normal(shape, np.float32) for _ in cache.layers]
    values = [rng.standard_normal(shape, np.float32) for _ in cache.layers]

    def fresh():  # the step donates its cache: a new copy for every repetition
        return cache.replace_layers(
            keys=[jnp.asarray(k) for k in keys],
            values=[jnp.asarray(v) for v in values],
            positions=jnp.asarray(np.arange(cache.capacity, dtype=np.int32)[None]),
            length=jnp.int32(length),
        )

    return fresh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--implementations", type=str_list, default="xla,auto", help="attention implementations, comma-separated"
    )
    parser.add_argument(
        "--lengths", type=int_list, default="2048,8192,16384", help="filled cache lengths, comma-separated"
    )
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repetition")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    implementations, lengths = args.implementations, args.lengths
    for name in implementations:
        api.resolve(name)  # a one-line ValueError for an unknown name
    if args.steps <= 0 or args.reps <= 0:
        parser.error("need positive --steps and --reps")

    model = Llama(LlamaConfig.preset("smollm2-135m"), rngs=nnx.Rngs(0))  # SmolLM2's shapes are the config defaults
    _, params = nnx.split(model)
    graphdefs, runs = {}, {}
    for name in implementations:
        model.config = dataclasses.replace(model.config, attention_implementation=name)
        graphdefs[name] = nnx.split(model)[0]
        runs[name] = (graphdefs[name], decode_step)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; steps {args.steps}, reps {args.reps}")
    print("| filled | implementation | compile s | ms/token min | ms/token median | tokens as the first |")
    print("|---|---|---|---|---|---|")
    for length in lengths:
        fresh = filled_cache(model, length, seed=length)
        first = jnp.zeros((1,), jnp.int32)
        compile_seconds = {}
        for name, (graphdef, step_fn) in runs.items():
            start = time.perf_counter()
            step_fn.lower(graphdef, params, first, jnp.full((1,), length, jnp.int32), fresh()).compile()
            compile_seconds[name] = time.perf_counter() - start
            step_fn(graphdef, params, first, jnp.full((1,), length, jnp.int32), fresh())[0].block_until_ready()
        times = {name: [] for name in runs}
        tokens = {}
        for _ in range(args.reps):
            for name, (graphdef, step_fn) in runs.items():
                cache, token, out = fresh(), first, []
                start = time.perf_counter()
                for step in range(args.steps):
                    position = jnp.full((1,), length + step, jnp.int32)
                    token, cache = step_fn(graphdef, params, token, position, cache)
                    out.append(token)
                token.block_until_ready()
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
                tokens[name] = np.concatenate([np.asarray(t) for t in out])
        reference = tokens[next(iter(runs))]
        for name in runs:
            same = "yes" if np.array_equal(tokens[name], reference) else "no"
            t = times[name]
            cells = [length, name, f"{compile_seconds[name]:.1f}", f"{min(t):.1f}", f"{statistics.median(t):.1f}", same]
            print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
