"""Training samples for Locret's retaining heads, from long local text (see :mod:`lcm.train.locret` for why).

A sample is ``prompt_tokens`` tokens of context followed by ``answer_tokens`` answer tokens, of one of three kinds:

- ``"needles"`` (probability ``needle_fraction``): a few short spans (the needles) planted at random places in a
  filler, and the answer is the needles again, in order. The filler is, with even odds, a window of the text or
  one random span of it repeated (the low-information context of many long-context tasks); each needle is, with
  even odds, a random span of the text or a run of random digits (``digit_ids``, when given). No eval task's
  wording is used: the needles are raw spans and digits with no template around them.
- ``"copy"`` (probability ``copy_fraction`` of the rest): the answer repeats a random span of the prompt;
- ``"continuation"``: the answer is the text that follows the prompt.

The end of each text is held out for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

COPY_FRACTION = 0.5  # share of the non-needle samples whose answer repeats a span of the prompt
NEEDLE_FRACTION = 0.0  # share of samples with planted needles (the config sets its own)
NUM_NEEDLES = 4  # needles per "needles" sample; the answer's tokens are split evenly between them
REPEAT_SPAN = (16, 128)  # a repeated filler repeats one span of this many tokens (uniform, inclusive)
HELD_OUT_FRACTION = 0.1  # the end of each text, kept for evaluation


def default_texts() -> list[str]:
    """The standard library's prose (Python reference topics) and code (``typing.py``): no download needed."""
    from lcm.evals import texts

    return [texts.stdlib_prose(), texts.stdlib_code()]


def token_streams(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(tokenizer.encode(text, add_special=False), np.int32) for text in texts]


def digit_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids of ``"0"`` ... ``"9"`` where each digit is one token of ``tokenizer`` (else none: no digit needles)."""
    ids = [tokenizer.encode(str(d), add_special=False) for d in range(10)]
    return tuple(i[0] for i in ids) if all(len(i) == 1 for i in ids) else ()


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
    needle_fraction: float = NEEDLE_FRACTION,
    digit_ids: Sequence[int] = (),
) -> tuple[np.ndarray, str]:
    """``(tokens [prompt_tokens + answer_tokens] int32, kind)`` from a random stream, ``kind`` being ``"needles"``,
    ``"copy"`` (the answer repeats a span of the prompt, uniform over it) or ``"continuation"``."""
    stream = streams[rng.integers(len(streams))]
    if rng.random() < needle_fraction:
        return _needles_sample(rng, stream, prompt_tokens, answer_tokens, digit_ids), "needles"
    start = rng.integers(len(stream) - prompt_tokens - answer_tokens + 1)
    prompt = stream[start : start + prompt_tokens]
    if rng.random() < copy_fraction:
        span = rng.integers(prompt_tokens - answer_tokens + 1)
        return np.concatenate([prompt, prompt[span : span + answer_tokens]]), "copy"
    return stream[start : start + prompt_tokens + answer_tokens], "continuation"


def _needles_sample(
    rng: np.random.Generator, stream: np.ndarray, prompt_tokens: int, answer_tokens: int, digit_ids: Sequence[int]
) -> np.ndarray:
    """Needles planted in a filler of ``prompt_tokens - answer_tokens`` tokens; the answer is the needles in order."""
    filler_tokens = prompt_tokens - answer_tokens
    if rng.random() < 0.5:  # one span repeated: every planted token is new against it
        used = int(rng.integers(REPEAT_SPAN[0], REPEAT_SPAN[1] + 1))
        start = int(rng.integers(len(stream) - used + 1))
        filler = np.resize(stream[start : start + used], filler_tokens)
    else:
        used = filler_tokens
        start = int(rng.integers(len(stream) - filler_tokens + 1))
        filler = stream[start : start + filler_tokens]
    needles = []
    for size in np.diff(np.linspace(0, answer_tokens, min(NUM_NEEDLES, answer_tokens) + 1).round().astype(int)):
        if len(digit_ids) and rng.random() < 0.5:
            needles.append(rng.choice(np.asarray(digit_ids, np.int32), size))
        else:  # a span from outside the filler's text, so that it is new where it is planted
            needles.append(stream[_span_outside(rng, len(stream), size, start, start + used)])
    cuts = np.sort(rng.integers(0, filler_tokens + 1, len(needles)))
    pieces = np.split(filler, cuts)
    prompt = np.concatenate([x for pair in zip(pieces, [*needles, np.zeros(0, np.int32)], strict=True) for x in pair])
    return np.concatenate([prompt, *needles]).astype(np.int32, copy=False)


def _span_outside(rng: np.random.Generator, length: int, size: int, lo: int, hi: int) -> slice:
    """A random ``slice`` of ``size`` positions in ``[0, length)`` avoiding ``[lo, hi)`` where there is room."""
    starts = np.arange(length - size + 1)
    outside = starts[(starts + size <= lo) | (starts >= hi)]
    start = int(rng.choice(outside)) if len(outside) else int(rng.integers(len(starts)))
    return slice(start, start + size)
