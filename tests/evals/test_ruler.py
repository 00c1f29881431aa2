"""RULER-style tasks (:mod:`lcm.evals.ruler`) on the real tokenizer.

For every task: the prompt fits its length and is not far below it, what is planted sits where ``meta`` says,
seeds reproduce, a reader that solves the task from the decoded prompt alone scores 1, and a reader that
answers with random words of the prompt scores near chance.
"""

from __future__ import annotations

import collections
import functools
import json
import re

import numpy as np
import pytest

from lcm.evals import metrics, ruler, ruler_words
from lcm.evals.tasks import Sample
from lcm.io.tokenizer import load_tokenizer

NIAH = [name for name in ruler.TASKS if name.startswith("niah")]
# vt carries a 500-token solved example and cwe a 40-entry one: both need more than 512 tokens
LENGTHS = {name: (1024, 2048) if name in ("vt", "cwe") else (512, 2048) for name in ruler.TASKS}
CASES = [(name, length) for name in ruler.TASKS for length in LENGTHS[name]]
NUM_SAMPLES = 3  # depths 0, 0.5, 1


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def generate(tokenizer):
    @functools.cache
    def cached(name: str, length: int, seed: int = 0) -> tuple[Sample, ...]:
        return tuple(ruler.TASKS[name](tokenizer, length, NUM_SAMPLES, seed=seed))

    return cached


def _text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode(sample.ids)


def _after_last(text: str, marker: str) -> str:
    """The text after the last ``marker``: the sample's own task, past any solved example."""
    return text[text.rindex(marker) + len(marker) :]


# ------------------------------------------------------------------------------------------------------------
# A reader that solves each task from the decoded prompt alone (no meta, no references).


def _solve_niah(text: str) -> list[str]:
    query = re.findall(r"for (.+) mentioned in the provided text\?", text)[-1]
    keys = query.replace(", and ", ", ").split(", ")
    return [v for key in keys for v in re.findall(rf"special magic \w+ for {re.escape(key)} is: (\S+)\.", text)]


def _solve_vt(text: str) -> list[str]:
    task = _after_last(text, "Memorize and track the chain(s)")
    value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
    assignments = re.findall(r"VAR (\w+) = (\d+|VAR \w+)", task)
    found, frontier = [], {value}
    while frontier:  # follow the chain hop by hop
        frontier = {name for name, rhs in assignments if rhs.removeprefix("VAR ") in frontier} - set(found)
        found += sorted(frontier)
    return found


def _solve_cwe(text: str) -> list[str]:
    listing = _after_last(text, "Memorize the ones that appear most often.\n").split("\nQuestion:")[0]
    counts = collections.Counter(re.findall(r"\d+\. (\S+)", listing))
    return [word for word, _ in counts.most_common(10)]


def _solve_fwe(text: str) -> list[str]:
    coded = _after_last(text, "three most frequently appeared coded words. ").split("\nQuestion:")[0]
    counts = collections.Counter(w for w in coded.split() if w != "...")
    return [word for word, _ in counts.most_common(3)]


def _solve_qa(text: str) -> list[str]:
    question = _after_last(text, "Question: ")
    entity = re.search(r"the (\w+ \w+)(?: founded)?\?", question).group(1)
    year, founder, city = re.search(
        rf"The {entity} was founded in (\d+) by (\w+ \w+) in the city of (\w+)\.", text
    ).groups()
    return [founder if question.startswith("Who") else city if "city" in question else year]


SOLVERS = {**dict.fromkeys(NIAH, _solve_niah), "vt": _solve_vt, "cwe": _solve_cwe, "fwe": _solve_fwe, "qa": _solve_qa}


# ------------------------------------------------------------------------------------------------------------


def test_registry_matches_ruler() -> None:
    assert set(ruler.TASKS) == {
        *("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2"),
        *("niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa"),
    }
    budget = {"vt": 30, "cwe": 120, "fwe": 50, "qa": 32}  # RULER's tokens_to_generate, 128 for NIAH
    for name, task in ruler.TASKS.items():
        assert task.name == name and task.max_new_tokens == budget.get(name, 128)
        assert task.metric == ("string_match_part" if name == "qa" else "string_match_all")


