"""LongBench and InfiniteBench from their JSONL files: records, prompts cut from the middle, the official metrics.

LongBench (Bai et al. 2023, "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding",
arXiv 2308.14508; official code THUDM/LongBench, ``LongBench/pred.py``, ``eval.py``, ``metrics.py`` and
``config/dataset2prompt.json`` / ``dataset2maxlen.json``) and InfiniteBench (Zhang et al. 2024, arXiv 2402.13718;
OpenBMB/InfiniteBench ``src/eval_utils.py``, ``src/compute_scores.py``) ship their tasks as JSONL files, one record a
line. This module turns such a file into :class:`lcm.evals.tasks.Sample` s and scores outputs as the official code
does::

    samples, skipped = build_samples(tokenizer, "LongBench/data/hotpotqa.jsonl", max_length=8192)
    score = score_sample(samples[0], output)  # in [0, 1]; the report multiplies by 100 as eval.py does

Records. A LongBench record has ``context``, ``input``, ``answers`` (a list), ``dataset``, ``all_classes`` and
``_id``; an InfiniteBench record has ``context``, ``input``, ``answer`` (a string or a list), ``options`` and ``id``
(:data:`META_FIELDS` says what goes to ``sample.meta``). The task is the record's ``dataset``, else the ``task``
argument, else the file's stem (InfiniteBench names its files after the tasks).

Prompts (pred.py): ``template.format(context=..., input=...)``; a prompt longer than ``max_length`` tokens keeps its
first and last ``max_length // 2`` tokens, decoded and joined (the whole prompt is cut, instruction and question
included, as pred.py does: both ends hold instructions, the middle is context). The prompt is one user turn of the
tokenizer's chat template except for the tasks with ``"chat": false`` in the template file (LongBench's trec,
triviaqa, samsum, lsht, lcc, repobench-p, whose few-shot prompts are completions; and the InfiniteBench tasks, whose
templates for open models end in an answer prefix). Templates, generation lengths and metrics per task live in
``templates/longbench.json``; a task not named there gets its ``generic`` template and ``qa_f1``, with a warning, unless
a ``template_file`` passed in names it (that file is merged over the default one).

Scoring (eval.py): :func:`score_sample` applies the first-line rule of trec, triviaqa, samsum and lsht
(:func:`postprocess`), then the task's metric from :data:`lcm.evals.metrics.METRICS`, max over the references; the
classification metric gets the record's ``all_classes`` from ``sample.meta`` (:data:`METRIC_META_ARGS`), which
``metrics.score`` cannot pass, so score these samples with :func:`score_sample`.

Deviations from the official code:
- the cut makes the *rendered* prompt, chat template included, fit ``max_length`` (``len(sample.ids) <= length``
  as every Sample promises); pred.py cuts the bare prompt to ``max_length`` and then adds the chat wrapper. Leave room
  for ``max_new_tokens`` in the model's context as pred.py's model2maxlen does (e.g. 3500 for a 4k model).
- the chat wrapper is the tokenizer's own template, where pred.py has one hand-written wrapper per model.
- a prompt's trailing whitespace is kept (pred.py tokenizes it as is), so ``tasks.render`` is not used without chat.
- samsum: pred.py also stops generation at a newline; the first-line rule scores the same text without it.
- the Chinese tasks whose metric needs jieba word segmentation (multifieldqa_zh, dureader, vcsum) and the
  InfiniteBench tasks with bespoke prompts or scoring are refused with a one-line error (the template file's
  ``unsupported``); lsht and passage_retrieval_zh need no segmentation and are supported.
- LongBench-E: a task ``X_e`` not in the template file uses ``X``'s template.
- ROUGE-L, code similarity, classification and InfiniteBench's name match: see their docstrings in metrics.py.
- blank lines are skipped silently (InfiniteBench's reader does the same); numeric answers are read as their text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lcm.evals.metrics import METRICS
from lcm.evals.tasks import Sample, question_start, render

DEFAULT_TEMPLATE_FILE = Path(__file__).parent / "templates" / "longbench.json"

ANSWER_FIELDS = ("answers", "answer")  # LongBench, InfiniteBench
# record field -> sample.meta key (LongBench's "length" is its word count, not ours)
META_FIELDS = {
    "_id": "id",
    "id": "id",
    "all_classes": "all_classes",
    "options": "options",
    "language": "language",
    "length": "source_length",
}
# metric -> the sample.meta keys it takes as keyword arguments
METRIC_META_ARGS: dict[str, tuple[str, ...]] = {"classification": ("all_classes",)}
_TEMPLATE_KEYS = {"prompt", "max_new_tokens", "metric", "chat", "first_line", "source"}


@dataclasses.dataclass(frozen=True)
class Record:
    task: str  # LongBench's "dataset", else the name given or the file stem
    context: str  # the long document(s)
    input: str  # the question or instruction ("" for some tasks)
    answers: tuple[str, ...]  # the references
    line: int  # 1-based line number in the file
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # META_FIELDS found in the record


@dataclasses.dataclass(frozen=True)
class TaskTemplate:
    prompt: str  # str.format template with {context} and {input}
    max_new_tokens: int  # generation budget (LongBench's dataset2maxlen)
    metric: str  # a name in lcm.evals.metrics.METRICS
    chat: bool = True  # wrap in the chat template (when the caller asks for chat)
    first_line: bool = False  # score the first non-empty line of the output only
    source: str = ""  # where the template comes from


@dataclasses.dataclass(frozen=True)
class Templates:
    tasks: Mapping[str, TaskTemplate]  # per task
    generic: TaskTemplate  # for tasks neither in `tasks` nor in `unsupported`
    unsupported: Mapping[str, str]  # task -> why it is refused
    files: tuple[str, ...]  # the files these came from, for messages


# ----------------------------------------------------------------------------------------------------
# Records


def _answers(value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str | int) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"answers must be a string or a non-empty list, got {type(value).__name__}")
    bad = [v for v in values if not isinstance(v, str | int) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"answers must be strings, got {bad[0]!r}")
    return tuple(str(v) for v in values)


def _parse_record(raw: bytes, line: int, default_task: str) -> Record:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"bad JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    for field in ("context", "input"):
        if not isinstance(obj.get(field), str):
            got = "missing" if field not in obj else type(obj[field]).__name__
            raise ValueError(f"field {field!r} must be a string, got {got}")
    answer_field = next((field for field in ANSWER_FIELDS if field in obj), None)
    if answer_field is None:
        raise ValueError(f"no answer field; expected one of {list(ANSWER_FIELDS)}")
    task = obj.get("dataset") or default_task
    if not isinstance(task, str):
        raise ValueError(f"field 'dataset' must be a string, got {type(task).__name__}")
    classes = obj.get("all_classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"field 'all_classes' must be null or a list of strings, got {classes!r:.80}")
    meta = {key: obj[field] for field, key in META_FIELDS.items() if obj.get(field) is not None}
    return Record(task, obj["context"], obj["input"], _answers(obj[answer_field]), line, meta)


def load_jsonl(path: str | os.PathLike[str], task: str | None = None) -> tuple[list[Record], int]:
    """The records of a LongBench / InfiniteBench JSONL file, and how many lines were skipped.

    A malformed line (bad JSON, a missing field, a wrong type) is skipped with a warning naming the file and the
    line number, so one bad line does not lose a run; the caller reports the count ("N lines skipped").
    """
    path = Path(path)
    default_task = task or path.stem
    records, skipped = [], 0
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                records.append(_parse_record(raw, line, default_task))
            except ValueError as err:
                skipped += 1
                warnings.warn(f"{path}:{line}: skipped: {err}", stacklevel=2)
    return records, skipped


# ----------------------------------------------------------------------------------------------------
# Templates


def _task_template(entry: Any, where: str) -> TaskTemplate:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with {sorted(_TEMPLATE_KEYS)}, got {type(entry).__name__}")
    unknown, missing = set(entry) - _TEMPLATE_KEYS, {"prompt", "max_new_tokens", "metric"} - set(entry)
    if unknown or missing:
        raise ValueError(f"{where}: keys {sorted(unknown)} unknown, {sorted(missing)} missing; see {_TEMPLATE_KEYS}")
    template = TaskTemplate(**entry)
    if not isinstance(template.prompt, str) or "{context}" not in template.prompt:
        raise ValueError(f"{where}: prompt must be a string holding {{context}}, got {template.prompt!r:.80}")
    if not isinstance(template.max_new_tokens, int) or template.max_new_tokens <= 0:
        raise ValueError(f"{where}: max_new_tokens must be a positive integer, got {template.max_new_tokens!r}")
    if template.metric not in METRICS:
        raise ValueError(f"{where}: unknown metric {template.metric!r}; choose one of {sorted(METRICS)}")
    if not isinstance(template.chat, bool) or not isinstance(template.first_line, bool):
        raise ValueError(f"{where}: chat and first_line must be true or false")
    return template


@functools.cache
def _read_template_file(
    path: str, mtime_ns: int
) -> tuple[dict[str, TaskTemplate], TaskTemplate | None, dict[str, str]]:
    del mtime_ns  # part of the cache key only: an edited file is read again
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("tasks", {}), dict):
        raise ValueError(f"{path}: expected an object with 'tasks' (task -> template), 'generic', 'unsupported'")
    tasks = {name: _task_template(entry, f"{path}: task {name!r}") for name, entry in data.get("tasks", {}).items()}
    generic = _task_template(data["generic"], f"{path}: generic") if "generic" in data else None
    return tasks, generic, dict(data.get("unsupported", {}))


def load_templates(template_file: str | os.PathLike[str] | None = None) -> Templates:
    """The default templates, with ``template_file``'s tasks (and generic template) merged over them."""
    files = [str(DEFAULT_TEMPLATE_FILE)] + ([str(Path(template_file).resolve())] if template_file else [])
    tasks: dict[str, TaskTemplate] = {}
    unsupported: dict[str, str] = {}
    generic = None
    for file in files:
        file_tasks, file_generic, file_unsupported = _read_template_file(file, Path(file).stat().st_mtime_ns)
        unsupported = {name: why for name, why in unsupported.items() if name not in file_tasks} | file_unsupported
        tasks.update(file_tasks)
        generic = file_generic or generic
    if generic is None:
        raise ValueError(f"{files[0]}: no 'generic' template")
    return Templates(tasks, generic, unsupported, tuple(files))


