"""Inference layers unrolled vs scanned (``LlamaConfig.scan_layers``): compile and run time, in one process.

A SmolLM2-shaped model (random weights: the time does not depend on them), float32, the default attention, and
exactly the Engine's compiled programs: a prefill chunk of ``--chunk`` tokens written after ``--lengths`` filled
slots (:func:`lcm.steps.prefill_chunk`) and single-token decode steps against the same cache
(:func:`lcm.steps.decode_step`). For each program and layout: the compile seconds (trace + lower + XLA, no disk
cache), then the two layouts timed alternately, ``--reps`` runs each, minimum and median. The scanned layout stacks
the 30 layers' parameters and caches inside the program on every call (lcm keeps one state per layer, of its own
capacity) and unstacks the caches after the scan.

    python benchmarks/layer_scan_ab.py --lengths 2048,8192 --chunk 512 --reps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm.cli import int_list
from lcm.models.llama import Llama, LlamaConfig
from lcm.steps import decode_step, prefill_chunk

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from decode_ab import filled_cache  # noqa: E402

LAYOUTS = {"unrolled": False, "scanned": True}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int_list, default="2048,8192", help="filled cache lengths")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repetition")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.chunk, args.steps, args.reps) <= 0:
        parser.error("need positive --chunk, --steps and --reps")
    model = Llama(LlamaConfig.preset("smollm2-135m"), rngs=nnx.Rngs(0))
    _, params = nnx.split(model)
    graphdefs = {}
    for name, scan in LAYOUTS.items():
        model.config = dataclasses.replace(model.config, scan_layers=scan)
        graphdefs[name] = nnx.split(model)[0]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; chunk {args.chunk}, steps {args.steps}")
    print("| filled | program | layout | compile s | min | median | output as unrolled |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        _rows(graphdefs, params, filled_cache(model, length, seed=length, free=args.chunk), length, args)


def _rows(graphdefs: dict[str, nnx.GraphDef], params: nnx.State, fresh, length: int, args: argparse.Namespace) -> None:
    """Print the rows of one filled length: each program compiled, then timed, in both layouts."""
    vocab = nnx.merge(graphdefs["unrolled"], params).config.vocab_size
    tokens = jnp.asarray(np.random.default_rng(length + 1).integers(0, vocab, (1, args.chunk), dtype=np.int32))
    positions = jnp.arange(length, length + args.chunk, dtype=jnp.int32)[None]
    valid, rope_len = jnp.int32(args.chunk), jnp.int32(length + args.chunk)
    first, at = jnp.zeros((1,), jnp.int32), jnp.full((1,), length, jnp.int32)

    def prefill(graphdef: nnx.GraphDef, cache) -> jax.Array:
        return prefill_chunk(graphdef, params, tokens, positions, valid, rope_len, cache)[0]

    def decode(graphdef: nnx.GraphDef, cache) -> jax.Array:
        token, out = first, []
        for step in range(args.steps):
            token, cache = decode_step(graphdef, params, token, at + step, cache)
            out.append(token)
        return jnp.concatenate(out)

    programs = {
        "prefill chunk": (
            prefill,
            lambda g: prefill_chunk.lower(g, params, tokens, positions, valid, rope_len, fresh()),
        ),
        "decode step": (decode, lambda g: decode_step.lower(g, params, first, at, fresh())),
    }
    for program, (run, lower) in programs.items():
        compile_s, times, outputs = {}, {name: [] for name in LAYOUTS}, {}
        for name in LAYOUTS:
            start = time.perf_counter()
            lower(graphdefs[name]).compile()
            compile_s[name] = time.perf_counter() - start
            jax.block_until_ready(run(graphdefs[name], fresh()))  # the jit cache's own compile, untimed
        per = args.steps if program == "decode step" else 1
        for _ in range(args.reps):
            for name in LAYOUTS:
                cache = fresh()
                start = time.perf_counter()
                outputs[name] = jax.block_until_ready(run(graphdefs[name], cache))
                times[name].append((time.perf_counter() - start) / per * 1e3)
        for name in LAYOUTS:
            same = np.allclose(np.asarray(outputs[name]), np.asarray(outputs["unrolled"]), atol=1e-3, rtol=1e-3)
            t = times[name]
            row = [
                length,
                program,
                name,
                f"{compile_s[name]:.1f}",
                f"{min(t):.1f} ms",
                f"{statistics.median(t):.1f} ms",
            ]
            print("| " + " | ".join(map(str, row)) + f" | {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