@pytest.mark.parametrize(("name", "length"), CASES)
def test_prompt_fits_and_the_oracle_reads_the_answer_from_it(tokenizer, generate, name: str, length: int) -> None:
    samples = generate(name, length)
    # the coarsest haystack units: UUID needles (~45 tokens) and ~60-word documents (up to ~130 tokens)
    slack = {"qa": 160, "niah_multikey_3": 64}.get(name, 40)
    for index, sample in enumerate(samples):
        assert (sample.task, sample.length, sample.index) == (name, length, index)
        assert length - slack <= len(sample.ids) <= length, len(sample.ids)
        assert json.loads(json.dumps(sample.to_dict()))["references"] == list(sample.references)  # JSON-able
        text = _text(tokenizer, sample)
        answer = SOLVERS[name](text)
        assert sorted(answer) == sorted(sample.references), (answer, sample.references)  # multivalue: any order
        assert metrics.score(sample.metric, " ".join(answer), sample.references) == 1.0
        # the answer prefix ends the prompt and gives nothing away
        prefix = text.rsplit("\n", 1)[-1]
        assert prefix.startswith("Answer:" if name in ("vt", "cwe", "fwe", "qa") else "The special magic")
        assert metrics.score(sample.metric, prefix, sample.references) == 0.0


@pytest.mark.parametrize(("name", "length"), CASES)
def test_random_reader_scores_near_chance(tokenizer, generate, name: str, length: int) -> None:
    rng = np.random.default_rng(0)
    scores = []
    for sample in generate(name, length):
        words = sorted(set(re.findall(r"[\w-]+", _text(tokenizer, sample))))
        for _ in range(50):  # as many random words as the answer has, and two more
            guess = rng.choice(words, size=len(sample.references) + 2, replace=False)
            scores.append(metrics.score(sample.metric, " ".join(guess), sample.references))
    assert np.mean(scores) < 0.25, np.mean(scores)


@pytest.mark.parametrize("name", NIAH)
@pytest.mark.parametrize("length", [512, 2048])
def test_niah_needles_sit_where_meta_says(tokenizer, generate, name: str, length: int) -> None:
    for sample in generate(name, length):
        text = _text(tokenizer, sample)
        start = text.index("afterwards.\n") + len("afterwards.\n")
        end = text.rindex("\nWhat ")
        needles, units = sample.meta["needles"], sample.meta["haystack_units"]
        primary = next(n for n in needles if n["value"] == sample.references[0])
        assert primary["depth"] == pytest.approx(sample.depth, abs=0.5 / units + 1e-9)  # round(depth * units)
        for needle in needles:
            assert text.count(needle["text"]) == 1
            where = (text.index(needle["text"]) - start) / (end - start)
            assert 0 <= where < 1
            if units >= 20:  # in characters, a depth is only as fine as the units (prose sentences vary in length)
                assert abs(where - needle["depth"]) < (0.12 if sample.meta["haystack"] == "essay" else 0.05)
        assert set(sample.meta["queries"]) <= {n["key"] for n in needles}
        if sample.meta["haystack"] == "needle":  # distractor needles never repeat a planted key
            for key in sample.meta["queries"]:
                assert text.count(f" for {key} is:") == 1


def test_multi_needle_shapes(generate) -> None:
    for sample in generate("niah_multikey_1", 512):
        assert len(sample.meta["needles"]) == 4 and len(sample.references) == 1
        assert len({n["key"] for n in sample.meta["needles"]}) == 4
    for sample in generate("niah_multivalue", 512):
        assert len({n["key"] for n in sample.meta["needles"]}) == 1 and len(set(sample.references)) == 4
    for sample in generate("niah_multiquery", 512):
        assert len(sample.meta["queries"]) == 4 and len(set(sample.references)) == 4
    for sample in generate("niah_multikey_3", 512):
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", sample.meta["queries"][0])


@pytest.mark.parametrize("length", [1024, 2048])
def test_vt_chain_and_solved_example(tokenizer, generate, length: int) -> None:
    for sample in generate("vt", length):
        text = _text(tokenizer, sample)
        task = _after_last(text, "Memorize and track the chain(s)")
        names, value = sample.meta["variables"], sample.meta["value"]
        lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:], strict=False)]
        positions = [task.index(line + "\n") for line in lines]
        assert positions == sorted(positions) and sample.meta["depths"] == sorted(sample.meta["depths"])
        assert sample.depth is None and len(set(names)) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        example = sample.meta["example"]
        assert text.index(f"VAR {example['variables'][0]} = {example['value']}") < text.rindex("Memorize and track")
        assert f"they are: {' '.join(example['variables'])}\n" in text
        assert task.count(" = ") == 5


@pytest.mark.parametrize("length", [1024, 4096])
def test_cwe_counts(tokenizer, length: int) -> None:
    sample = ruler.TASKS["cwe"](tokenizer, length, 1)[0]
    text = _text(tokenizer, sample)
    listing = _after_last(text, "Memorize the ones that appear most often.\n").split("\nQuestion:")[0]
    entries = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = collections.Counter(word for _, word in entries)
    meta = sample.meta
    assert (meta["common_repeats"], meta["rare_repeats"]) == ((6, 1) if length < 4096 else (30, 3))
    assert {w: counts[w] for w in sample.references} == dict.fromkeys(sample.references, meta["common_repeats"])
    assert set(counts.values()) == {meta["common_repeats"], meta["rare_repeats"]}
    assert len(counts) == 10 + meta["rare_words"]
    assert not set(meta["example_common"]) & set(counts)  # the example's words are its own


