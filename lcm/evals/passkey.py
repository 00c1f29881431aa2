"""Passkey retrieval in the Landmark Attention / LongLoRA format.

Mohtashami & Jaggi 2023 (arXiv 2305.16300) and Chen et al. 2023, LongLoRA (arXiv 2309.12307,
``passkey_retrieval.py``): a task description, repeated filler sentences, one line
``The pass key is K. Remember it. K is the pass key.`` at a chosen depth, then ``What is the pass key? The pass
key is``. K is a random 5-digit integer; a trial is correct iff the first integer in the greedy continuation
equals K (exact match). The filler is repeated to bring the prompt to the requested length in tokens of the
model's own tokenizer (never more than the requested length). Trials are seeded: trial ``i`` at length ``n``
draws its key (and depth, if none is fixed) from ``np.random.default_rng((seed, n, i))``.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from lcm.generate import Engine

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: int
    depth: float  # fraction of the filler placed before the needle


def check_wording(filler: str, needle: str, question: str) -> None:
    """One-line errors for wording the prompt cannot be built from."""
    if not filler.strip() or not question.strip():
        raise ValueError("the passkey filler and question must be non-empty text")
    if "{key}" not in needle or needle.replace("{key}", "").count("{") or needle.replace("{key}", "").count("}"):
        raise ValueError(f"the passkey needle {needle!r} must contain {{key}} (and no other braces)")


def build_prompt(
    tokenizer,
    length: int,
    key: int,
    depth: float,
    filler: str = FILLER,
    needle: str = NEEDLE,
    question: str = QUESTION,
) -> PasskeyPrompt:
    """The longest prompt with whole filler repetitions that fits in ``length`` tokens; ``filler``, ``needle``
    (with ``{key}``) and ``question`` change the wording (the defaults are LongLoRA's)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    check_wording(filler, needle, question)

    def render(n_filler: int) -> list[int]:
        before = round(n_filler * depth)
        text = "\n".join(
            [
                TASK,
                " ".join([filler] * before),
                needle.format(key=key),
                " ".join([filler] * (n_filler - before)),
                question,
            ]
        )
        return tokenizer.encode(text)

    base = len(render(0))
    per_filler = max(1, len(render(8)) - base) / 8
    n = max(0, int((length - base) / per_filler))
    ids = render(n)
    while len(ids) > length and n > 0:
        n -= 1
        ids = render(n)
    if len(ids) > length:
        raise ValueError(f"length={length} is below the passkey prompt's minimum of {len(ids)} tokens")
    return PasskeyPrompt(ids=ids, key=key, depth=depth)


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


@dataclasses.dataclass(frozen=True)
class PasskeyTrial:
    length: int
    n_tokens: int
    depth: float
    key: int
    output: str
    correct: bool


def run_passkey(
    engine: Engine,
    tokenizer,
    lengths: list[int],
    trials: int = 10,
    depth: float | None = None,
    seed: int = 0,
    max_new_tokens: int = 12,
    progress=None,
    filler: str = FILLER,
    needle: str = NEEDLE,
    question: str = QUESTION,
) -> tuple[dict[int, float], list[PasskeyTrial]]:
    """Accuracy per length over ``trials`` seeded trials; ``depth=None`` draws a random depth per trial.
    ``filler``, ``needle`` and ``question`` reword the prompt (see :func:`build_prompt`).

    The trials of a length run in order of depth, so that an engine with ``reuse_prefix`` recomputes only what
    follows the previous trial's needle (the prompts agree before it); records come back in trial order."""
    if trials <= 0:
        raise ValueError(f"trials={trials} must be positive")
    check_wording(filler, needle, question)
    records: list[PasskeyTrial] = []
    accuracy: dict[int, float] = {}
    for length in lengths:
        prompts = []
        for trial in range(trials):
            rng = np.random.default_rng((seed, length, trial))
            key = int(rng.integers(10000, 100000))
            trial_depth = float(rng.uniform()) if depth is None else depth
            prompts.append(build_prompt(tokenizer, length, key, trial_depth, filler, needle, question))
        done: dict[int, PasskeyTrial] = {}
        for trial in sorted(range(trials), key=lambda t: prompts[t].depth):
            prompt = prompts[trial]
            out = engine.generate(np.array(prompt.ids), max_new_tokens, stop_ids=list(tokenizer.eos_ids))[0]
            text = tokenizer.decode(out.tolist())
            done[trial] = PasskeyTrial(
                length, len(prompt.ids), prompt.depth, prompt.key, text, first_integer(text) == prompt.key
            )
            if progress is not None:
                progress(done[trial])
        records.extend(done[trial] for trial in range(trials))
        accuracy[length] = sum(done[trial].correct for trial in range(trials)) / trials
    return accuracy, records
