"""The training forward's layers unrolled vs scanned: compile time and step time of a loss gradient, in one process.

A SmolLM2-shaped model (random weights: the time does not depend on them), float32, the default attention; one
jitted ``value_and_grad`` of the mean next-token loss over ``--batch`` rows of ``--length`` tokens (two packed
documents per row), for each of: unrolled blocks, ``scan=True``, and both with ``remat=True``. Compile seconds
(trace + lower + XLA), then the variants timed alternately, ``--reps`` runs each, minimum and median reported.

    python benchmarks/train_forward_ab.py [--length 512] [--batch 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm.models.llama import LlamaConfig, random_model

VARIANTS = {
    "unrolled": {},
    "scan": {"scan": True},
    "unrolled+remat": {"remat": True},
    "scan+remat": {"scan": True, "remat": True},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    if min(args.length, args.batch, args.reps) <= 0:
        parser.error("--length, --batch and --reps must be positive")
    cfg = LlamaConfig.preset("smollm2-135m")
    graphdef, params = nnx.split(random_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.length)), jnp.int32)
    half = args.length // 2
    segments = jnp.asarray(np.repeat([[0, 1]], [half, args.length - half], axis=1).repeat(args.batch, 0), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(args.length, dtype=jnp.int32), tokens.shape)

    def make(options):
        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(tokens, positions, segment_ids=segments, **options)
            logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1))

        return jax.jit(jax.value_and_grad(loss))

    compiled, compile_s, values = {}, {}, {}
    for name, options in VARIANTS.items():
        start = time.perf_counter()
        compiled[name] = make(options).lower(params).compile()
        compile_s[name] = time.perf_counter() - start
        values[name] = float(compiled[name](params)[0])
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        for name in VARIANTS if rep % 2 == 0 else list(VARIANTS)[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](params))
            times[name].append(time.perf_counter() - start)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch} x {args.length} tokens")
    print("| layers | compile s | step s min | step s median | loss |")
    print("|---|---|---|---|---|")
    for name in VARIANTS:
        row = (compile_s[name], min(times[name]), statistics.median(times[name]), values[name])
        print(f"| {name} | {row[0]:.1f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.6f} |")


if __name__ == "__main__":
    main()
