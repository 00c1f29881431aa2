"""Greedy output ids of SmolLM2 on a fixed set of prompts, per KV policy: the "nothing changes" record of a refactor.

Run it on the code before a change and on the code after, into two files, then compare:

    python experiments/greedy_ids.py --out experiments/results/nothing_changes/before.jsonl
    python experiments/greedy_ids.py --out /tmp/after.jsonl
    python experiments/greedy_ids.py --compare experiments/results/nothing_changes/before.jsonl /tmp/after.jsonl

The cases: the full cache on passkey at 2k, 4k and 8k and NIAH at 2k and 4k; every bounded policy at 2k and 4k
with budgets 256 and 1024 on passkey and NIAH (2 samples each, needle depths 0.25 and 0.75). Locret runs with
retaining heads initialised from a fixed seed (untrained: the check is of the code path, not of Locret's accuracy;
trained heads live in a machine's cache and would make the record depend on it). Each case writes one JSON line
with the prompt's length and a hash of its ids, and the greedy ids (up to the task's ``max_new_tokens``, stopping
at an end-of-sequence token). Reruns into the same file skip the cases already there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

POLICIES = ("streamingllm", "snapkv", "h2o", "tokenselect", "infinipot", "locret", "knorm", "tova", "pyramidkv")
FULL_CASES = [("passkey", 2048), ("passkey", 4096), ("passkey", 8192), ("niah", 2048), ("niah", 4096)]
POLICY_CASES = [(task, length) for length in (2048, 4096) for task in ("passkey", "niah")]
BUDGETS = (256, 1024)
DEPTHS = (0.25, 0.75)


def cases() -> list[tuple[str, int, str, int]]:
    """(task, length, policy, budget) in the order they run: the cheap ones first."""
    full = [(task, length, "full", 0) for task, length in FULL_CASES]
    bounded = [(t, n, p, b) for p in POLICIES for b in BUDGETS for t, n in POLICY_CASES]
    return sorted(full + bounded, key=lambda c: (c[1], c[2] != "full"))


def _key(row: dict) -> tuple:
    return (row["task"], row["length"], row["policy"], row["budget"], row["index"])


def _model_for(model, policy: str):
    """Locret ranks by retaining heads; seeded untrained ones keep the record independent of the machine."""
    if policy != "locret":
        return model
    from flax import nnx

    from lcm.models.retaining import RetainingHeads, attach_retaining_heads

    return attach_retaining_heads(model, RetainingHeads(model.config, rngs=nnx.Rngs(0)))


def run(out: Path, policies: Sequence[str] | None = None) -> None:
    from lcm.cache.policies import parse_policy
    from lcm.evals.registry import get_task
    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model

    out.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(json.loads(line)) for line in out.read_text().splitlines()} if out.is_file() else set()
    model, tokenizer = load_model("smollm2", progress=False)
    stop_ids = list(tokenizer.eos_ids)
    tasks = {"passkey": "passkey", "niah": "niah_single_1"}
    with out.open("a") as sink:
        for task, length, policy, budget in cases():
            if policies is not None and policy not in policies:
                continue
            samples = get_task(tasks[task])(tokenizer, length, len(DEPTHS), seed=0, chat=True, depths=DEPTHS)
            todo = [s for s in samples if (task, length, policy, budget, s.index) not in done]
            if not todo:
                continue
            kv_policy = parse_policy(policy, budget).with_tokenizer(tokenizer)
            engine = Engine(_model_for(model, policy), chunk_size=512, policy=kv_policy)
            for sample in todo:
                started = time.perf_counter()
                ids = engine.generate(np.array([sample.ids]), sample.max_new_tokens, stop_ids=stop_ids)[0]
                row = {
                    "task": task,
                    "length": length,
                    "policy": policy,
                    "budget": budget,
                    "index": sample.index,
                    "n_tokens": len(sample.ids),
                    "prompt_sha256": hashlib.sha256(np.asarray(sample.ids, np.int32).tobytes()).hexdigest()[:16],
                    "ids": [int(t) for t in ids],
                    "text": tokenizer.decode(ids.tolist()),
                    "seconds": round(time.perf_counter() - started, 2),
                }
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(f"{task} {length} {policy}@{budget} #{sample.index}: {row['text']!r}", flush=True)


def compare(before: Path, after: Path) -> int:
    """Print every case whose ids differ (and cases missing from either file); exit status 1 if any differ."""
    rows = [{_key(r): r for r in map(json.loads, p.read_text().splitlines())} for p in (before, after)]
    differ = 0
    for key in sorted(set(rows[0]) | set(rows[1]), key=str):
        a, b = rows[0].get(key), rows[1].get(key)
        if a is None or b is None:
            print(f"{key}: only in {'after' if a is None else 'before'}")
            continue
        if a["prompt_sha256"] != b["prompt_sha256"]:
            print(f"{key}: different prompts ({a['prompt_sha256']} vs {b['prompt_sha256']})")
            differ += 1
        elif a["ids"] != b["ids"]:
            step = next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"], strict=False)) if x != y), None)
            print(f"{key}: ids differ at step {step}: {a['text']!r} vs {b['text']!r}")
            differ += 1
    both = len(set(rows[0]) & set(rows[1]))
    print(f"{both - differ} of {both} cases identical")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSONL to append to (resumes)")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--policies", help="comma-separated: run only these policies' cases (e.g. snapkv)")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give --out FILE or --compare BEFORE AFTER")
    policies = None
    if args.policies:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        unknown = sorted(set(policies) - {"full", *POLICIES})
        if unknown:
            parser.error(f"unknown policies {unknown}; choose from {['full', *POLICIES]}")
    run(args.out, policies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
