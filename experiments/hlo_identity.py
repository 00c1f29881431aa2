"""Optimised HLO of every KV policy's jitted programs on a tiny model: the cheap "nothing changes" check of a
refactor (identical programs compute identical numbers).

    python experiments/hlo_identity.py snapshot /tmp/before     # on the code before (e.g. PYTHONPATH=a worktree)
    python experiments/hlo_identity.py snapshot /tmp/after
    python experiments/hlo_identity.py compare /tmp/before /tmp/after

``snapshot`` runs the Engine once per policy (a 90-token prompt in chunks of 16, 12 new tokens, a 3-layer random
model) and writes the optimised HLO of the first call of each program (``prefill_chunk``, ``probe_chunk``,
``compress_cache``, ``decode_block``) and the greedy ids; ``compare`` strips what does not change a program (op
metadata, the file and stack-frame tables XLA prints before the computations, the module name) and says, per
program, whether it is the same. Programs a policy does not run are absent from both snapshots.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PROGRAMS = ("prefill_chunk", "probe_chunk", "compress_cache", "decode_block")
POLICIES = [
    ("full", 0, {}),
    ("streamingllm", 24, {}),
    ("h2o", 24, {}),
    ("snapkv", 40, {}),
    ("tokenselect", 40, {}),
    ("infinipot", 24, {"catalyst_ids": (1, 2, 3)}),
    ("locret", 24, {"n_loc": 8}),
    ("knorm", 24, {}),
    ("tova", 24, {}),
    ("pyramidkv", 40, {"window": 8}),
]


def snapshot(out: Path) -> None:
    import numpy as np
    from flax import nnx

    from lcm import steps
    from lcm.cache.policies import POLICIES as REGISTERED
    from lcm.cache.policies import make_policy
    from lcm.generate import Engine
    from lcm.models.llama import LlamaConfig, random_model
    from lcm.models.retaining import RetainingHeads, attach_retaining_heads

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig.preset(
        "smollm2-135m", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=100
    )
    model = random_model(cfg, seed=1)
    with_heads = attach_retaining_heads(model, RetainingHeads(cfg, hidden_width=16, rngs=nnx.Rngs(0)))
    captured: dict[str, str] = {}
    originals = {name: getattr(steps, name) for name in PROGRAMS}

    def spy(name: str):
        def call(*args, **kwargs):
            if name not in captured:
                captured[name] = originals[name].lower(*args, **kwargs).compile().as_text()
            return originals[name](*args, **kwargs)

        return call

    for name in PROGRAMS:
        setattr(steps, name, spy(name))
    tokens = np.random.default_rng(0).integers(0, 100, (1, 90))
    ids = {}
    for name, budget, params in POLICIES:
        if name not in REGISTERED:  # the code before a policy existed
            continue
        captured.clear()
        policy = make_policy(name, budget, **params)
        engine = Engine(with_heads if name == "locret" else model, chunk_size=16, policy=policy)
        ids[name] = engine.generate(tokens, 12).tolist()
        for program, text in captured.items():
            (out / f"{name}_{program}.hlo").write_text(text)
    (out / "ids.json").write_text(json.dumps(ids))
    for name in PROGRAMS:
        setattr(steps, name, originals[name])


def normalise(text: str) -> str:
    lines = text.splitlines()
    if "FileNames" in lines:  # the file/function/location/stack-frame tables, up to the first computation
        first = lines.index("FileNames")
        last = next(i for i in range(first, len(lines)) if lines[i].startswith(("%", "ENTRY")))
        lines = lines[:first] + lines[last:]
    text = "\n".join(lines)
    text = re.sub(r",? ?metadata=\{[^}]*\}", "", text)
    text = re.sub(r",? ?stack_frame_id=\d+", "", text)
    return re.sub(r"HloModule \S+", "HloModule X", text)


def compare(before: Path, after: Path) -> int:
    differ = 0
    for path in sorted(before.glob("*.hlo")):
        other = after / path.name
        if not other.is_file():
            print(f"only before: {path.name}")
            differ += 1
            continue
        a, b = normalise(path.read_text()), normalise(other.read_text())
        same = a == b
        differ += not same
        print(f"{'same' if same else 'DIFFERENT'}  {path.name}  ({len(a.splitlines())} vs {len(b.splitlines())} lines)")
    for path in sorted(after.glob("*.hlo")):
        if not (before / path.name).is_file():
            print(f"only after: {path.name}")
    ids_a, ids_b = (json.loads((d / "ids.json").read_text()) for d in (before, after))
    for name in sorted(set(ids_a) & set(ids_b)):
        if ids_a[name] != ids_b[name]:
            print(f"greedy ids differ: {name}")
            differ += 1
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("snapshot").add_argument("out", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        snapshot(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
