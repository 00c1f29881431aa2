"""Training samples for Locret's retaining heads, from long local text (see :mod:`lcm.train.locret` for why).

A sample is ``prompt_tokens`` tokens of a text followed by ``answer_tokens`` answer tokens: with probability
``copy_fraction`` a copy of a random span of the prompt (``"copy"``), else the text that follows the prompt
(``"continuation"``). The end of each text is held out for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

COPY_FRACTION = 0.5  # share of samples whose answer repeats a span of the prompt
HELD_OUT_FRACTION = 0.1  # the end of each text, kept for evaluation


def default_texts() -> list[str]:
    """The standard library's prose (Python reference topics) and code (``typing.py``): no download needed."""
    from lcm.evals import texts

    return [texts.stdlib_prose(), texts.stdlib_code()]


def token_streams(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(tokenizer.encode(text, add_special=False), np.int32) for text in texts]


def split_streams(
    streams: Sequence[np.ndarray], sample_tokens: int, held_out_fraction: float = HELD_OUT_FRACTION
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(train, held_out)``: the end of each stream (``held_out_fraction`` of it, and at least one sample) is held
    out; a stream too short for a sample on both sides of the cut is left out."""
    train, held_out = [], []
    for stream in streams:
        cut = len(stream) - max(sample_tokens, round(held_out_fraction * len(stream)))
        if cut >= sample_tokens:
            train.append(stream[:cut])
            held_out.append(stream[cut:])
    if not train:
        longest = max((len(s) for s in streams), default=0)
        raise ValueError(
            f"texts too short: a sample of {sample_tokens} tokens is needed on each side of the held-out cut, "
            f"so a text needs {2 * sample_tokens} tokens; the longest has {longest}"
        )
    return train, held_out


def make_sample(
    rng: np.random.Generator,
    streams: Sequence[np.ndarray],
    prompt_tokens: int,
    answer_tokens: int,
    copy_fraction: float = COPY_FRACTION,
) -> tuple[np.ndarray, str]:
    """``(tokens [prompt_tokens + answer_tokens] int32, kind)`` from a window of a random stream, ``kind`` being
    ``"copy"`` (the answer repeats a span of the prompt, uniform over it) or ``"continuation"``."""
    stream = streams[rng.integers(len(streams))]
    start = rng.integers(len(stream) - prompt_tokens - answer_tokens + 1)
    prompt = stream[start : start + prompt_tokens]
    if rng.random() < copy_fraction:
        span = rng.integers(prompt_tokens - answer_tokens + 1)
        return np.concatenate([prompt, prompt[span : span + answer_tokens]]), "copy"
    return stream[start : start + prompt_tokens + answer_tokens], "continuation"
