"""Needle in a haystack over a length x depth grid (Kamradt 2023, "LLMTest_NeedleInAHaystack").

The haystack is any local text, cut to fit the requested length in tokens of the model's tokenizer. The needle
sentence is inserted at the sentence boundary nearest *before* the requested depth (within 400 characters, else at
the last whitespace), as the original harness does. The question follows the haystack, in the model's chat
template when it has one, then an answer prefix (as RULER does) so that a small model answers in place. The
original scores with a GPT-4 judge; lcm scores the continuation by the fraction of the answer's words it contains
(case-insensitive), so 1.0 means every word of ``answer`` was produced. Results are written as JSON and a heatmap.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lcm.evals.metrics import word_recall
from lcm.generate import Engine

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
ANSWER_PREFIX = "The best thing to do in San Francisco is"


@dataclasses.dataclass(frozen=True)
class NeedleTask:
    needle: str = NEEDLE  # the sentence hidden in the haystack
    question: str = QUESTION  # asked after the haystack
    answer: str = ANSWER  # scored by word recall in the model's continuation
    answer_prefix: str = ANSWER_PREFIX  # put in the model's mouth after the question ("" for none)
    max_new_tokens: int = 24  # continuation length


def answer_recall(output: str, answer: str) -> float:
    return word_recall(output, [answer])


def _render(tokenizer, context: str, task: NeedleTask, chat: bool) -> list[int]:
    user = f"{context}\n\n{task.question} Answer from the text above."
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
        text += task.answer_prefix
        return tokenizer.encode(text, add_special=False)
    return tokenizer.encode(f"{user}\n{task.answer_prefix}".rstrip())


def _insertion_point(hay: str, cut: int, reach: int = 400) -> int:
    """The end of the last sentence before ``cut`` (``.`` then whitespace), else the last whitespace; 0 at the start."""
    if cut <= 0:
        return 0
    window = hay[max(0, cut - reach) : cut]
    sentence = max(window.rfind(". "), window.rfind(".\n"))
    at = sentence + 1 if sentence >= 0 else max(window.rfind(" "), window.rfind("\n"))
    return max(0, cut - len(window) + at) if at > 0 else cut


def build_prompt(
    tokenizer, haystack_ids: list[int], length: int, depth: float, task: NeedleTask, chat: bool = True
) -> list[int]:
    """Haystack cut so that the whole prompt, needle included, is at most ``length`` tokens."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    overhead = len(_render(tokenizer, " " + task.needle, task, chat))
    budget = length - overhead
    if budget <= 0:
        raise ValueError(f"length={length} is below the NIAH prompt's minimum of {overhead} tokens")
    if budget > len(haystack_ids):
        raise ValueError(f"the haystack has {len(haystack_ids)} tokens; length={length} needs {budget}")
    for _ in range(8):  # re-tokenising the joined text can shift a few tokens: shrink until it fits
        hay = tokenizer.decode(haystack_ids[:budget])
        cut = _insertion_point(hay, int(len(hay) * depth))
        context = f"{hay[:cut]} {task.needle}{hay[cut:]}" if cut else f"{task.needle} {hay}"
        if depth == 1.0:
            context = f"{hay} {task.needle}"
        ids = _render(tokenizer, context, task, chat)
        if len(ids) <= length:
            return ids
        budget -= len(ids) - length
    raise ValueError(f"could not fit the NIAH prompt into {length} tokens")


@dataclasses.dataclass(frozen=True)
class NeedleResult:
    length: int
    depth: float
    n_tokens: int
    score: float
    output: str


def run_niah(
    engine: Engine,
    tokenizer,
    haystack: str,
    lengths: list[int],
    depths: list[float],
    task: NeedleTask = NeedleTask(),
    chat: bool = True,
    progress=None,
) -> list[NeedleResult]:
    """One prompt per length and depth, scored by :func:`answer_recall`; results in ``lengths`` x ``depths`` order.

    The depths of a length run from the shallowest, so that an engine with ``reuse_prefix`` recomputes only what
    follows the previous needle (the haystack before it is the same)."""
    haystack_ids = tokenizer.encode(haystack, add_special=False)
    results = []
    for length in lengths:
        done: dict[int, NeedleResult] = {}
        for i in sorted(range(len(depths)), key=lambda i: depths[i]):
            ids = build_prompt(tokenizer, haystack_ids, length, depths[i], task, chat)
            out = engine.generate(np.array(ids), task.max_new_tokens, stop_ids=list(tokenizer.eos_ids))[0]
            text = tokenizer.decode(out.tolist())
            done[i] = NeedleResult(length, depths[i], len(ids), answer_recall(text, task.answer), text)
            if progress is not None:
                progress(done[i])
        results.extend(done[i] for i in range(len(depths)))
    return results


def score_grid(results: list[NeedleResult]) -> tuple[list[int], list[float], np.ndarray]:
    lengths = sorted({r.length for r in results})
    depths = sorted({r.depth for r in results})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in results:
        grid[depths.index(r.depth), lengths.index(r.length)] = r.score
    return lengths, depths, grid


def save_niah(results: list[NeedleResult], out_dir: str | Path, title: str = "needle in a haystack") -> dict:
    """Writes ``niah.json`` and ``niah.png`` (depth x length heatmap) into ``out_dir``; returns the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths, depths, grid = score_grid(results)
    payload = {
        "lengths": lengths,
        "depths": depths,
        "scores": grid.tolist(),  # [depth][length]
        "mean_score": float(np.nanmean(grid)),
        "trials": [dataclasses.asdict(r) for r in results],
    }
    (out / "niah.json").write_text(json.dumps(payload, indent=1))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.9 * len(lengths)), max(3.0, 1.2 + 0.45 * len(depths))))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="answer recall")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "niah.png", dpi=120)
    plt.close(fig)
    return payload
