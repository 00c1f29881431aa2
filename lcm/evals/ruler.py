"""RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654), generated locally in the model's own tokenizer.

Official code: NVIDIA/RULER ``scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,
freq_words_extraction,qa}.py``; templates, answer prefixes and generation lengths from
``scripts/data/synthetic/constants.py``, task arguments from ``scripts/synthetic.yaml``. Registered in
:data:`TASKS`: the eight NIAH variants, ``vt`` (1 chain, 4 hops, noise haystack, one solved example), ``cwe``
(10 common words, one solved example), ``fwe`` (Zipf alpha 2, coded words) and ``qa`` (stand-in, below). NIAH
asks for 7-digit numbers or UUIDs; every task but QA scores ``string_match_all``, QA ``string_match_part``
(:mod:`lcm.evals.metrics`), on the continuation only.

Deviations from the official code, each because something is not available locally or for a cleaner grid:

- Words: keys and common words come from :func:`lcm.evals.ruler_words.english_words` (the 2,304 distinct
  words of the stdlib's reference docs) instead of ``wonderwords``; a key is two of them joined by a hyphen
  (RULER: adjective-noun). A common-words list that needs more distinct words than that extends it with such
  pairs (RULER switches to a second list). The solved example's words are distinct from the sample's.
- Essay haystack: the Python reference docs (:func:`lcm.evals.texts.stdlib_prose`) instead of Paul Graham's
  essays, repeated when a length needs more (as RULER repeats the essays); sentences split by a regex, not NLTK.
- QA: no SQuAD/HotpotQA. Five planted documents each state one invented fact ("The Brouzal Guild was founded in
  1432 by Kae Drinth in the city of Stelou."); one answers the question, four are distractors about other
  invented entities, so the answer can be neither memorised nor guessed from the question; the other
  documents are the prose cut into ~60-word documents in random order. RULER's QA template and prefix.
- Length: the prompt, chat template and answer prefix included, holds at most ``length`` tokens (lcm's grid
  column); RULER budgets ``tokens_to_generate`` inside its length, so its prompt is that much shorter.
- Placement: ``depth`` puts the needle holding the first reference after that fraction of the haystack units;
  the other needles sit at uniform random depths (RULER draws every depth at random). VT keeps RULER's random
  sorted positions and ignores ``depth``: pinning the first assignment would crowd the later hops after it.
  CWE and FWE have no needle and ignore ``depth`` too.
- Answer prefixes without RULER's leading and trailing spaces: :func:`lcm.evals.tasks.render` starts the
  assistant turn (or a new line) with them, and a trailing space would force an unusual first answer token.
- Each sample's unit count is searched exactly (RULER searches once per length, then shrinks per sample).

Minimum lengths with SmolLM2's tokenizer and chat template: 100-230 tokens for NIAH and FWE, 280 for QA, ~660 for
VT and ~700 for CWE (their solved examples); below a task's minimum, generating raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.special import zeta

from lcm.evals import tasks
from lcm.evals.ruler_words import (
    NOISE,
    cycled,
    draw_distinct,
    english_words,
    essay_words,
    invented_facts,
    prose_documents,
    split_sentences,
    word_key,
)
from lcm.evals.tasks import Sample

NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} mentioned in the "
    "provided text?"
)
NIAH_ANSWER_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are:"
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_TEMPLATE = (
    f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n{{context}}\n\n{QA_INSTRUCTION}\n\nQuestion: {{query}}"
)
QA_ANSWER_PREFIX = "Answer:"
QA_DOCUMENT = "Document {number}:\n{document}"
QA_FACTS = 5  # planted documents: the answering one and four distractors
VT_EXAMPLE_TOKENS = 500  # RULER fits its solved example to 500 tokens: vt's minimum length is ~650 tokens
CWE_COMMON = 10  # the template asks for "the 10 most common words"
FWE_ALPHA = 2.0  # synthetic.yaml; word k has floor(n * k^-alpha / zeta(alpha)) occurrences
RULER_THRESHOLD = 0.856  # Llama-2-7B's average at 4k in the paper (85.6%), RULER's bar for effective length


@dataclasses.dataclass(frozen=True)
class Planted:
    """One sample's random draws, made before fitting so that the prompt at ``n`` units is a pure function."""

    text: Callable[[int], tuple[str, str]]  # haystack units -> (prompt, answer prefix)
    references: tuple[str, ...]
    meta: Callable[[int], dict[str, Any]]  # JSON-able record of the placement at n units
    depth: float | None = None
    max_units: int | None = None  # how many haystack units were drawn (None: unbounded)


