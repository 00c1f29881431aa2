"""Every generated task by name: RULER-style (:mod:`lcm.evals.ruler`), Giraffe's (:mod:`lcm.evals.giraffe`), and
the classic passkey and needle tests as :class:`~lcm.evals.tasks.Sample` generators, so the grid runs them all
the same way. File-based suites (LongBench/InfiniteBench JSONL) are not generated: the grid names them
``file:PATH`` (see :mod:`lcm.evals.longbench`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from lcm.evals import giraffe, niah, passkey, ruler, texts
from lcm.evals.tasks import Sample, TaskGenerator, question_start, sample_depths, sample_rng


def passkey_samples(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    chat: bool = True,
    depths: Sequence[float] | None = None,
) -> list[Sample]:
    """Landmark/LongLoRA passkey (:mod:`lcm.evals.passkey`); a raw continuation prompt, so ``chat`` is unused."""
    del chat  # the LongLoRA format is a plain completion prompt, as in the papers
    samples = []
    for index, depth in enumerate(sample_depths(num_samples, depths)):
        key = int(sample_rng("passkey", length, seed, index).integers(10000, 100000))
        prompt = passkey.build_prompt(tokenizer, length, key, depth)
        ids = tuple(prompt.ids)
        sample = Sample("passkey", length, index, ids, (str(key),), "first_integer", 12, depth, {"key": key})
        samples.append(dataclasses.replace(sample, question_start=question_start(tokenizer, ids, passkey.QUESTION)))
    return samples


@functools.cache
def _prose_ids(tokenizer: Any) -> tuple[int, ...]:
    return tuple(tokenizer.encode(texts.stdlib_prose(), add_special=False))


def niah_samples(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    chat: bool = True,
    depths: Sequence[float] | None = None,
) -> list[Sample]:
    """Kamradt's needle (:mod:`lcm.evals.niah`) in the Python reference docs; nothing random but the depth."""
    del seed  # one fixed needle and haystack: samples differ by depth only
    task = niah.NeedleTask()
    hay = list(_prose_ids(tokenizer))
    samples = []
    for index, depth in enumerate(sample_depths(num_samples, depths)):
        ids = tuple(niah.build_prompt(tokenizer, hay, length, depth, task, chat))
        start = question_start(tokenizer, ids, task.question)
        samples.append(
            Sample("niah", length, index, ids, (task.answer,), "word_recall", task.max_new_tokens, depth, {}, start)
        )
    return samples


TASKS: dict[str, TaskGenerator] = {
    **ruler.TASKS,
    **giraffe.TASKS,
    "passkey": passkey_samples,
    "niah": niah_samples,
}
RULER_TASKS = tuple(ruler.TASKS)


def get_task(name: str) -> TaskGenerator:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or file:PATH.jsonl")
    return TASKS[name]
