"""Position schemes (SelfExtend, DCA, ReRoPE) against plain RoPE: prefill and decode time at 16k, one process.

    python benchmarks/extrapolation_speed.py [--length 16384] [--steps 8] [--reps 3] [--methods ...]

The model is SmolLM2-135M's architecture (``smollm2-135m`` preset, 30 layers, 9 query / 3 KV heads of 64) with
random weights in float32: time does not depend on the weights' values. Every method runs on the same attention
backend, lcm's tiled XLA path (``attention_implementation="xla"``: a scheme's parts return their log-sum-exp, which
the CPU kernel does not), keys cached before RoPE (what a scheme needs; the plain row stores them so too, so the
ratio is the scheme's attention and nothing else); ``plain (auto)`` is the default configuration (the CPU kernel,
keys stored rotated) for reference.

- prefill: :meth:`lcm.generate.Engine.prefill` of ``--length`` random tokens in chunks of 512, after one warm-up
  prefill of 1024 tokens into a cache of the same capacity (the same compiled chunk program), one timed run per
  method, the methods in a different order each rep (``--reps`` of them, median);
- decode: ``--steps`` greedy :func:`lcm.steps.decode_step` calls on the filled cache, mean per token, median of reps.

Prints a markdown table with each method's ratio to ``plain (xla)`` measured in the same process.
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

from lcm import steps
from lcm.generate import Engine
from lcm.models.llama import LlamaConfig, random_model, with_config
from lcm.ops import position_schemes

METHODS = ("plain (xla)", "plain (auto)", "selfextend", "dca", "rerope:window=512", "rerope:window=512,leak=16")


def _engine(base, name: str) -> Engine:
    cfg = base.config
    if name == "plain (auto)":
        return Engine(base, chunk_size=512)
    cfg = dataclasses.replace(cfg, attention_implementation="xla")
    if name != "plain (xla)":
        cfg = cfg.with_position_scheme(position_schemes.parse_position_scheme(name))
    return Engine(with_config(base, cfg), chunk_size=512, keys_pre_rope=True)


def _prefill(engine: Engine, tokens: np.ndarray, capacity: int):
    cache = engine.new_cache(1, capacity)
    logits, cache = engine.prefill(tokens, cache)
    jax.block_until_ready(logits)
    return cache


def _decode(engine: Engine, cache, length: int, steps_: int) -> float:
    token = jnp.zeros((1,), jnp.int32)
    token, cache = steps.decode_step(engine.graphdef, engine.params, token, jnp.asarray([length]), cache)
    jax.block_until_ready(token)  # compiles
    started = time.perf_counter()
    for i in range(steps_):
        token, cache = steps.decode_step(engine.graphdef, engine.params, token, jnp.asarray([length + 1 + i]), cache)
    jax.block_until_ready(token)
    return 1e3 * (time.perf_counter() - started) / steps_


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="';'-separated, default: all")
    args = parser.parse_args(argv)
    methods = args.methods.split(";") if ";" in args.methods else list(METHODS)
    base = random_model(LlamaConfig.preset("smollm2-135m"), seed=0)
    tokens = np.random.default_rng(0).integers(0, base.config.vocab_size, (1, args.length)).astype(np.int32)
    capacity = args.length + 512
    engines = {name: _engine(base, name) for name in methods}
    for engine in engines.values():  # compile the chunk programs of this capacity
        _prefill(engine, tokens[:, :1024], capacity)
    prefill: dict[str, list[float]] = {name: [] for name in methods}
    decode: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(args.reps):
        order = methods if rep % 2 == 0 else methods[::-1]
        for name in order:
            started = time.perf_counter()
            cache = _prefill(engines[name], tokens, capacity)
            prefill[name].append(time.perf_counter() - started)
            decode[name].append(_decode(engines[name], cache, args.length, args.steps))
            print(f"# rep {rep} {name}: prefill {prefill[name][-1]:.1f} s, decode {decode[name][-1]:.1f} ms/token")
    device = f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}"
    print(f"# {device}; {args.length} tokens, chunks of 512, {args.reps} rep(s), decode {args.steps} steps")
    print("| method | prefill s | x plain (xla) | decode ms/token | x plain (xla) |")
    print("|---|---|---|---|---|")
    ref_p, ref_d = statistics.median(prefill["plain (xla)"]), statistics.median(decode["plain (xla)"])
    for name in methods:
        p, d = statistics.median(prefill[name]), statistics.median(decode[name])
        print(f"| {name} | {p:.1f} | {p / ref_p:.2f} | {d:.1f} | {d / ref_d:.2f} |")


if __name__ == "__main__":
    main()