def _template_name(task: str, templates: Templates) -> str | None:
    """The template file's name for ``task`` (LongBench-E's ``X_e`` is ``X``), None if it names none."""
    known = templates.tasks.keys() | templates.unsupported.keys()
    if task in known:
        return task
    if task.endswith("_e") and task[:-2] in known:
        return task[:-2]
    return None


def template_for(task: str, templates: Templates) -> TaskTemplate:
    """``task``'s template; the generic one for a task the files do not name; an error for an unsupported one."""
    name = _template_name(task, templates)
    if name in templates.unsupported:
        raise ValueError(
            f"task {task!r} is not supported: {templates.unsupported[name]}; choose one of {sorted(templates.tasks)} "
            "or give it a template file entry"
        )
    return templates.tasks[name] if name is not None else templates.generic


# ----------------------------------------------------------------------------------------------------
# Prompts


def truncate_middle(ids: Sequence[int], max_tokens: int) -> list[int]:
    """pred.py's cut: ids longer than ``max_tokens`` keep their first and last ``max_tokens // 2``."""
    if len(ids) <= max_tokens:
        return list(ids)
    half = max_tokens // 2
    return [*ids[:half], *ids[len(ids) - half :]]


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """``prompt`` as one user turn of the chat template when ``chat`` (and the tokenizer has one), else as is."""
    if chat and getattr(tokenizer, "chat_template", None):
        return render(tokenizer, prompt, "", chat=True)
    return tokenizer.encode(prompt)


