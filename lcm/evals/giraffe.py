"""Giraffe's long-context tasks: LongChat-Lines, FreeFormQA and AlteredNumericQA, generated at any length.

Pal et al. 2023, "Giraffe: Adventures in Expanding Context Lengths in LLMs" (arXiv 2308.10882, §3); official code
abacusai/Long-Context, ``python/eval/longeval`` (lines) and ``python/eval/wikiqa`` (QA inference and the
presence-accuracy notebook). Lines originates in LongChat's ``longeval`` (DachengLi1/LongChat,
``longeval/utils.py:generate_lines_testcases``, the ``LRT-NL`` line ids).

- ``lines``: a record of lines ``line <adjective-noun>: REGISTER_CONTENT is <n>`` under LongChat's header, then
  LongChat's question for one line's n. Correct iff the first integer of the continuation equals n (Giraffe's
  ``test_lines_one_sample``). :func:`generate_lines` fits the number of lines to the length; :func:`lines_prompt`
  takes the number of lines itself, as the paper sweeps it (100 to 1100 lines).
- ``freeform_qa``: a question whose answer lies in one passage of a long document, the passage in the first 10%,
  the bulk, or the last 10% of the document; presence accuracy (``answer.strip() in output``, case-sensitive as
  in the notebook). The prompt is WikiQA's: its instruction, ``Document:``, the document, ``Question:``.
- ``altered_numeric_qa``: the numeric-answer questions, with every occurrence of the number in the document
  changed by Giraffe's rule: a year (1000 to 2100) moves by a nonzero offset in [-10, 10], any other number
  becomes a different number with as many digits. The reference is the altered number, so a model that answers
  from memory fails.

Choices the paper leaves open, and deviations:

- Lines: ids are adjective-noun pairs from our own word lists (LongChat draws them with ``wonderwords``, which lcm
  does not depend on), all distinct. Values are uniform in [1, 50000] as in LongChat but distinct within a record
  (LongChat draws with replacement), so the asked value marks one line only. The asked line sits at ``depth``
  (LongChat picks it uniformly at random; :func:`lines_prompt` does that when given no depth).
- Answer prefixes (lcm's convention, :mod:`lcm.evals.tasks`; Giraffe's chat prompts end with the question): lines
  ends with the asked line's own start, ``line <id>: REGISTER_CONTENT is`` (after LongChat's suffix for its base
  model, ``Line <id>: <REGISTER_CONTENT> is``); the QA tasks with ``Answer:``.
- Generation budgets: 16 new tokens for lines (a value is at most 5 digits; Giraffe gives 35, LongChat 100), 32
  for QA (Giraffe gives 50); both ample for the first integer or a short answer.
- Documents: WikiQA truncates Wikipedia articles that contain the answer. We have neither Wikipedia nor Natural
  Questions locally, so the document is the Python documentation prose shipped with CPython
  (:func:`lcm.evals.texts.stdlib_prose`), paragraphs in order from the start (long ones cut at line breaks so that
  the prompt fits its length to within ~100 tokens), wrapping round if a length needs more than its ~113k tokens
  (SmolLM2's tokenizer); the answer passage is one of our own ~40 facts (:mod:`lcm.evals.giraffe_facts`) planted
  as a paragraph. The planted passage is off-topic for its document, which makes it easier to find than an
  answer sentence inside a Wikipedia article.
- Facts whose answer occurs anywhere in the prose are left out, so that quoting the haystack cannot score.
- Positions: measured in characters of the document before the passage. ``start`` is [0, 0.1], ``middle`` is
  Giraffe's "bulk" (the notebook's ``random``) [0.1, 0.9], ``end`` is [0.9, 1]. With ``depths=None`` samples cycle
  start, middle, end, each at a seeded depth within its bin; a given depth d is used as is and named by its bin
  (d <= 0.1 start, d >= 0.9 end). The passage goes at the paragraph boundary in the bin nearest d.
- WikiQA asks half its questions before the document; we always ask after it, as RULER does, so that the answer
  prefix follows the question.
- An altered number is redrawn until it occurs nowhere in the haystack, passage or question (not even inside a
  longer number), so it is found only where it was planted; the original occurs nowhere either, since facts
  whose answer is in the prose are not used.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lcm.evals import tasks, texts
from lcm.evals.giraffe_facts import FACTS, Fact

# LongChat's LRT prompt, verbatim ("Now the record start" included).
LINES_HEADER = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and contains "
    "a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, memorize its "
    "corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the corresponding "
    "<REGISTER_CONTENT> of a certain line index. Now the record start:\n\n"
)
LINE = "line {line_id}: REGISTER_CONTENT is <{value}>\n"
LINES_QUESTION = (
    "\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {line_id}? I need the number."
)
LINES_QUESTION_START = "Now the record is over."  # where the question starts
LINES_ANSWER_PREFIX = "line {line_id}: REGISTER_CONTENT is"
LINES_MAX_VALUE = 50000  # LongChat: random.randint(1, 50000)
LINES_MAX_NEW_TOKENS = 16

_ADJECTIVES = tuple(
    """
    able absurd acidic adorable agile alert amber ample ancient angry anxious arctic arid ashen awkward bashful bitter
    bland blissful bold bouncy brave breezy brief bright brisk broad bumpy busy calm candid careful cheerful chilly
    clever cloudy clumsy coarse cosmic cozy crafty creamy crisp crooked cruel curly curious damp dapper daring
    dazzling decent deep delicate dense dizzy dreamy dusty eager early earnest elegant empty endless epic fancy
    fearless feisty fierce fluffy foggy fond fragile frank frosty frugal fuzzy gentle giant glossy golden graceful
    grand greedy grumpy hasty hazy hollow humble hungry icy idle jagged jolly joyful juicy keen kind lanky lazy lively
    lonely loud lucky lumpy mellow merry mighty misty modest moody muddy narrow neat nervous nimble noble noisy odd
    orange pale patient peaceful plain plump polite proud quaint quick quiet rapid rare rusty salty scary shaggy sharp
    shiny shy silent silky silly sleepy slim smooth snowy soft sour spicy steady sticky stormy sturdy sunny swift tall
    tame tender thirsty tidy tiny tough tricky vast velvet vivid wary weary wicked wild windy wise witty wooden young
    zany zealous
    """.split()
)
_NOUNS = tuple(
    """
    acorn anchor apple arrow badge bagel banjo barrel basket beacon beetle bell bicycle blanket bottle boulder
    bracelet bridge bucket button cabin cactus camel candle canoe canyon carpet castle cello chimney cloud clover comet
    compass cookie copper cottage crayon cricket crown cushion dagger daisy desert dolphin donkey dragon drum eagle
    easel falcon feather fern fiddle flute forest fossil fountain garden garlic glacier goblet granite guitar hammer
    harbor harp helmet honey island jacket jelly kettle kite ladder lantern lemon lizard locket magnet mango maple
    marble meadow mirror mitten moose mosaic muffin napkin needle nest nugget oasis ocean olive orchard otter oyster
    paddle panda parrot peach pebble pencil pepper piano pickle pillow pine pirate planet plum pocket pond potato
    puddle pumpkin puzzle quilt rabbit radish raven ribbon river robot rocket saddle sailor salmon sandal scarf shovel
    skate sparrow spider sponge squirrel stone stove sunflower teapot thimble tiger tomato trumpet tulip turtle
    umbrella valley violin wagon walnut whale whistle willow window wizard yacht zebra
    """.split()
)

# WikiQA's instruction, verbatim from the abacusai/WikiQA-Free_Form_QA prompts (no final full stop there either).
QA_INSTRUCTION = (
    "Answer the question based on the information provided in the document given below. The answer should be a "
    "single word or a number or a short phrase of few words"
)
QA_PROMPT = "{instruction}\n\nDocument:\n{document}\n\nQuestion:\n{question}"
QA_QUESTION = "Question:\n"  # where the question starts (its last occurrence)
QA_ANSWER_PREFIX = "Answer:"
QA_MAX_NEW_TOKENS = 32
POSITIONS: dict[str, tuple[float, float]] = {"start": (0.0, 0.1), "middle": (0.1, 0.9), "end": (0.9, 1.0)}
_UNIT_CHARS = 400  # haystack paragraphs longer than this are cut at line breaks


def line_ids() -> tuple[str, ...]:
    """Every line id, ``adjective-noun``: 28,320 of them (a record of about 600k tokens)."""
    return tuple(f"{adjective}-{noun}" for adjective in _ADJECTIVES for noun in _NOUNS)


def _draw_lines(rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """Distinct ids and distinct values in a random order; entry 0 is the line asked for, the rest fill the record."""
    every_id = line_ids()
    ids = [every_id[i] for i in rng.permutation(len(every_id))]
    values = (rng.permutation(LINES_MAX_VALUE)[: len(ids)] + 1).tolist()
    return ids, values


def _lines_text(ids: Sequence[str], values: Sequence[int], num_lines: int, depth: float) -> tuple[str, str, int]:
    """The prompt with ``num_lines`` lines, the asked one (entry 0) at ``depth``; its answer prefix; its line index."""
    at = round(depth * (num_lines - 1))
    order = [*range(1, at + 1), 0, *range(at + 1, num_lines)]
    record = "".join(LINE.format(line_id=ids[i], value=values[i]) for i in order)
    prompt = LINES_HEADER + record + LINES_QUESTION.format(line_id=ids[0])
    return prompt, LINES_ANSWER_PREFIX.format(line_id=ids[0]), at


def _lines_sample(
    tokenizer: Any,
    ids: Sequence[str],
    values: Sequence[int],
    num_lines: int,
    depth: float,
    token_ids: list[int],
    length: int,
    index: int,
) -> tasks.Sample:
    _, _, at = _lines_text(ids, values, num_lines, depth)
    start = tasks.question_start(tokenizer, token_ids, LINES_QUESTION_START)
    return tasks.Sample(
        task="lines",
        length=length,
        index=index,
        ids=tuple(token_ids),
        references=(str(values[0]),),
        metric="first_integer",
        max_new_tokens=LINES_MAX_NEW_TOKENS,
        depth=depth,
        meta={"num_lines": num_lines, "line_index": at, "line_id": ids[0]},
        question_start=start,
    )


def generate_lines(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    chat: bool = True,
    depths: Sequence[float] | None = None,
) -> list[tasks.Sample]:
    """LongChat-Lines with as many lines as fit in ``length`` tokens, the asked line at each sample's depth."""
    samples = []
    for index, depth in enumerate(tasks.sample_depths(num_samples, depths)):
        ids, values = _draw_lines(tasks.sample_rng("lines", length, seed, index))

        def build(
            extra_lines: int, ids: list[str] = ids, values: list[int] = values, depth: float = depth
        ) -> list[int]:
            prompt, prefix, _ = _lines_text(ids, values, extra_lines + 1, depth)
            return tasks.render(tokenizer, prompt, prefix, chat)

        extra, token_ids = tasks.fit_to_length(build, length, "lines", max_units=len(ids) - 1)
        samples.append(_lines_sample(tokenizer, ids, values, extra + 1, depth, token_ids, length, index))
    return samples


