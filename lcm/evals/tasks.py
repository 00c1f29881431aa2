"""What every generated long-context task shares: the sample, prompt rendering, fitting a prompt to a length.

A task generator is a function ``generate(tokenizer, length, num_samples, seed, chat=True, depths=None)`` that
returns ``num_samples`` :class:`Sample` s whose prompts hold at most ``length`` tokens of the model's own
tokenizer. Everything random in a sample comes from :func:`sample_rng`, so a (task, length, seed, index) always
gives the same prompt. The model reads ``sample.ids`` and generates at most ``max_new_tokens`` tokens;
:func:`lcm.evals.metrics.score` compares that continuation alone (never the prompt: RULER scores the
continuation only, see METHODS §11) with ``sample.references`` under ``sample.metric``.

Prompts are rendered as RULER does: the task text, the haystack with what is planted in it, the question, then an
answer prefix put in the model's mouth. With ``chat=True`` and a tokenizer that has a chat template, the task
text and question are one user turn and the answer prefix starts the assistant's turn.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str  # registered task name
    length: int  # the requested length in tokens (the grid's column); len(ids) <= length
    index: int  # trial index within (task, length, seed)
    ids: tuple[int, ...]  # the rendered prompt, chat template and answer prefix included
    references: tuple[str, ...]  # what the continuation is scored against
    metric: str  # a name in lcm.evals.metrics.METRICS
    max_new_tokens: int  # generation budget for this task
    depth: float | None = None  # where the (first) planted item sits, as a fraction of the haystack
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # JSON-able extras (keys, hops, ...)
    # where the question starts in ``ids`` (it, the chat template's end of turn and the answer prefix follow the
    # context): the split kvpress's question-apart evaluation uses (:func:`question_start`); None: not located
    question_start: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["n_tokens"] = len(self.ids)
        del out["ids"]
        return out


class TaskGenerator(Protocol):
    def __call__(
        self,
        tokenizer: Any,
        length: int,
        num_samples: int,
        seed: int = 0,
        chat: bool = True,
        depths: Sequence[float] | None = None,
    ) -> list[Sample]: ...


def sample_rng(task: str, length: int, seed: int, index: int) -> np.random.Generator:
    """The one source of randomness for a sample: independent across tasks, lengths, seeds and trials."""
    return np.random.default_rng((seed, zlib.crc32(task.encode()), length, index))


def sample_depths(num_samples: int, depths: Sequence[float] | None) -> list[float]:
    """``depths`` cycled over the samples, else evenly spaced in [0, 1] (RULER spreads needles the same way)."""
    if depths is not None:
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if not depths or bad:
            raise ValueError(f"depths must be a non-empty list of fractions in [0, 1], got {list(depths)}")
        return [float(depths[i % len(depths)]) for i in range(num_samples)]
    if num_samples == 1:
        return [0.5]
    return [float(d) for d in np.linspace(0.0, 1.0, num_samples)]


def question_start(tokenizer: Any, ids: Sequence[int], anchor: str | tuple[str, ...]) -> int | None:
    """Index of the first token of a prompt's question: the token holding the first character of the last
    ``anchor`` (or the last of any of several) in the prompt's text; kvpress splits its RULER prompts the same
    way, at each task's question pattern. What precedes is the context; the question, the chat template's end of
    turn and the answer prefix follow. None when the text lacks ``anchor`` (a middle-truncated prompt can lose
    it) or does not encode back to ``ids`` (then no split is exact); a run that needs the split says so before
    any compute."""
    token_at = getattr(tokenizer, "token_at", None)
    anchors = [a for a in ((anchor,) if isinstance(anchor, str) else anchor) if a]
    if token_at is None or not anchors:
        return None
    text = tokenizer.decode(list(ids), skip_special=False)
    at = max(text.rfind(a) for a in anchors)
    if at < 0:
        return None
    try:
        first = token_at(ids, at, text)
    except ValueError:
        return None
    return first if 0 < first < len(ids) else None


def render(tokenizer: Any, prompt: str, answer_prefix: str, chat: bool = True) -> list[int]:
    """Token ids of ``prompt`` (one user turn) followed by ``answer_prefix`` (the start of the answer)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tokenizer.encode(text + answer_prefix, add_special=False)
    return tokenizer.encode(f"{prompt}\n{answer_prefix}".rstrip())


def fit_to_length(
    build: Callable[[int], list[int]], length: int, task: str, max_units: int | None = None
) -> tuple[int, list[int]]:
    """The largest ``n`` (haystack units) with ``len(build(n)) <= length``, and its ids.

    ``build(n)`` renders the prompt with ``n`` units of haystack (sentences, lines, words, documents) and must
    grow with ``n``. A prompt too long even at ``n = 0`` is the one-line error that the grid reports as "a length
    below the task's minimum". ``max_units`` caps ``n`` (a finite haystack): reaching it before ``length`` is an
    error too, since the prompt would silently come out shorter than asked.
    """
    if length <= 0:
        raise ValueError(f"length={length} must be a positive number of tokens")
    ids = build(0)
    if len(ids) > length:
        raise ValueError(f"length={length} is below the minimum of task {task!r}: {len(ids)} tokens")
    best, best_ids = 0, ids
    high = 1
    while True:  # gallop up until too long (or the haystack is exhausted)
        if max_units is not None and high > max_units:
            high = max_units + 1
            break
        ids = build(high)
        if len(ids) > length:
            break
        best, best_ids = high, ids
        high *= 2
    low = best
    while high - low > 1:  # bisect in (low, high): build(low) fits, build(high) does not
        mid = (low + high) // 2
        ids = build(mid)
        if len(ids) <= length:
            low, best, best_ids = mid, mid, ids
        else:
            high = mid
    if max_units is not None and best == max_units and len(best_ids) < length:
        gap = length - len(best_ids)
        if gap > max(64, length // 10):  # a haystack that is a little short at the very end is fine
            raise ValueError(
                f"task {task!r} ran out of haystack: {max_units} units give {len(best_ids)} tokens, "
                f"length={length} asked for"
            )
    return best, best_ids
