"""Greedy passkey answers of Gemma 3 270M in lcm and in `transformers`, prompt by prompt: the output ids must agree.

Each trial's prompt is built as ``lcm eval passkey`` builds it (:func:`lcm.evals.passkey.build_prompt`, the key and
depth drawn per trial from ``--seed``), tokenised by lcm's Gemma tokenizer; lcm runs it through the Engine (chunked
prefill, ring-buffered local layers, decode on device), transformers through ``generate`` on the same GGUF
dequantised in float32 (eager attention, its sliding-window mask). Where the ids differ, the first differing step's
top-2 logit margin in transformers is recorded (a near-tie below 0.05 is float32 summation order, not a bug).

    python experiments/gemma3_passkey_parity.py --length 4096 --trials 10 \
        --out experiments/results/gemma3/passkey_parity_4k.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="JSONL, one line per trial (overwritten)")
    args = parser.parse_args(argv)
    if args.length <= 0 or args.trials <= 0 or args.max_new_tokens <= 0:
        parser.error("--length, --trials and --max-new-tokens must be positive")
    if args.out.exists() and not args.out.is_file():
        parser.error(f"--out {args.out} is not a file")

    import torch
    from transformers import AutoModelForCausalLM

    from lcm.evals.passkey import build_prompt
    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model
    from lcm.io.fetch import model_path

    path = model_path("gemma3-270m")
    model, tokenizer = load_model(path, progress=False)
    engine = Engine(model, chunk_size=512)
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    same = 0
    with args.out.open("w") as out:
        for trial in range(args.trials):
            rng = np.random.default_rng((args.seed, args.length, trial))
            key, depth = int(rng.integers(10000, 100000)), float(rng.uniform())
            prompt = build_prompt(tokenizer, args.length, key, depth)
            started = time.perf_counter()
            ours = engine.generate(np.asarray([prompt.ids]), args.max_new_tokens)[0].tolist()
            lcm_s = time.perf_counter() - started
            started = time.perf_counter()
            with torch.inference_mode():
                generated = reference.generate(
                    torch.tensor([prompt.ids]),
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            theirs = generated.sequences[0, len(prompt.ids) :].tolist()
            row = {
                "trial": trial,
                "length": len(prompt.ids),
                "key": key,
                "depth": round(depth, 4),
                "lcm": ours,
                "transformers": theirs,
                "same": ours == theirs[: len(ours)] and len(ours) == len(theirs),
                "answer": tokenizer.decode(ours),
                "lcm_s": round(lcm_s, 1),
                "transformers_s": round(time.perf_counter() - started, 1),
            }
            if not row["same"]:
                step = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
                top = torch.topk(generated.scores[step][0], 2).values
                row["first_difference"] = step
                row["top2_margin"] = round(float(top[0] - top[1]), 4)
            same += row["same"]
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)
    print(f"identical greedy ids: {same}/{args.trials}")
    return 0 if same == args.trials else 1


if __name__ == "__main__":
    raise SystemExit(main())