def test_fwe_counts_follow_zipf(tokenizer, generate) -> None:
    for sample in generate("fwe", 2048):
        coded = _after_last(_text(tokenizer, sample), "coded words. ").split("\nQuestion:")[0].split()
        counts = collections.Counter(coded)
        vocab, expected = sample.meta["vocab"], sample.meta["counts"]
        assert [counts[w] for w in vocab] == expected and vocab[0] == "..."
        assert expected[0] > expected[1] > expected[2] > expected[3] >= max(expected[4:])
        assert list(sample.references) == vocab[1:4] and len(vocab) == 2048 // 50


def test_qa_planted_documents(tokenizer, generate) -> None:
    for sample in generate("qa", 2048):
        text = _text(tokenizer, sample)
        facts = sample.meta["facts"]
        for fact in facts:
            assert text.count(fact["text"]) == 1 and f"Document {fact['document']}:\n{fact['text']}\n" in text
        gold, others = facts[0], facts[1:]
        assert gold["answer"] == sample.references[0] and gold["answer"] in gold["text"]
        assert gold["entity"] in sample.meta["question"]
        assert all(gold["answer"] not in f["text"] and gold["entity"] not in f["text"] for f in others)
        # the gold document follows round(depth * units) prose documents
        before = gold["document"] - 1 - sum(f["document"] < gold["document"] for f in others)
        assert before == round(sample.depth * sample.meta["units"])
        assert f"Document {sample.meta['units'] + len(facts)}:" in text


@pytest.mark.parametrize("name", list(ruler.TASKS))
def test_seeds_reproduce(tokenizer, generate, name: str) -> None:
    length = LENGTHS[name][0]
    again = ruler.TASKS[name](tokenizer, length, NUM_SAMPLES, seed=0)
    assert [s.ids for s in again] == [s.ids for s in generate(name, length)]
    assert [s.to_dict() for s in again] == [s.to_dict() for s in generate(name, length)]
    other = generate(name, length, seed=1)
    assert all(a.ids != b.ids for a, b in zip(again, other, strict=True))
    assert len({s.references for s in again}) == NUM_SAMPLES  # trials differ too


@pytest.mark.parametrize("name", list(ruler.TASKS))
def test_length_below_the_minimum_raises(tokenizer, name: str) -> None:
    with pytest.raises(ValueError, match="below the minimum"):
        ruler.TASKS[name](tokenizer, 64, 1)


def test_depths_and_plain_prompts(tokenizer) -> None:
    for name in ("niah_single_2", "qa"):
        samples = ruler.TASKS[name](tokenizer, 512, 2, depths=[0.25])
        assert [s.depth for s in samples] == [0.25, 0.25]
    assert ruler.TASKS["fwe"](tokenizer, 512, 1, depths=[0.25])[0].depth is None
    with pytest.raises(ValueError, match="fractions in"):
        ruler.TASKS["niah_single_1"](tokenizer, 512, 1, depths=[1.5])
    plain = ruler.TASKS["niah_single_1"](tokenizer, 512, 1, chat=False)[0]
    text = tokenizer.decode(plain.ids, skip_special=False)
    assert "<|im_start|>" not in text and len(plain.ids) <= 512
    assert text.endswith(
        "\nThe special magic number for " + plain.meta["queries"][0] + " mentioned in the provided text is"
    )


def test_word_keys_are_distinct_pairs() -> None:
    words = ruler_words.english_words()
    assert len(words) > 2000 and list(words) == sorted(set(words))
    total = len(words) * (len(words) - 1)
    keys = [ruler_words.word_key(i, words) for i in [*range(5000), *range(total - 5000, total)]]
    assert len(set(keys)) == len(keys) and all(a != b for a, b in (k.split("-") for k in keys))


def test_effective_length() -> None:
    assert ruler.effective_length({4096: 0.95, 8192: 0.9, 16384: 0.8, 32768: 0.9}) == 8192  # stops at the first miss
    assert ruler.effective_length({8192: 0.9, 4096: 0.95}) == 8192  # order of the dict does not matter
    assert ruler.effective_length({4096: 0.5, 8192: 0.95}) is None
    assert ruler.effective_length({}) is None
    assert ruler.effective_length({4096: 0.856}) is None  # "above" the threshold, as RULER
    assert ruler.effective_length({4096: 0.6, 8192: 0.55}, threshold=0.5) == 8192
    with pytest.raises(ValueError, match="fractions"):
        ruler.effective_length({4096: 85.6})