Draw = Callable[[Any, np.random.Generator, int, float], Planted]  # (tokenizer, rng, length, depth)


@dataclasses.dataclass(frozen=True)
class RulerTask:
    """A :class:`lcm.evals.tasks.TaskGenerator` for one RULER task; ``meta["units"]`` is the fitted unit count."""

    name: str
    draw: Draw
    metric: str = "string_match_all"
    max_new_tokens: int = 128  # RULER's tokens_to_generate
    # where the question starts: kvpress's pattern for the task (NIAH: "What (?:is|are all) the special magic")
    question: tuple[str, ...] = ("What are all the special magic", "What is the special magic")

    def __call__(
        self,
        tokenizer: Any,
        length: int,
        num_samples: int,
        seed: int = 0,
        chat: bool = True,
        depths: Sequence[float] | None = None,
    ) -> list[Sample]:
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        return [
            self._sample(tokenizer, length, seed, chat, index, depth)
            for index, depth in enumerate(tasks.sample_depths(num_samples, depths))
        ]

    def _sample(self, tokenizer: Any, length: int, seed: int, chat: bool, index: int, depth: float) -> Sample:
        planted = self.draw(tokenizer, tasks.sample_rng(self.name, length, seed, index), length, depth)
        units, ids = tasks.fit_to_length(
            lambda n: tasks.render(tokenizer, *planted.text(n), chat), length, self.name, planted.max_units
        )
        meta = {"units": units, **planted.meta(units)}
        sample = Sample(self.name, length, index, tuple(ids), planted.references, self.metric, self.max_new_tokens)
        start = tasks.question_start(tokenizer, ids, self.question)
        return dataclasses.replace(sample, depth=planted.depth, meta=meta, question_start=start)


def _plant(units: Sequence[str], items: Sequence[tuple[float, str]]) -> tuple[list[str], list[int], list[int]]:
    """``units`` with each ``(depth, text)`` item before unit ``round(depth * len(units))`` (ties in item order).

    Returns the pieces, each item's unit slot and each item's index among the pieces.
    """
    slots = [round(depth * len(units)) for depth, _ in items]
    pieces: list[str] = []
    where = [0] * len(items)
    start = 0
    for j in sorted(range(len(items)), key=lambda j: (slots[j], j)):
        pieces.extend(units[start : slots[j]])
        start = slots[j]
        where[j] = len(pieces)
        pieces.append(items[j][1])
    pieces.extend(units[start:])
    return pieces, slots, where


@dataclasses.dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "noise" (repeated sentences), "essay" (prose) or "needle" (needles with other keys)
    key_kind: str = "words"
    value_kind: str = "numbers"
    num_keys: int = 1  # needles with different keys; at least num_queries
    num_values: int = 1  # needles (values) per key
    num_queries: int = 1  # keys asked for


