"""One passkey trial through `transformers` (the independent reference), to tell a model's miss from an lcm bug.

The trial is rebuilt exactly as ``lcm.evals.passkey.run_passkey`` draws it (seed, length, trial index -> key and
depth) and run with greedy ``generate`` on SmolLM2 dequantised from the same GGUF, float32, SDPA. Compare its
answer with the ``output`` of that trial in lcm's records.

    python experiments/passkey_vs_transformers.py --length 8192 --trial 3     # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--trial", type=int, default=0, help="trial index in run_passkey's order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    if args.length <= 0 or args.trial < 0 or args.max_new_tokens <= 0:
        parser.error("need a positive --length and --max-new-tokens and a non-negative --trial")

    import torch
    from transformers import AutoModelForCausalLM

    from lcm.evals.passkey import build_prompt
    from lcm.io.fetch import model_path
    from lcm.io.tokenizer import load_tokenizer

    path = model_path("smollm2")
    tokenizer = load_tokenizer(path)
    rng = np.random.default_rng((args.seed, args.length, args.trial))  # as run_passkey draws: key, then depth
    key = int(rng.integers(10000, 100000))
    depth = float(rng.uniform())
    prompt = build_prompt(tokenizer, args.length, key, depth)
    print(f"trial {args.trial}: key {key}, depth {depth:.3f}, {len(prompt.ids)} tokens", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt.ids]), max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(out[0, len(prompt.ids) :].tolist())
    print(f"transformers: {answer!r} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