def fit_prompt(tokenizer: Any, prompt: str, max_length: int, chat: bool, task: str) -> tuple[list[int], int]:
    """The rendered prompt's ids, cut from the middle until they fit ``max_length``, and how many tokens were cut.

    The cut is pred.py's (:func:`truncate_middle` of the prompt's tokens, each half decoded, the texts joined); the
    budget is what the chat wrapper leaves, shrunk again if re-encoding at the seam comes out longer.
    """
    ids = encode_prompt(tokenizer, prompt, chat)
    if len(ids) <= max_length:
        return ids, 0
    prompt_ids = tokenizer.encode(prompt, add_special=False)
    budget = max_length - (len(ids) - len(prompt_ids))
    for _ in range(8):  # the seam rarely re-encodes longer, and then by a token or two
        if budget < 2:
            break
        kept = truncate_middle(prompt_ids, budget)
        half = len(kept) // 2
        text = tokenizer.decode(kept[:half]) + tokenizer.decode(kept[half:])
        ids = encode_prompt(tokenizer, text, chat)
        if len(ids) <= max_length:
            return ids, len(prompt_ids) - len(kept)
        budget -= len(ids) - max_length
    raise ValueError(
        f"max_length={max_length} is below the minimum of task {task!r}: its prompt wrapper alone fills it"
    )