def _niah(cfg: NiahConfig) -> Draw:
    def draw(tokenizer: Any, rng: np.random.Generator, length: int, depth: float) -> Planted:
        num_keys = max(cfg.num_keys, cfg.num_queries)
        # a needle is > 4 tokens in any tokenizer, so length // 4 distractors always suffice
        spare = length // 4 + 1 if cfg.haystack == "needle" else 0
        keys = draw_distinct(rng, cfg.key_kind, num_keys + spare)  # one draw: no distractor repeats a key
        values = draw_distinct(rng, cfg.value_kind, num_keys * cfg.num_values + spare)
        distractors = [
            NIAH_NEEDLE.format(kind=cfg.value_kind, key=k, value=v)
            for k, v in zip(keys[num_keys:], values[num_keys * cfg.num_values :], strict=True)
        ]
        needles = [(keys[j // cfg.num_values], values[j]) for j in range(num_keys * cfg.num_values)]
        queried = [int(k) for k in rng.choice(num_keys, size=cfg.num_queries, replace=False)]
        references = tuple(values[k * cfg.num_values + v] for k in queried for v in range(cfg.num_values))
        depths = rng.uniform(size=len(needles))
        depths[queried[0] * cfg.num_values] = depth
        items = [
            (float(d), NIAH_NEEDLE.format(kind=cfg.value_kind, key=k, value=v))
            for d, (k, v) in zip(depths, needles, strict=True)
        ]
        query = ", ".join(keys[k] for k in queried[:-1]) + ", and " if len(queried) > 1 else ""
        query += keys[queried[-1]]
        template, prefix, kind = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, cfg.value_kind
        if len(references) == 1:  # RULER's rewording for a single answer
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            prefix, kind = prefix.replace("are", "is"), kind[:-1]

        def layout(n: int) -> tuple[str, list[int], int]:
            if cfg.haystack == "essay":
                units = split_sentences(" ".join(cycled(essay_words(), n)))
            else:
                units = distractors[:n] if cfg.haystack == "needle" else [NOISE] * n
            pieces, slots, _ = _plant(units, items)
            return (" " if cfg.haystack == "essay" else "\n").join(pieces), slots, len(units)

        def text(n: int) -> tuple[str, str]:
            return template.format(kind=kind, context=layout(n)[0], query=query), prefix.format(kind=kind, query=query)

        def meta(n: int) -> dict[str, Any]:
            _, slots, num_units = layout(n)
            placed = [
                {"key": k, "value": v, "text": t, "depth": s / max(num_units, 1)}
                for (k, v), (_, t), s in zip(needles, items, slots, strict=True)
            ]
            queries = [keys[k] for k in queried]
            return {"haystack": cfg.haystack, "haystack_units": num_units, "queries": queries, "needles": placed}

        return Planted(text, references, meta, depth, len(distractors) if cfg.haystack == "needle" else None)

    return draw


def _vt_chain(rng: np.random.Generator, letters: int, hops: int, taken: set[str]) -> tuple[list[str], str]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(chr(65 + c) for c in rng.integers(26, size=letters))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names, str(rng.integers(10000, 99999))


def _vt_question(names: list[str], value: str, depths: Sequence[float], n: int) -> tuple[str, str, list[int]]:
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in itertools.pairwise(names)]
    pieces, slots, _ = _plant([NOISE] * n, list(zip(depths, lines, strict=True)))
    question = VT_TEMPLATE.format(context="\n".join(pieces), query=value)
    return question, VT_ANSWER_PREFIX.format(num_v=len(names), query=value), slots


def _vt(hops: int = 4) -> Draw:
    def draw(tokenizer: Any, rng: np.random.Generator, length: int, depth: float) -> Planted:
        taken: set[str] = set()
        names, value = _vt_chain(rng, 5, hops, taken)
        example_names, example_value = _vt_chain(rng, 3, hops, taken)  # RULER's example: 3-letter names
        while example_value == value:
            example_value = str(rng.integers(10000, 99999))
        example_depths = sorted(rng.uniform(size=hops + 1))
        depths = sorted(rng.uniform(size=hops + 1))  # as RULER: a depth would cluster the chain (see module doc)

        def example(m: int) -> str:
            question, prefix, _ = _vt_question(example_names, example_value, example_depths, m)
            return f"{question} {prefix} {' '.join(example_names)}"

        m, _ = tasks.fit_to_length(
            lambda m: tokenizer.encode(example(m), add_special=False), VT_EXAMPLE_TOKENS, "vt example"
        )
        solved = example(m)

        def text(n: int) -> tuple[str, str]:
            question, prefix, _ = _vt_question(names, value, depths, n)
            return f"{solved}\n{question}", prefix

        def meta(n: int) -> dict[str, Any]:
            slots = _vt_question(names, value, depths, n)[2]
            example = {"value": example_value, "variables": example_names, "units": m}
            return {"value": value, "variables": names, "depths": [s / max(n, 1) for s in slots], "example": example}

        return Planted(text, tuple(names), meta)

    return draw


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe(tokenizer: Any, rng: np.random.Generator, length: int, depth: float) -> Planted:
    # synthetic.yaml: a word list with 10 words 30x and the others 3x, the example 10x/3x over 40 words; below
    # 4k tokens RULER lowers these to 6x/1x and 3x/1x over 20 words
    num_example, example_common, example_rare, common_repeats, rare_repeats = (
        (20, 3, 1, 6, 1) if length < 4096 else (40, 10, 3, 30, 3)
    )
    pool = english_words()
    perm = rng.permutation(len(pool))
    example = [pool[i] for i in perm[:num_example]]
    common = [pool[i] for i in perm[num_example : num_example + CWE_COMMON]]
    rest = tuple(pool[i] for i in perm[num_example + CWE_COMMON :])
    spare = length // 3 + 1  # an entry "N. word" is >= 3 tokens
    rare = list(rest[:spare]) + [word_key(j, rest) for j in range(max(0, spare - len(rest)))]
    example_list = example[:CWE_COMMON] * example_common + example[CWE_COMMON:] * example_rare
    example_list = [example_list[i] for i in rng.permutation(len(example_list))]
    solved = (
        f"{CWE_TEMPLATE.format(context=_numbered(example_list))} {CWE_ANSWER_PREFIX} {_numbered(example[:CWE_COMMON])}"
    )
    # one random priority per occurrence, drawn now: the list at n rare words is a sub-list of that at n + 1
    common_priority = rng.random((CWE_COMMON, common_repeats))
    rare_priority = rng.random((spare, rare_repeats))

    def text(n: int) -> tuple[str, str]:
        which = np.concatenate(
            [np.repeat(np.arange(CWE_COMMON), common_repeats), np.repeat(np.arange(n), rare_repeats)]
        )
        priority = np.concatenate([common_priority.ravel(), rare_priority[:n].ravel()])
        order = np.argsort(priority, kind="stable")
        is_common = order < CWE_COMMON * common_repeats
        words = [common[which[i]] if c else rare[which[i]] for i, c in zip(order, is_common, strict=True)]
        return f"{solved}\n{CWE_TEMPLATE.format(context=_numbered(words))}", CWE_ANSWER_PREFIX

    def meta(n: int) -> dict[str, Any]:
        repeats = {"common_repeats": common_repeats, "rare_repeats": rare_repeats}
        return {"common": common, **repeats, "rare_words": n, "example_common": example[:CWE_COMMON]}

    return Planted(text, tuple(common), meta, None, spare)


def _fwe(tokenizer: Any, rng: np.random.Generator, length: int, depth: float) -> Planted:
    size = max(4, length // 50)  # RULER: vocab_size = max_seq_length // 50
    coded: list[str] = []
    while len(coded) < size - 1:  # distinct 6-letter coded words
        word = "".join(chr(97 + c) for c in rng.integers(26, size=6))
        coded += [word] if word not in coded else []
    vocab = ["...", *coded]  # RULER makes the most frequent "word" dots, which the question says to ignore
    weights = np.arange(1, size + 1, dtype=np.float64) ** -FWE_ALPHA / zeta(FWE_ALPHA)
    spare = 2 * length + 1  # n words give >= n / zeta(2) > n / 2 tokens
    spare_counts = np.floor(spare * weights).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(spare_counts)[:-1]])
    priority = rng.random(int(spare_counts.sum()))  # one per occurrence, as in _cwe

    def counts(n: int) -> np.ndarray:
        return np.floor(n * weights).astype(np.int64)

    def text(n: int) -> tuple[str, str]:
        c = counts(n)
        slots = np.concatenate([start + np.arange(k) for start, k in zip(starts, c, strict=True)])
        which = np.repeat(np.arange(size), c)[np.argsort(priority[slots], kind="stable")]
        return FWE_TEMPLATE.format(context=" ".join(vocab[k] for k in which)), FWE_ANSWER_PREFIX

    def meta(n: int) -> dict[str, Any]:
        return {"vocab": vocab, "counts": counts(n).tolist(), "alpha": FWE_ALPHA}

    return Planted(text, tuple(vocab[1:4]), meta, None, spare)


def _qa(tokenizer: Any, rng: np.random.Generator, length: int, depth: float) -> Planted:
    facts = invented_facts(rng, QA_FACTS)
    depths = [depth, *rng.uniform(size=QA_FACTS - 1)]  # fact 0 answers the question
    documents = prose_documents()
    order = rng.permutation(len(documents))

    def layout(n: int) -> tuple[list[str], list[int]]:
        units = [documents[order[i % len(documents)]] for i in range(n)]
        pieces, _, where = _plant(units, list(zip(depths, facts.texts, strict=True)))
        return pieces, where

    def text(n: int) -> tuple[str, str]:
        context = "\n\n".join(QA_DOCUMENT.format(number=i + 1, document=d) for i, d in enumerate(layout(n)[0]))
        return QA_TEMPLATE.format(context=context, query=facts.question), QA_ANSWER_PREFIX

    def meta(n: int) -> dict[str, Any]:
        planted = [
            {"document": w + 1, "text": t, "entity": e, "answer": a}
            for w, t, e, a in zip(layout(n)[1], facts.texts, facts.entities, facts.answers, strict=True)
        ]
        return {"question": facts.question, "attribute": facts.attribute, "facts": planted}

    return Planted(text, (facts.answers[0],), meta, depth)


TASKS: dict[str, RulerTask] = {
    "niah_single_1": RulerTask("niah_single_1", _niah(NiahConfig("noise"))),
    "niah_single_2": RulerTask("niah_single_2", _niah(NiahConfig("essay"))),
    "niah_single_3": RulerTask("niah_single_3", _niah(NiahConfig("essay", value_kind="uuids"))),
    "niah_multikey_1": RulerTask("niah_multikey_1", _niah(NiahConfig("essay", num_keys=4))),
    "niah_multikey_2": RulerTask("niah_multikey_2", _niah(NiahConfig("needle"))),
    "niah_multikey_3": RulerTask("niah_multikey_3", _niah(NiahConfig("needle", key_kind="uuids", value_kind="uuids"))),
    "niah_multivalue": RulerTask("niah_multivalue", _niah(NiahConfig("essay", num_values=4))),
    "niah_multiquery": RulerTask("niah_multiquery", _niah(NiahConfig("essay", num_queries=4))),
    "vt": RulerTask("vt", _vt(hops=4), max_new_tokens=30, question=("Question: Find all variables",)),
    "cwe": RulerTask("cwe", _cwe, max_new_tokens=120, question=("Question: What are the 10 most common words",)),
    "fwe": RulerTask("fwe", _fwe, max_new_tokens=50, question=("Question: Do not provide any explanation",)),
    "qa": RulerTask("qa", _qa, "string_match_part", 32, question=(f"{QA_INSTRUCTION}\n\nQuestion:",)),
}


def effective_length(scores_by_length: dict[int, float], threshold: float = RULER_THRESHOLD) -> int | None:
    """RULER's effective length: the longest length that, with every shorter one, scores above ``threshold``.

    Scores are fractions in [0, 1] (RULER reports percent: its 85.6 is our 0.856, Llama-2-7B's 4k average).
    None when the shortest length already fails (or there are no scores).
    """
    bad = {n: s for n, s in scores_by_length.items() if not 0.0 <= s <= 1.0}
    if bad:
        raise ValueError(f"scores must be fractions in [0, 1], got {bad} (percentages? divide by 100)")
    effective = None
    for length in sorted(scores_by_length):
        if scores_by_length[length] <= threshold:
            break
        effective = length
    return effective