def lines_prompt(
    tokenizer: Any, num_lines: int, seed: int = 0, index: int = 0, chat: bool = True, depth: float | None = None
) -> tasks.Sample:
    """One LongChat-Lines prompt of exactly ``num_lines`` lines, for the paper's sweep over the number of lines.

    ``depth=None`` puts the asked line at a seeded uniformly random line, as LongChat does. The sample's ``length``
    is its own token count: nothing was fitted.
    """
    if not 1 <= num_lines <= len(line_ids()):
        raise ValueError(f"num_lines={num_lines} must lie in [1, {len(line_ids())}]")
    rng = tasks.sample_rng("lines/num_lines", num_lines, seed, index)
    ids, values = _draw_lines(rng)
    if depth is None:
        depth = int(rng.integers(num_lines)) / max(num_lines - 1, 1)
    elif not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    prompt, prefix, _ = _lines_text(ids, values, num_lines, depth)
    token_ids = tasks.render(tokenizer, prompt, prefix, chat)
    return _lines_sample(tokenizer, ids, values, num_lines, depth, token_ids, len(token_ids), index)


@functools.cache
def _prose() -> str:
    return texts.stdlib_prose()


@functools.cache
def haystack_units() -> tuple[tuple[str, str], ...]:
    """The prose in order as (text, separator) units: paragraphs, those over ~400 characters cut at line breaks.

    The separator is a blank line after a paragraph's last unit and a line break inside one, so the units joined
    give the prose back; fitting a prompt to its length then moves in steps of at most ~100 tokens.
    """
    units = []
    for paragraph in _prose().split("\n\n"):
        lines = paragraph.strip("\n").split("\n")
        if not "".join(lines).strip():
            continue
        piece: list[str] = []
        for line in lines:
            if piece and sum(len(x) + 1 for x in piece) + len(line) > _UNIT_CHARS:
                units.append(("\n".join(piece), "\n"))
                piece = []
            piece.append(line)
        units.append(("\n".join(piece), "\n\n"))
    return tuple(units)


