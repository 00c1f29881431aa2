"""Why does TokenSelect miss a passkey? For one 8k passkey prompt, how many layers' selections at the last prefill
chunk (the one that predicts the first answer token) contain the needle, and how often the selection cache reused
a selection, per budget. Run: ``python experiments/token_select_probe.py --budgets 1024,2688 --trials 2``.

It wraps the registered ``xla`` implementation of :mod:`lcm.kernels.token_select.api` with a host callback that
records each selecting layer step; the policy itself is unchanged.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from lcm.cache.policies import TokenSelect
from lcm.evals.passkey import build_prompt, first_integer
from lcm.generate import Engine
from lcm.io.checkpoints import load_model
from lcm.kernels.token_select import api
from lcm.ops import token_select as reference

STEPS: list[tuple[int, np.ndarray, bool]] = []  # (cache length, top-k slots, reused) per selecting layer step


def _recording(*args, **kwargs):
    out, cache, reused = reference.token_select_attention(*args, **kwargs)

    def record(length, top, reused):
        STEPS.append((int(length), np.asarray(top)[0], bool(np.asarray(reused)[0])))

    jax.debug.callback(record, args[3], cache.top, reused)
    return out, cache, reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--budgets", default="1024,2688")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--depth", type=float, default=0.5)
    args = parser.parse_args()
    api.IMPLEMENTATIONS["xla"] = _recording
    model, tokenizer = load_model("smollm2", progress=False)
    for budget in [int(b) for b in args.budgets.split(",")]:
        engine = Engine(model, chunk_size=512, policy=TokenSelect(budget=budget))
        for trial in range(args.trials):
            rng = np.random.default_rng((0, args.length, trial))  # the passkey eval's seeds
            key = int(rng.integers(10000, 100000))
            ids = build_prompt(tokenizer, args.length, key, args.depth).ids
            needle = next(i for i in range(len(ids)) if str(key)[:2] in tokenizer.decode(ids[i : i + 2]))
            STEPS.clear()
            out = tokenizer.decode(engine.generate(np.asarray(ids), 12, list(tokenizer.eos_ids))[0].tolist())
            last = [top for length, top, _ in STEPS if length == len(ids)]
            hits = sum(needle in set(top.tolist()) or needle + 1 in set(top.tolist()) for top in last)
            reused = sum(r for *_, r in STEPS)
            print(
                f"budget {budget} key {key}: {'ok ' if first_integer(out) == key else 'MISS'} {out.strip()[:24]!r}; "
                f"needle selected at the last prefill chunk in {hits}/{len(last)} layers; "
                f"selections reused {reused}/{len(STEPS)}"
            )


if __name__ == "__main__":
    main()
