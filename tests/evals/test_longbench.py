"""LongBench / InfiniteBench from JSONL: loading, malformed lines, middle truncation, templates, official metrics."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.evals import longbench as lb
from lcm.evals import metrics
from lcm.io.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "longbench_mini.jsonl"
FIXTURE_TASKS = ["hotpotqa", "trec", "triviaqa", "passage_count", "passage_retrieval_en", "lcc", "gov_report"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def _write_jsonl(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return path


def _record(**fields: Any) -> dict[str, Any]:
    return {"context": "Some context.", "input": "A question?", "answers": ["an answer"], **fields}


# ----------------------------------------------------------------------------------------------------
# Records


def test_load_fixture() -> None:
    records, skipped = lb.load_jsonl(FIXTURE)
    assert skipped == 0
    assert [r.task for r in records] == FIXTURE_TASKS
    assert [r.line for r in records] == list(range(1, 8))
    assert records[0].meta["id"] == "hq-0" and records[0].answers == ("Paris",)
    assert records[1].meta["all_classes"][0] == "City" and "all_classes" not in records[0].meta  # null is dropped
    assert records[2].answers == ("Leonardo da Vinci", "da Vinci")
    assert records[3].meta["source_length"] == 26  # LongBench's word count, kept apart from Sample.length


def test_malformed_lines_are_reported_with_their_line_numbers_and_skipped(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "hotpotqa.jsonl",
        [
            _record(),
            '{"context": "cut short", "input": ',  # 2: bad JSON
            {"context": "x", "input": "q"},  # 3: no answers
            _record(answers=[1.5]),  # 4: wrong type
            "",  # 5: blank, skipped silently
            "[1, 2]",  # 6: not an object
            _record(context=7),  # 7: wrong type
            _record(input="last"),
        ],
    )
    with pytest.warns(UserWarning) as caught:
        records, skipped = lb.load_jsonl(path)
    messages = [str(w.message) for w in caught]
    assert skipped == 5 and len(messages) == 5
    assert [r.line for r in records] == [1, 8] and records[1].input == "last"
    expected = {2: "bad JSON", 3: "no answer field", 4: "answers must be strings", 6: "not an object", 7: "'context'"}
    for line, reason in expected.items():
        assert any(m.startswith(f"{path}:{line}: skipped: ") and reason in m for m in messages), (line, messages)


def test_task_is_the_dataset_field_else_the_argument_else_the_file_stem(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "qasper.jsonl", [_record(dataset="musique"), _record()])
    assert [r.task for r in lb.load_jsonl(path)[0]] == ["musique", "qasper"]
    assert [r.task for r in lb.load_jsonl(path, task="narrativeqa")[0]] == ["musique", "narrativeqa"]


def test_infinitebench_fields(tokenizer, tmp_path: Path) -> None:
    lines = [
        {"id": 0, "context": '{"k1": "v1", "k2": "v2"}', "input": 'Key: "k2"\nThe value of "k2" is:', "answer": "v2"},
        {"id": 1, "context": "{}", "input": "?", "answer": ["v3", "v4"], "options": []},
    ]
    records, skipped = lb.load_jsonl(_write_jsonl(tmp_path / "kv_retrieval.jsonl", lines))
    assert skipped == 0 and [r.task for r in records] == ["kv_retrieval"] * 2
    assert records[0].answers == ("v2",) and records[1].answers == ("v3", "v4")
    assert records[0].meta["id"] == 0 and records[1].meta["options"] == []
    samples, _ = lb.build_samples(tokenizer, tmp_path / "kv_retrieval.jsonl", 256)
    assert samples[0].metric == "word_match" and samples[0].max_new_tokens == 50 and not samples[0].meta["chat"]
    assert lb.score_sample(samples[0], 'The value of "k2" is: "v2".') == 1.0


# ----------------------------------------------------------------------------------------------------
# Prompts


def test_truncate_middle_keeps_half_from_each_end() -> None:
    assert lb.truncate_middle(range(10), 4) == [0, 1, 8, 9]
    assert lb.truncate_middle(range(10), 5) == [0, 1, 8, 9]  # pred.py's int(max_length / 2) on each side
    assert lb.truncate_middle(range(3), 5) == [0, 1, 2]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("max_length", [160, 257])
def test_long_prompt_is_cut_from_the_middle(tokenizer, tmp_path: Path, chat: bool, max_length: int) -> None:
    context = "\n".join(f"Fact {i:03d}: the number {i} is recorded here." for i in range(300))
    path = _write_jsonl(tmp_path / "x.jsonl", [_record(dataset="hotpotqa", context=context, input="What is fact 7?")])
    (sample,), _ = lb.build_samples(tokenizer, path, max_length, chat=chat)
    prompt = lb.load_templates().tasks["hotpotqa"].prompt.format(context=context, input="What is fact 7?")
    full = lb.encode_prompt(tokenizer, prompt, chat)
    assert len(full) > 10 * max_length
    # the seam is re-encoded, so a token or two may differ there; the budget is max_length less the wrapper
    assert max_length - 3 <= len(sample.ids) <= max_length and sample.length == max_length
    assert sample.meta["cut_tokens"] >= len(full) - max_length
    keep = max_length // 2 - 40  # clear of the seam (and of the chat wrapper, ~30 tokens, on the tail side)
    assert list(sample.ids[:keep]) == full[:keep] and list(sample.ids[-keep:]) == full[-keep:]
    text = tokenizer.decode(sample.ids)
    assert "Answer the question based on the given passages" in text and "Fact 000" in text
    assert "Fact 150" not in text and "Question: What is fact 7?\nAnswer:" in text
    assert ("<|im_start|>" in tokenizer.decode(sample.ids, skip_special=False)) == chat


def test_a_length_below_the_wrapper_is_an_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="max_length=20 is below the minimum of task 'hotpotqa'"):
        lb.build_samples(tokenizer, FIXTURE, 20, limit=1)


def test_templates_and_chat_per_task(tokenizer) -> None:
    samples, skipped = lb.build_samples(tokenizer, FIXTURE, 1024)
    by_task = {s.task: s for s in samples}
    assert skipped == 0 and list(by_task) == FIXTURE_TASKS and [s.index for s in samples] == list(range(7))
    expected = {  # (metric, max_new_tokens, chat) from dataset2metric, dataset2maxlen and pred.py's no-chat list
        "hotpotqa": ("qa_f1", 32, True),
        "trec": ("classification", 64, False),
        "triviaqa": ("qa_f1", 32, False),
        "passage_count": ("count", 32, True),
        "passage_retrieval_en": ("retrieval", 32, True),
        "lcc": ("code_sim", 64, False),
        "gov_report": ("rouge_l", 512, True),
    }
    for task, (metric, max_new_tokens, chat) in expected.items():
        sample = by_task[task]
        assert (sample.metric, sample.max_new_tokens, sample.meta["chat"]) == (metric, max_new_tokens, chat), task
        assert ("<|im_start|>user" in tokenizer.decode(sample.ids, skip_special=False)) == chat, task
        assert sample.meta["cut_tokens"] == 0 and sample.length == 1024
    records = {r.task: r for r in lb.load_jsonl(FIXTURE)[0]}
    trec = lb.load_templates().tasks["trec"].prompt.format(context=records["trec"].context, input=records["trec"].input)
    assert tokenizer.decode(by_task["trec"].ids) == trec
    assert tokenizer.decode(by_task["lcc"].ids).endswith("Next line of code:\n")  # the trailing newline is kept
    assert by_task["trec"].meta["all_classes"] == records["trec"].meta["all_classes"]
    no_chat, _ = lb.build_samples(tokenizer, FIXTURE, 1024, chat=False, limit=2)
    assert len(no_chat) == 2 and all("<|im_start|>" not in tokenizer.decode(s.ids, skip_special=False) for s in no_chat)


def test_template_file_mirrors_longbench_configs() -> None:
    templates = lb.load_templates()
    longbench = {name for name, t in templates.tasks.items() if t.source == "LongBench"}
    assert len(longbench) == 18 and {"multifieldqa_zh", "dureader", "vcsum"} <= set(templates.unsupported)
    assert {n for n in longbench if not templates.tasks[n].chat} == {
        "trec",
        "triviaqa",
        "samsum",
        "lsht",
        "lcc",
        "repobench-p",
    }
    assert {n for n, t in templates.tasks.items() if t.first_line} == {"trec", "triviaqa", "samsum", "lsht"}
    assert all(t.metric in metrics.METRICS for t in templates.tasks.values())


def test_unknown_task_uses_the_generic_template_unless_a_template_file_names_it(tokenizer, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "my_qa.jsonl", [_record()])
    with pytest.warns(UserWarning, match="task 'my_qa' has no template .* generic prompt and metric 'qa_f1'"):
        (sample,), _ = lb.build_samples(tokenizer, path, 512)
    assert (sample.metric, sample.max_new_tokens) == ("qa_f1", 64)
    entry = {"prompt": "Doc: {context}\nQ: {input}\nA:", "max_new_tokens": 7, "metric": "exact_match", "chat": False}
    template_file = tmp_path / "mine.json"
    template_file.write_text(json.dumps({"tasks": {"my_qa": entry}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (sample,), _ = lb.build_samples(tokenizer, path, 512, template_file=template_file)
    assert (sample.metric, sample.max_new_tokens) == ("exact_match", 7)
    assert tokenizer.decode(sample.ids) == "Doc: Some context.\nQ: A question?\nA:"
    template_file.write_text(json.dumps({"tasks": {"my_qa": {**entry, "metric": "bleu"}}}))
    with pytest.raises(ValueError, match="unknown metric 'bleu'; choose one of"):
        lb.build_samples(tokenizer, path, 512, template_file=template_file)


def test_unsupported_and_longbench_e_tasks(tokenizer, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "zh.jsonl", [_record(dataset="hotpotqa"), _record(dataset="dureader")])
    with pytest.raises(ValueError, match=r"task 'dureader' is not supported: .*jieba.*; choose one of \[.*'hotpotqa'"):
        lb.build_samples(tokenizer, path, 512)
    path = _write_jsonl(tmp_path / "e.jsonl", [_record(dataset="hotpotqa_e")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (sample,), _ = lb.build_samples(tokenizer, path, 512)
    assert (sample.task, sample.metric, sample.max_new_tokens) == ("hotpotqa_e", "qa_f1", 32)


# ----------------------------------------------------------------------------------------------------
# Metrics


def test_qa_f1_by_hand() -> None:
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: 2 in common, P = 2/2, R = 2/3, F1 = 0.8
    assert metrics.qa_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert metrics.qa_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)  # a bag: P = 1/2, R = 1
    assert metrics.qa_f1("The Cat, sat!", ["cat sat"]) == 1.0 and metrics.qa_f1("dog", ["cat"]) == 0.0
    assert metrics.qa_f1("da Vinci", ["Leonardo da Vinci", "da Vinci"]) == 1.0  # the max over references
    assert metrics.normalize_answer("The  Eiffel-Tower, a landmark.") == "eiffeltower landmark"
    assert metrics.exact_match("The Cat.", ["a cat"]) == 1.0 and metrics.exact_match("cat sat", ["cat"]) == 0.0


def test_rouge_by_hand() -> None:
    # tokens [the cat sat on the mat] / [the cat lay on a mat]: LCS [the cat on mat] = 4, P = R = 4/6, F = 2/3
    assert metrics.rouge_l("the cat sat on the mat", ["the cat lay on a mat"]) == pytest.approx(2 / 3)
    # LCS [cat sat] = 2: P = 1, R = 2/6, F = 2PR / (P + R) = 0.5; case and punctuation do not count
    assert metrics.rouge_l("Cat, sat.", ["the cat sat on the mat"]) == pytest.approx(0.5)
    assert metrics.rouge_l("", ["the cat"]) == 0.0
    # whole-text LCS of [a b c d] and [c d a b] is 2 (F = 0.5); per newline-split sentence every reference word is
    # matched (union LCS 4 of 4), so ROUGE-Lsum is 1
    assert metrics.rouge_l("a b\nc d", ["c d\na b"]) == pytest.approx(0.5)
    assert metrics.rouge_lsum("a b\nc d", ["c d\na b"]) == pytest.approx(1.0)


def test_classification_by_hand() -> None:
    classes = ["city", "other city", "Animal", "Food"]
    assert metrics.classification("Animal or Food", ["Animal"], all_classes=classes) == 0.5  # two named, one right
    assert metrics.classification("other city", ["other city"], all_classes=classes) == 1.0  # "city" is in the truth
    assert metrics.classification("other city", ["city"], all_classes=classes) == 0.5  # "other city" is not in "city"
    assert metrics.classification("Food", ["Animal"], all_classes=classes) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        metrics.score("classification", "Food", ["Food"])


def test_retrieval_and_count_by_hand() -> None:
    assert metrics.retrieval("Paragraph 2", ["Paragraph 2"]) == 1.0
    assert metrics.retrieval("Paragraph 2 or Paragraph 12", ["Paragraph 2"]) == 0.5  # the share of numbers that match
    assert metrics.retrieval("I do not know", ["Paragraph 2"]) == 0.0
    assert metrics.retrieval_zh("段落3", ["段落3"]) == 1.0
    with pytest.raises(ValueError, match="names no paragraph"):
        metrics.retrieval("2", ["2"])
    assert metrics.count("3", ["3"]) == 1.0 and metrics.count("three", ["3"]) == 0.0
    assert metrics.count("There are 3 unique paragraphs out of 4", ["3"]) == 0.5


def test_code_sim_first_line_rule() -> None:
    output = "\n```python\n# add the two\n    return a + b\nprint(add(1, 2))"
    assert metrics.code_sim(output, ["    return a + b"]) == 1.0  # the first line without ` # // is scored
    # "x = foo(2)" vs "x = foo(1)": InDel distance 2 over 20 characters, 90%
    assert metrics.code_sim("x = foo(2)", ["x = foo(1)"]) == pytest.approx(0.9)
    assert metrics.code_sim("abc", ["abd"]) == pytest.approx(0.67)  # 2 * 2 / 6 = 66.7%, rounded as fuzzywuzzy does
    assert metrics.code_sim("# only comments\n// more", ["x = 1"]) == 0.0


def test_infinitebench_metrics() -> None:
    assert metrics.first_digits("The pass key is 71432.", ["71432"]) == 1.0
    assert metrics.first_digits("0123", ["123"]) == 0.0  # a string compare
    assert metrics.word_match('The value of "k" is: "c14cb8ba-002b".', ["c14cb8ba-002b"]) == 1.0
    assert metrics.word_match("c14cb8ba-002bX", ["c14cb8ba-002b"]) == 0.0
    assert metrics.name_match("It is likely ace.", ["ACE", "ACE ROTHSTEIN"]) == 1.0


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=40), st.lists(st.text(max_size=20), min_size=1, max_size=3))
def test_metrics_stay_in_the_unit_interval(output: str, references: list[str]) -> None:
    for name in ("qa_f1", "exact_match", "rouge_l", "count", "code_sim", "first_digits", "word_match", "name_match"):
        assert 0.0 <= metrics.score(name, output, references) <= 1.0, name


# ----------------------------------------------------------------------------------------------------
# Scoring samples


def test_postprocess_takes_the_first_line_for_the_few_shot_tasks() -> None:
    assert lb.postprocess("trec", "\n\nCity\nQuestion: Where?\nType: Country") == "City"
    assert lb.postprocess("hotpotqa", "Paris\nmore") == "Paris\nmore"


def test_oracle_outputs_score_one(tokenizer) -> None:
    samples, _ = lb.build_samples(tokenizer, FIXTURE, 1024)
    assert [lb.score_sample(s, s.references[0]) for s in samples] == [1.0] * len(samples)
    trec = next(s for s in samples if s.task == "trec")
    run_on = "City\nQuestion: Who wrote Hamlet?\nType: Individual"
    assert lb.score_sample(trec, run_on) == 1.0  # the first line only, as eval.py scores trec
    assert metrics.classification(run_on, trec.references, all_classes=trec.meta["all_classes"]) == 0.5