@functools.cache
def freeform_facts() -> tuple[Fact, ...]:
    """The bank's facts whose answer the haystack prose never contains."""
    return tuple(fact for fact in FACTS if fact.answer not in _prose())


def numeric_facts() -> tuple[Fact, ...]:
    return tuple(fact for fact in freeform_facts() if fact.numeric)


def position_of(depth: float) -> str:
    """Giraffe's three answer locations: the first 10% of the document, the bulk, the last 10%."""
    return "start" if depth <= 0.1 else "end" if depth >= 0.9 else "middle"


def alter_number(original: str, rng: np.random.Generator, avoid: str) -> str:
    """Giraffe's AltQA rewrite of ``original``, redrawn until it is not a substring of ``avoid``."""
    value = int(original)
    if 1000 <= value <= 2100:  # a year: stay close, so that the passage's chronology still reads sensibly
        offsets = rng.permutation([*range(-10, 0), *range(1, 11)])
        candidates = [str(value + int(offset)) for offset in offsets]
    else:
        digits = len(original)
        low = 1 if digits == 1 else 10 ** (digits - 1)  # no leading zero: the digit count must survive
        candidates = [str(v) for v in rng.integers(low, 10**digits, size=1000)]
    for candidate in candidates:
        if candidate != original and candidate not in avoid:
            return candidate
    raise ValueError(f"no alteration of {original} avoids the haystack; remove it from the fact bank")


