"""Local stand-ins for what RULER downloads: English words, the essay haystack, QA documents, invented names.

RULER (Hsieh et al. 2024, arXiv 2404.06654; NVIDIA/RULER ``scripts/data/synthetic``) draws needle keys and
common words from ``wonderwords`` (adjective-noun pairs for keys; nouns, adjectives and verbs for words), its
essay haystack from Paul Graham's essays and its QA documents from SQuAD/HotpotQA. None of these ships with
Python, so lcm uses text every CPython install has (:func:`lcm.evals.texts.stdlib_prose`, the reference
documentation in ``pydoc_data``): everything here is deterministic for a given Python version.

- :func:`english_words`: the distinct lowercase words of 4-10 letters in that prose, sorted (2,304 on CPython
  3.11). Mostly plain English, with some Python jargon ("getattr"); keys are two of them joined by a hyphen,
  as RULER's ``adjective-noun`` keys are.
- :func:`essay_words`: the prose, whitespace-collapsed and split into words (RULER's essay haystack unit).
- :func:`prose_documents`: the prose cut at sentence ends into documents of at least 60 words (SQuAD
  paragraphs are ~120 words, HotpotQA's ~60), the distractor documents of the QA stand-in.
- :func:`draw_distinct`: needle keys and values as RULER's (7-digit numbers, UUIDs, or word keys).
- :func:`invented_facts`: the planted facts of the QA stand-in: "The Brouzal Guild was founded in 1432 by Kae
  Drinth in the city of Stelou.", with entities, people and cities given invented names (random syllables,
  none a word of the prose), so a model can neither know the answer nor guess it from the question.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid
from collections.abc import Sequence

import numpy as np

from lcm.evals import texts

# RULER's noise haystack (also Landmark Attention's passkey filler).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

QA_FACT = "The {entity} was founded in {year} by {founder} in the city of {city}."
QA_QUESTIONS = {
    "founder": "Who founded the {entity}?",
    "city": "In which city was the {entity} founded?",
    "year": "In which year was the {entity} founded?",
}
QA_KINDS = ("Institute", "Society", "Company", "Museum", "Observatory", "Foundation", "Academy", "Guild")
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "x", "th", "nd")


@functools.cache
def english_words() -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", texts.stdlib_prose()))))


@functools.cache
def essay_words() -> tuple[str, ...]:
    return tuple(texts.stdlib_prose().split())


def split_sentences(text: str) -> list[str]:
    """Sentences of whitespace-collapsed ``text``: a cut after ``.``, ``!`` or ``?`` and a space (RULER uses
    NLTK's ``sent_tokenize``; a plain rule is enough to keep needles off mid-sentence positions)."""
    return [s for s in re.split(r"(?<=[.!?]) ", text) if s]


@functools.cache
def prose_documents(min_words: int = 60) -> tuple[str, ...]:
    documents: list[str] = []
    current: list[str] = []
    for sentence in split_sentences(" ".join(essay_words())):
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= min_words:
            documents.append(" ".join(current))
            current = []
    return tuple(documents)


def word_key(index: int, words: tuple[str, ...]) -> str:
    """The ``index``-th of the ``len(words) * (len(words) - 1)`` hyphenated pairs of two different words."""
    first, offset = index % len(words), 1 + index // len(words)
    return f"{words[first]}-{words[(first + offset) % len(words)]}"


def invented_name(rng: np.random.Generator, syllables: int) -> str:
    parts = [
        _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + _CODAS[rng.integers(len(_CODAS))]
        for _ in range(syllables)
    ]
    return "".join(parts).capitalize()


def distinct_names(rng: np.random.Generator, count: int, syllables: int, taken: set[str]) -> list[str]:
    """``count`` invented names, none in ``taken`` (which they join), none an English word of the prose."""
    english = set(english_words())
    names: list[str] = []
    while len(names) < count:
        name = invented_name(rng, syllables)
        if name not in taken and name.lower() not in english:
            taken.add(name)
            names.append(name)
    return names


def cycled(items: Sequence[str], n: int) -> list[str]:
    """The first ``n`` of ``items`` repeated (RULER repeats its essays when a length needs more)."""
    return list(items) * (n // len(items)) + list(items[: n % len(items)])


def draw_distinct(rng: np.random.Generator, kind: str, count: int) -> list[str]:
    """``count`` distinct needle keys or values: 7-digit numbers, UUIDs or hyphenated word pairs."""
    if kind == "numbers":
        return [str(v) for v in rng.choice(9 * 10**6, size=count, replace=False) + 10**6]
    if kind == "uuids":  # 122 random bits: a repeat is out of the question
        return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(count)]
    if kind == "words":
        words = english_words()
        return [word_key(int(i), words) for i in rng.choice(len(words) * (len(words) - 1), size=count, replace=False)]
    raise ValueError(f"unknown needle kind {kind!r}; choose one of ['numbers', 'uuids', 'words']")


@dataclasses.dataclass(frozen=True)
class Facts:
    attribute: str  # what the question asks: a key of QA_QUESTIONS
    question: str  # about entities[0]
    entities: list[str]
    answers: list[str]  # each fact's value of the attribute; all different
    texts: list[str]  # each fact as a one-sentence document


def invented_facts(rng: np.random.Generator, count: int) -> Facts:
    attribute = list(QA_QUESTIONS)[int(rng.integers(len(QA_QUESTIONS)))]
    taken: set[str] = set()
    names = distinct_names(rng, count, 2, taken)
    entities = [f"{name} {QA_KINDS[rng.integers(len(QA_KINDS))]}" for name in names]
    firsts, lasts = distinct_names(rng, count, 2, taken), distinct_names(rng, count, 2, taken)
    values = {
        "founder": [f"{first} {last}" for first, last in zip(firsts, lasts, strict=True)],
        "city": distinct_names(rng, count, 2, taken),
        "year": [str(y) for y in rng.choice(np.arange(1200, 1990), size=count, replace=False)],
    }
    sentences = [QA_FACT.format(entity=e, **{k: v[i] for k, v in values.items()}) for i, e in enumerate(entities)]
    question = QA_QUESTIONS[attribute].format(entity=entities[0])
    return Facts(attribute, question, entities, values[attribute], sentences)
