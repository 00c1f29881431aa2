"""A/B timing of builds of the CPU attention kernel (``lcm/kernels/attention/cpu_flash.cc``) in one process.

On a shared machine the same build's time drifts by ±10% from one minute to the next, more than most kernel
changes are worth. This script compiles every source given (e.g. the committed file and an edited copy) into its
own shared library, registers each under its own FFI name, checks that they compute the same outputs, and times
them alternately on one layer's prefill attention (SmolLM2 shapes: 9 query heads over 3 KV heads of 64, the
queries in 512-token chunks against a heads-first cache, as the Engine calls it), so drift hits every build alike.
Reported: the minimum and median over the repetitions, times 30 layers.

    python benchmarks/kernel_ab.py lcm/kernels/attention/cpu_flash.cc /tmp/edited.cc --length 4096 --reps 15
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lcm.kernels.attention import cpu
from lcm.kernels.attention.config import CpuConfig

_TUNED = CpuConfig()  # the kernel's tuned tiles

CHUNK = 512
LAYERS = 30
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def build(source: Path, directory: Path, index: int) -> str:
    """Compile ``source`` with the kernel's own flags into ``directory``, register it; the FFI target's name."""
    original = cpu.SOURCE
    try:
        cpu.SOURCE = Path(source)
        library = ctypes.cdll.LoadLibrary(str(cpu.build_library(directory)))
    finally:
        cpu.SOURCE = original
    name = f"lcm_kernel_ab_{index}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(library.LcmCpuFlashForward), platform="cpu")
    return name


def attention_flops(length: int) -> float:
    """Q·Kᵀ and P·V over the causal region each 512-query chunk sees, one layer."""
    visible = sum(start * CHUNK + CHUNK * (CHUNK + 1) / 2 for start in range(0, length, CHUNK))
    return 4 * HEADS * HEAD_DIM * visible


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="cpu_flash.cc variants; the first is the baseline")
    parser.add_argument("--length", type=int, default=4096, help="prefill tokens (a multiple of 512)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--q-tile", type=int, default=_TUNED.q_block)
    parser.add_argument("--kv-block", type=int, default=_TUNED.kv_block)
    parser.add_argument("--long-q-tile", type=int, default=_TUNED.long_q_block, help="query tile past --long-keys keys")
    parser.add_argument("--long-keys", type=int, default=_TUNED.long_keys, help="0: never the long tile")
    args = parser.parse_args(argv)
    if args.length <= 0 or args.length % CHUNK:
        parser.error(f"--length={args.length} must be a positive multiple of {CHUNK}")
    for source in args.sources:
        if not source.is_file():
            parser.error(f"source {str(source)!r} does not exist")

    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.standard_normal((1, KV_HEADS, args.length, HEAD_DIM), np.float32))
    values = jnp.asarray(rng.standard_normal((1, KV_HEADS, args.length, HEAD_DIM), np.float32))
    queries = [
        jnp.asarray(2 * rng.standard_normal((1, CHUNK, HEADS, HEAD_DIM), np.float32))
        for _ in range(args.length // CHUNK)
    ]

    with tempfile.TemporaryDirectory() as tmp:
        names = [build(source, Path(tmp), i) for i, source in enumerate(args.sources)]

    tiles = CpuConfig(
        q_block=args.q_tile, kv_block=args.kv_block, long_q_block=args.long_q_tile, long_keys=args.long_keys
    )

    def program(name: str):
        def run(q, k, v, offset):
            return cpu.flash_call(
                name, q, k, v, offset, offset + CHUNK, jnp.zeros((1,), jnp.int32),
                window=None, sinks=0, scale=HEAD_DIM**-0.5, tiles=tiles,
            )  # fmt: skip

        return jax.jit(run)

    programs = [program(name) for name in names]

    def prefill(run) -> list[jax.Array]:
        outs = [run(q, keys, values, jnp.int32(i * CHUNK)) for i, q in enumerate(queries)]
        return jax.block_until_ready(outs)

    reference = np.concatenate(prefill(programs[0]), axis=1)
    for source, run in zip(args.sources[1:], programs[1:], strict=True):
        diff = float(np.abs(np.concatenate(prefill(run), axis=1) - reference).max())
        print(f"{source}: max |difference| from {args.sources[0]} = {diff:.2e}")
    times: list[list[float]] = [[] for _ in programs]
    for _ in range(args.reps):
        for i, run in enumerate(programs):
            start = time.perf_counter()
            prefill(run)
            times[i].append(time.perf_counter() - start)
    flops = attention_flops(args.length)
    print(f"one layer's attention over a {args.length}-token prefill, x{LAYERS} layers, {args.reps} alternating reps")
    for source, t in zip(args.sources, times, strict=True):
        t = np.asarray(t)
        print(
            f"{source}: min {LAYERS * t.min():.2f} s, median {LAYERS * np.median(t):.2f} s "
            f"({flops / t.min() / 1e9:.1f} GFLOP/s at the minimum)"
        )


if __name__ == "__main__":
    main()