def _document(units: Sequence[tuple[str, str]], num_units: int, passage: str, depth: float) -> tuple[str, float]:
    """``num_units`` haystack units with ``passage`` as a paragraph of its own, at the paragraph boundary in
    ``depth``'s bin nearest ``depth``; the fraction of the haystack's characters before it."""
    haystack = [text + separator for text, separator in (units[i % len(units)] for i in range(num_units))]
    before = np.concatenate([[0], np.cumsum([len(unit) for unit in haystack])])
    fractions = before / max(int(before[-1]), 1)
    # never split a paragraph, except that the very end of the (truncated) haystack is always a boundary
    boundaries = np.array(
        [0, *(k for k in range(1, num_units + 1) if haystack[k - 1].endswith("\n\n") or k == num_units)]
    )
    low, high = POSITIONS[position_of(depth)]
    inside = boundaries[(fractions[boundaries] >= low) & (fractions[boundaries] <= high)]
    candidates = inside if inside.size else boundaries  # a document too short to have a boundary in the bin
    at = int(candidates[np.argmin(np.abs(fractions[candidates] - depth))])
    head, tail = "".join(haystack[:at]), "".join(haystack[at:])
    if head:
        head = head.rstrip("\n") + "\n\n"
    return (head + passage + "\n\n" + tail).rstrip("\n"), float(fractions[at])


def _qa_samples(
    task: str,
    facts: Sequence[Fact],
    alter: bool,
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int,
    chat: bool,
    depths: Sequence[float] | None,
) -> list[tasks.Sample]:
    units = haystack_units()
    asked = None if depths is None else tasks.sample_depths(num_samples, depths)
    names = list(POSITIONS)
    samples = []
    for index in range(num_samples):
        rng = tasks.sample_rng(task, length, seed, index)
        fact_index = int(rng.integers(len(facts)))
        fact = facts[fact_index]
        if asked is None:
            low, high = POSITIONS[names[index % len(names)]]
            depth = float(rng.uniform(low, high))
        else:
            depth = asked[index]
        passage, answer = fact.passage, fact.answer
        meta: dict[str, Any] = {"position": position_of(depth), "question": fact.question}
        if alter:
            answer = alter_number(fact.answer, rng, avoid="\n".join([_prose(), fact.passage, fact.question]))
            passage = re.sub(rf"(?<!\d){fact.answer}(?!\d)", answer, fact.passage)
            meta.update(original=fact.answer, altered=answer)

        def build(
            num_units: int, passage: str = passage, question: str = fact.question, depth: float = depth
        ) -> list[int]:
            document, _ = _document(units, num_units, passage, depth)
            prompt = QA_PROMPT.format(instruction=QA_INSTRUCTION, document=document, question=question)
            return tasks.render(tokenizer, prompt, QA_ANSWER_PREFIX, chat)

        num_units, token_ids = tasks.fit_to_length(build, length, task)
        _, actual_depth = _document(units, num_units, passage, depth)
        samples.append(
            tasks.Sample(
                task=task,
                length=length,
                index=index,
                ids=tuple(token_ids),
                references=(answer,),
                metric="presence",
                max_new_tokens=QA_MAX_NEW_TOKENS,
                depth=actual_depth,
                meta=meta,
                question_start=tasks.question_start(tokenizer, token_ids, QA_QUESTION),
            )
        )
    return samples


def generate_freeform_qa(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    chat: bool = True,
    depths: Sequence[float] | None = None,
) -> list[tasks.Sample]:
    """FreeFormQA: one fact's passage in a document of ``length`` tokens; scored by the answer's presence."""
    return _qa_samples("freeform_qa", freeform_facts(), False, tokenizer, length, num_samples, seed, chat, depths)


def generate_altered_numeric_qa(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    chat: bool = True,
    depths: Sequence[float] | None = None,
) -> list[tasks.Sample]:
    """AlteredNumericQA: FreeFormQA on the numeric facts, the number rewritten everywhere in the document."""
    return _qa_samples("altered_numeric_qa", numeric_facts(), True, tokenizer, length, num_samples, seed, chat, depths)


TASKS: dict[str, tasks.TaskGenerator] = {
    "lines": generate_lines,
    "freeform_qa": generate_freeform_qa,
    "altered_numeric_qa": generate_altered_numeric_qa,
}
