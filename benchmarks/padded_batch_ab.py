"""A/B timing of a left-padded batch (what the eval grid runs) with different attention implementations.

Prompts of different lengths go through :meth:`lcm.generate.Engine.generate_many` as one left-padded batch on a
SmolLM2-shaped model (random weights, random token ids), once per implementation per repetition, alternately, so
that drift hits every implementation alike. Reported per repetition: prefill and decode seconds of the whole batch
(the Engine's own timers), and whether every implementation produced the same greedy tokens.

    python benchmarks/padded_batch_ab.py --implementations xla,auto --lengths 2048,1900,1700 --new-tokens 8
"""

from __future__ import annotations

import argparse

import numpy as np
from flax import nnx

from lcm.cli import int_list, str_list
from lcm.generate import Engine
from lcm.kernels.attention import api
from lcm.models.llama import Llama, LlamaConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--implementations", type=str_list, default="xla,auto", help="attention implementations, comma-separated"
    )
    parser.add_argument(
        "--lengths", type=int_list, default="2048,1900,1700", help="prompt lengths of the batch, comma-separated"
    )
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    implementations, lengths = args.implementations, args.lengths
    for name in implementations:
        api.resolve(name)  # a one-line ValueError for an unknown name
    if args.new_tokens <= 0 or args.reps <= 0:
        parser.error("need positive --new-tokens and --reps")

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, LlamaConfig.preset("smollm2-135m").vocab_size, n).tolist() for n in lengths]
    engines = {
        name: Engine(
            Llama(LlamaConfig.preset("smollm2-135m", attention_implementation=name), rngs=nnx.Rngs(0)), chunk_size=512
        )
        for name in implementations
    }
    print(f"batch of {len(prompts)} prompts {lengths}, {args.new_tokens} new tokens; the first repetition compiles")
    print("| repetition | implementation | prefill s | decode s | tokens as the first |")
    print("|---|---|---|---|---|")
    for rep in range(args.reps):
        outputs = {}
        for name, engine in engines.items():
            outputs[name] = engine.generate_many(prompts, args.new_tokens, [], batch_size=len(prompts))
            first = outputs[implementations[0]]
            same = all(np.array_equal(a, b) for a, b in zip(first, outputs[name], strict=True))
            cells = [rep, name, f"{engine.last_prefill_seconds:.2f}", f"{engine.last_decode_seconds:.2f}"]
            print("| " + " | ".join(map(str, cells)) + f" | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
