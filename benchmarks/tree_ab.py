"""Before/after timing of two source trees of lcm (a refactor's "speed holds" check), alternating, in one run.

    git worktree add /tmp/before <commit>
    python benchmarks/tree_ab.py /tmp/before . --reps 3 [--length 2048] [--policies h2o,snapkv,...]

Every measurement runs in a fresh subprocess whose ``PYTHONPATH`` puts one tree's ``lcm`` first, the trees
alternating (A B, B A, A B, ...) so that a slow minute of a shared machine hits both alike; the table shows
medians over ``--reps``. Measured, on the real SmolLM2 (float32, the default attention):

- ``model``: ``benchmarks/cpu_inference.py``'s own cell from that tree: whole-model prefill of ``--length``
  tokens (the second of two runs), decode ms/token over 32 steps, and the compile time of those programs with
  the persistent cache off;
- ``policy P``: the same prompt under KV policy ``P`` at budget ``--budget``: the second of two ``generate``
  calls, its prefill seconds and decode ms/token (the Engine's own timers);
- ``locret labels``: Locret's labelling forward (features and CIS labels of a ``--length``-token prompt and a
  128-token answer, :func:`lcm.train.locret_labels.make_example_fn`): the second call's seconds and the first
  call's extra (compiling);
- ``quickstart compile``: ``lcm run configs/quickstart.py`` with one passkey trial (the same programs as the full
  run: what compiles depends on shapes, not on the number of trials) into an empty compilation cache, and the
  compile seconds the CLI reports.

The greedy tokens of each cell are compared across the trees (they must agree: a refactor that changes them is
not a speed question).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _policy_cell(policy: str, budget: int, length: int, new_tokens: int) -> dict[str, Any]:
    """Runs in the child: ``lcm`` is the tree's (``PYTHONPATH``)."""
    import numpy as np

    from lcm.cache.policies import parse_policy
    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model

    sys.path.insert(0, str(HERE.parent))
    from cpu_inference import prompt_tokens

    model, tokenizer = load_model("smollm2", progress=False)
    tokens = np.asarray([prompt_tokens(tokenizer, length)], np.int32)
    engine = Engine(model, policy=parse_policy(policy, budget).with_tokenizer(tokenizer))
    out = {}
    for run in range(2):  # the first compiles
        ids = engine.generate(tokens, new_tokens)
        out = {
            "prefill_s": engine.last_prefill_seconds,
            "decode_ms": 1e3 * engine.last_decode_seconds / max(engine.last_decode_steps, 1),
            "tokens": [int(t) for t in ids[0]],
            "run": run,
        }
    return out


def _locret_cell(length: int, answer: int) -> dict[str, Any]:
    """Runs in the child: the labelling forward of one sample, whichever signature the tree's module has."""
    import inspect
    import time

    import jax
    import jax.numpy as jnp

    from lcm.io.checkpoints import load_model
    from lcm.train import locret_labels

    sys.path.insert(0, str(HERE.parent))
    from cpu_inference import prompt_tokens

    model, tokenizer = load_model("smollm2", progress=False)
    tokens = jnp.asarray([prompt_tokens(tokenizer, length + answer)], jnp.int32)
    if len(inspect.signature(locret_labels.backbone_of).parameters) == 2:  # before the model's own forward
        backbone = locret_labels.backbone_of(model, length + answer)
    else:
        backbone = locret_labels.backbone_of(model)
    example = locret_labels.make_example_fn(length)
    seconds = []
    for _ in range(2):  # the first compiles
        started = time.perf_counter()
        out = jax.block_until_ready(example(backbone, tokens))
        seconds.append(time.perf_counter() - started)
    return {"forward_s": seconds[1], "compile_s": seconds[0] - seconds[1], "cis_mean": float(out.cis.mean())}


def _child(tree: Path, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    environment = os.environ | {"PYTHONPATH": str(tree.resolve())} | (env or {})
    result = subprocess.run(args, cwd=tree, env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{args} in {tree} failed: {result.stderr[-2000:]}")
    return result


def measure(tree: Path, cell: str, opts: argparse.Namespace) -> dict[str, Any]:
    if cell == "model":
        cmd = [sys.executable, "benchmarks/cpu_inference.py", "--cell", "lcm", str(opts.length), "32"]
        out = json.loads(_child(tree, cmd).stdout.strip().splitlines()[-1])
        return {
            "prefill_s": out["prefill_s"],
            "decode_ms": out["decode_ms"],
            "compile_s": out["compile_s"],
            "tokens": out["decode_tokens"],
        }
    if cell.startswith("policy "):
        policy = cell.split(" ", 1)[1]
        cmd = [sys.executable, str(HERE), "--child-policy", policy, str(opts.budget), str(opts.length)]
        return json.loads(_child(tree, cmd).stdout.strip().splitlines()[-1])
    if cell == "locret labels":
        cmd = [sys.executable, str(HERE), "--child-locret", str(opts.length)]
        return json.loads(_child(tree, cmd).stdout.strip().splitlines()[-1])
    if cell == "quickstart compile":
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable,
                "-m",
                "lcm.cli",
                "run",
                "configs/quickstart.py",
                "--config.passkey.trials=1",
                f"--config.out_dir={out}",
            ]
            result = _child(tree, cmd, {"LCM_COMPILE_CACHE": cache})  # executables live under it too
            text = result.stdout + result.stderr
            found = re.search(r"compiled (\d+) XLA programs in ([\d.]+) s", text)
            if found is None:
                raise RuntimeError(f"no compile summary in the quickstart's output: {text[-1000:]}")
            return {"compile_s": float(found.group(2)), "programs": int(found.group(1))}
    raise ValueError(f"unknown cell {cell!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, nargs="?")
    parser.add_argument("after", type=Path, nargs="?")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--policies", default="streamingllm,snapkv,h2o,tokenselect,infinipot")
    parser.add_argument("--cells", default="model,policies,quickstart compile", help="and: locret labels")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    parser.add_argument("--child-policy", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-locret", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_locret:
        print(json.dumps(_locret_cell(args.child_locret, 128)))
        return 0
    if args.child_policy:
        policy, budget, length = args.child_policy
        print(json.dumps(_policy_cell(policy, int(budget), int(length), 16)))
        return 0
    if args.before is None or args.after is None:
        parser.error("give the two trees: BEFORE AFTER")
    cells = []
    for name in args.cells.split(","):
        cells += [f"policy {p}" for p in args.policies.split(",")] if name == "policies" else [name]
    trees = {"before": args.before, "after": args.after}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {cell: {"before": [], "after": []} for cell in cells}
    for rep in range(args.reps):
        for cell in cells:
            for side in ("before", "after") if rep % 2 == 0 else ("after", "before"):
                runs[cell][side].append(measure(trees[side], cell, args))
                shown = {k: v for k, v in runs[cell][side][-1].items() if k != "tokens"}
                print(f"rep {rep} {cell:24s} {side:6s} {json.dumps(shown)}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(runs, indent=1))
    print("\n| cell | measure | before (median) | after (median) | after / before | tokens equal |")
    print("|---|---|---|---|---|---|")
    for cell, sides in runs.items():
        equal = all(r.get("tokens") == sides["before"][0].get("tokens") for side in sides.values() for r in side)
        for key in ("prefill_s", "decode_ms", "forward_s", "compile_s"):
            if key not in sides["before"][0]:
                continue
            before = statistics.median(r[key] for r in sides["before"])
            after = statistics.median(r[key] for r in sides["after"])
            print(
                f"| {cell} | {key} | {before:.3f} | {after:.3f} | {after / before:.3f} | {'yes' if equal else 'NO'} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