def build_samples(
    tokenizer: Any,
    path: str | os.PathLike[str],
    max_length: int,
    chat: bool = True,
    template_file: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    task: str | None = None,
) -> tuple[list[Sample], int]:
    """Samples of the first ``limit`` records of a JSONL file, each prompt cut to ``max_length`` tokens.

    ``sample.length`` is ``max_length``; ``references`` are the record's answers; ``metric`` and ``max_new_tokens``
    come from the task's template, and ``sample.meta`` holds the file and line, the record's id (and
    ``all_classes``/``options``), whether chat was used, ``first_line``, the rendered prompt's length and how many
    tokens the cut removed. A task the template files do not name gets the generic template and its metric
    (``qa_f1``) with a warning; an unsupported one (LongBench's jieba-scored Chinese tasks, ...) is an error before
    anything is tokenized.
    Returns the samples and the number of malformed lines skipped.
    """
    if max_length <= 0:
        raise ValueError(f"max_length={max_length} must be a positive number of tokens")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be None or a non-negative number of records")
    records, skipped = load_jsonl(path, task)
    records = records[:limit]
    templates = load_templates(template_file)
    chosen = {record.task: template_for(record.task, templates) for record in records}
    for name in sorted(chosen):
        if _template_name(name, templates) is None:
            warnings.warn(
                f"{path}: task {name!r} has no template in {list(templates.files)}; using the generic prompt and "
                f"metric {templates.generic.metric!r}",
                stacklevel=2,
            )
    samples = []
    for index, record in enumerate(records):
        template = chosen[record.task]
        try:
            prompt = template.prompt.format(context=record.context, input=record.input)
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"task {record.task!r}: template placeholder {err} is neither {{context}} nor {{input}}"
            ) from None
        use_chat = chat and template.chat
        ids, cut = fit_prompt(tokenizer, prompt, max_length, use_chat, record.task)
        meta = {
            "file": str(path),
            "line": record.line,
            **record.meta,
            "chat": use_chat,
            "first_line": template.first_line,
            "prompt_tokens": len(ids),
            "cut_tokens": cut,
        }
        # the question: the template's text after the context (its instruction and the record's input)
        after = template.prompt.split("{context}", 1)[1] if "{context}" in template.prompt else ""
        anchor = after.replace("{input}", record.input).strip()
        samples.append(
            Sample(
                task=record.task,
                length=max_length,
                index=index,
                ids=tuple(ids),
                references=record.answers,
                metric=template.metric,
                max_new_tokens=template.max_new_tokens,
                meta=meta,
                question_start=question_start(tokenizer, ids, anchor),
            )
        )
    return samples, skipped


# ----------------------------------------------------------------------------------------------------
# Scoring


def first_line(output: str) -> str:
    """eval.py's rule: the output's first line after leading newlines."""
    return output.lstrip("\n").split("\n")[0]


def postprocess(task: str, output: str, template_file: str | os.PathLike[str] | None = None) -> str:
    """``output`` as eval.py scores it for ``task``: the first line for trec, triviaqa, samsum, lsht, else as is."""
    return first_line(output) if template_for(task, load_templates(template_file)).first_line else output


def score_sample(sample: Sample, output: str) -> float:
    """``sample``'s metric of ``output`` (the continuation only) in [0, 1], with eval.py's first-line rule and the
    metric's extra arguments (:data:`METRIC_META_ARGS`) taken from ``sample.meta``."""
    if sample.metric not in METRICS:
        raise ValueError(f"unknown metric {sample.metric!r}; choose one of {sorted(METRICS)}")
    text = first_line(output) if sample.meta.get("first_line") else output
    extra = {key: sample.meta.get(key) for key in METRIC_META_ARGS.get(sample.metric, ())}
    return METRICS[sample.metric](text, sample.references, **extra)
