"""Giraffe's tasks (LongChat-Lines, FreeFormQA, AlteredNumericQA) on the real tokenizer: fit, placement, scoring."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lcm.evals import giraffe, metrics, texts
from lcm.evals.giraffe_facts import FACTS
from lcm.io.tokenizer import load_tokenizer

QA_TASKS = ["freeform_qa", "altered_numeric_qa"]
LINE_RE = re.compile(r"^line ([a-z]+-[a-z]+): REGISTER_CONTENT is <(\d+)>$", re.MULTILINE)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def _text(tokenizer, sample) -> str:
    return tokenizer.decode(sample.ids, skip_special=False)


def _document(text: str) -> str:
    start = text.index("Document:\n") + len("Document:\n")
    return text[start : text.rindex("\n\nQuestion:\n")]


def _planted_passage(sample) -> str:
    (fact,) = [f for f in FACTS if f.question == sample.meta["question"]]
    if sample.task == "altered_numeric_qa":
        return re.sub(rf"(?<!\d){fact.answer}(?!\d)", sample.meta["altered"], fact.passage)
    return fact.passage


def test_registry_names() -> None:
    assert set(giraffe.TASKS) == {"lines", "freeform_qa", "altered_numeric_qa"}


@pytest.mark.parametrize("length", [1024, 4096])
def test_lines_fit_and_the_asked_line_sits_at_its_depth(tokenizer, length: int) -> None:
    samples = giraffe.generate_lines(tokenizer, length, 3)  # depths 0, 0.5, 1
    for sample in samples:
        assert length - 40 <= len(sample.ids) <= length  # one line is ~20 tokens
        text = _text(tokenizer, sample)
        record = LINE_RE.findall(text)
        ids = [line_id for line_id, _ in record]
        assert len(record) == sample.meta["num_lines"] and len(set(ids)) == len(ids)
        at = sample.meta["line_index"]
        assert record[at] == (sample.meta["line_id"], sample.references[0])
        assert re.findall(r"\d+", text).count(sample.references[0]) == 1  # the value marks one line only
        assert abs(at / (len(record) - 1) - sample.depth) <= 1 / len(record)
        assert f"in line {sample.meta['line_id']}? I need the number." in text
        assert text.endswith(f"line {sample.meta['line_id']}: REGISTER_CONTENT is")
        assert sample.metric == "first_integer" and sample.max_new_tokens == 16


def test_lines_prompt_has_exactly_the_lines_asked_for(tokenizer) -> None:
    sample = giraffe.lines_prompt(tokenizer, 100, seed=3, index=1)
    record = LINE_RE.findall(_text(tokenizer, sample))
    assert len(record) == 100 == sample.meta["num_lines"] and sample.length == len(sample.ids)
    assert record[sample.meta["line_index"]][1] == sample.references[0]
    assert giraffe.lines_prompt(tokenizer, 100, seed=3, index=1) == sample
    at_end = giraffe.lines_prompt(tokenizer, 100, seed=3, index=1, depth=1.0)
    assert at_end.meta["line_index"] == 99
    with pytest.raises(ValueError, match="num_lines"):
        giraffe.lines_prompt(tokenizer, 0)


@pytest.mark.parametrize("task", QA_TASKS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_qa_fits_and_the_passage_sits_in_its_tenth(tokenizer, task: str, length: int) -> None:
    samples = giraffe.TASKS[task](tokenizer, length, 6)
    assert [s.meta["position"] for s in samples] == ["start", "middle", "end"] * 2
    for sample in samples:
        assert length - 150 <= len(sample.ids) <= length  # a haystack unit is at most ~400 characters
        text = _text(tokenizer, sample)
        assert text.endswith("Question:\n" + sample.meta["question"] + "<|im_end|>\n<|im_start|>assistant\nAnswer:")
        document, passage = _document(text), _planted_passage(sample)
        assert document.count(passage) == 1
        where = document.index(passage) / (len(document) - len(passage))
        low, high = giraffe.POSITIONS[sample.meta["position"]]
        assert low - 0.01 <= where <= high + 0.01 and abs(where - sample.depth) < 0.01
        answer = sample.references[0]
        assert text.count(answer) == passage.count(answer) >= 1  # the answer is nowhere but in the passage
        assert sample.metric == "presence" and sample.max_new_tokens == 32


def test_qa_given_depths_name_their_bins(tokenizer) -> None:
    samples = giraffe.generate_freeform_qa(tokenizer, 2048, 5, depths=[0.05, 0.5, 0.95, 0.0, 1.0])
    assert [s.meta["position"] for s in samples] == ["start", "middle", "end", "start", "end"]
    for sample, asked in zip(samples, [0.05, 0.5, 0.95, 0.0, 1.0], strict=True):
        assert abs(sample.depth - asked) < 0.05


def test_altered_numbers_replace_the_original_everywhere(tokenizer) -> None:
    for sample in giraffe.generate_altered_numeric_qa(tokenizer, 512, 30, seed=1):
        original, altered = sample.meta["original"], sample.meta["altered"]
        text = _text(tokenizer, sample)
        assert original not in text and sample.references == (altered,)
        assert altered in _planted_passage(sample) and text.count(altered) == _planted_passage(sample).count(altered)
        if 1000 <= int(original) <= 2100:
            assert 1 <= abs(int(altered) - int(original)) <= 10
        else:
            assert altered != original and len(altered) == len(original) and altered[0] != "0"


def test_every_numeric_fact_can_be_altered() -> None:
    prose = texts.stdlib_prose()
    for fact in giraffe.numeric_facts():
        for seed in range(5):
            avoid = "\n".join([prose, fact.passage, fact.question])
            altered = giraffe.alter_number(fact.answer, np.random.default_rng(seed), avoid)
            assert altered != fact.answer and altered not in avoid


def test_fact_bank() -> None:
    prose = texts.stdlib_prose()
    assert len(giraffe.freeform_facts()) >= 30 and len(giraffe.numeric_facts()) >= 15
    assert len({f.question for f in FACTS}) == len(FACTS)
    assert all(f.answer not in prose for f in giraffe.freeform_facts())


@pytest.mark.parametrize("task", list(giraffe.TASKS))
def test_seeds_reproduce(tokenizer, task: str) -> None:
    generate = giraffe.TASKS[task]
    first = generate(tokenizer, 768, 3, seed=5)
    assert generate(tokenizer, 768, 3, seed=5) == first
    assert generate(tokenizer, 768, 3, seed=6) != first


@pytest.mark.parametrize("task", list(giraffe.TASKS))
def test_too_short_a_length_is_an_error(tokenizer, task: str) -> None:
    with pytest.raises(ValueError, match="below the minimum"):
        giraffe.TASKS[task](tokenizer, 64, 1)


def test_lines_oracle_scores_one_and_another_lines_value_zero(tokenizer) -> None:
    rng = np.random.default_rng(0)
    for sample in giraffe.generate_lines(tokenizer, 1024, 8):
        assert metrics.score(sample.metric, f" <{sample.references[0]}>\n", sample.references) == 1.0
        others = [v for _, v in LINE_RE.findall(_text(tokenizer, sample)) if v != sample.references[0]]
        guess = others[int(rng.integers(len(others)))]
        assert metrics.score(sample.metric, f" <{guess}>", sample.references) == 0.0  # values are distinct


@pytest.mark.parametrize("task", QA_TASKS)
def test_qa_oracle_scores_one_and_a_random_sentence_near_zero(tokenizer, task: str) -> None:
    rng = np.random.default_rng(0)
    samples = giraffe.TASKS[task](tokenizer, 1024, 24)
    oracle = [metrics.score(s.metric, f" {s.references[0]}.", s.references) for s in samples]
    assert oracle == [1.0] * len(samples)
    guesses = []
    for sample in samples:
        text = _text(tokenizer, sample)
        user = text[text.index("<|im_start|>user\n") : text.rindex("<|im_end|>")]
        sentences = [x for x in re.split(r"(?<=[.?!])\s+", user) if x.strip()]
        guesses.append(metrics.score(sample.metric, sentences[int(rng.integers(len(sentences)))], sample.references))
    assert np.mean(guesses) <= 0.15  # ~3 passage sentences among ~100 in a 1k-token prompt


def test_plain_prompt_without_chat_template(tokenizer) -> None:
    (sample,) = giraffe.generate_lines(tokenizer, 512, 1, chat=False)
    text = tokenizer.decode(sample.ids, skip_special=False)
    assert len(sample.ids) <= 512 and "<|im_start|>" not in text
    assert text.endswith(f"I need the number.\nline {sample.meta['line_id']}: REGISTER_CONTENT is")
