"""The grid runner: every (RoPE variant x KV policy x budget) x task x length, resumable, with tables and plots.

``run_grid(spec)`` loads the model once, builds every prompt first (so a bad task or a length below a task's
minimum fails before any compute), then runs the cells in order and appends one JSON line per sample to
``OUT/results.jsonl`` as soon as its batch finishes. Run it again with the same ``OUT`` and every sample already
there is skipped: an interrupted sweep resumes where it stopped, and adding a length or a task runs only what is
new. :func:`lcm.evals.report.report` turns the JSONL into ``results.md`` (one table per task, mean score x 100, the
RULER average with its effective length, a cost table) and heatmaps, a budget plot and a summary plot.

Samples of one cell are batched ``batch_size`` at a time through one jitted prefill and decode
(:meth:`lcm.generate.Engine.generate_many`); a padded row computes what it computes alone (tested).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lcm.evals import longbench
from lcm.evals.tasks import Sample

FILE_PREFIX = "file:"
RESULTS = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class GridSpec:
    model: str = "smollm2"  # registered name, GGUF file or HF folder
    tasks: tuple[str, ...] = ("niah_single_1",)  # registered task names, or file:PATH.jsonl (LongBench format)
    lengths: tuple[int, ...] = (1024,)  # prompt lengths in tokens (for file tasks: the truncation length)
    ropes: tuple[str, ...] = ("none",)  # RoPE specs: none | VARIANT[:k=v,...]
    policies: tuple[str, ...] = ("full",)  # KV-cache policies: NAME[:k=v,...] (lcm.cache.policies.POLICIES)
    budgets: tuple[int, ...] = (0,)  # KV budgets in tokens; 0 = unbounded (only valid for `full`)
    # kvpress's compression ratios r: a policy keeps int(n * (1 - r)) of the n tokens it compresses (per prompt)
    compression_ratios: tuple[float, ...] = ()
    # the question appended after compression, uncompressed (kvpress's query-agnostic setting); False: the
    # question is compressed with the context (SnapKV's setting)
    question_apart: bool = False
    num_samples: int = 5  # samples per (task, length); file tasks: at most this many records (0 = all)
    seed: int = 0  # sample seed
    depths: tuple[float, ...] | None = None  # needle depths cycled over samples; None = evenly spaced
    batch_size: int = 1  # samples per prefill/decode batch
    chat: bool = True  # chat template for instruct models
    chunk_size: int = 512  # prefill chunk in tokens
    dtype: str = "float32"  # float32 | bfloat16
    out_dir: str = "out/eval_grid"  # results.jsonl, results.md and plots

    def __post_init__(self) -> None:
        from lcm.cache.policies import POLICIES, parse_policy
        from lcm.evals.registry import get_task
        from lcm.evals.suite import parse_model_rope
        from lcm.ops.position_schemes import is_position_scheme

        for task in self.tasks:
            if task.startswith(FILE_PREFIX):
                if not Path(task[len(FILE_PREFIX) :]).is_file():
                    raise FileNotFoundError(f"task {task!r}: no such JSONL file")
            else:
                get_task(task)
        if not self.tasks or not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"need tasks and positive lengths, got tasks={self.tasks} lengths={self.lengths}")
        for rope in self.ropes:
            if rope not in ("none", "default", ""):
                parse_model_rope(rope)
        for policy in self.policies:
            if policy.partition(":")[0] not in POLICIES:
                raise ValueError(f"unknown KV policy {policy!r}; choose one of {sorted(POLICIES)}")
        if any(b < 0 for b in self.budgets) or not self.budgets:
            raise ValueError(f"budgets must be non-negative token counts, got {self.budgets}")
        bad = [r for r in self.compression_ratios if not 0.0 < r < 1.0]
        if bad:
            raise ValueError(f"compression ratios must lie strictly between 0 and 1, got {list(bad)}")
        bounded = any(b > 0 for b in self.budgets) or bool(self.compression_ratios)
        if bounded and set(self.policies) == {"full"}:
            raise ValueError(
                f"budgets {self.budgets} and compression ratios {self.compression_ratios} need a KV policy other "
                "than `full` (budget 0 = full cache)"
            )
        if any(not p.startswith("full") for p in self.policies) and not bounded:
            raise ValueError(
                f"policies {self.policies} need a positive budget in tokens (--budget) or a compression ratio"
            )
        for method in self.methods():
            if method.ratio is None:  # a ratio's budget depends on the prompt: checked once the prompts are built
                policy = parse_policy(method.policy, method.budget)  # unknown names, bad parameters, small budgets
                if is_position_scheme(method.rope):
                    policy.check_position_scheme(method.rope.partition(":")[0])
        if self.num_samples < 0 or self.batch_size <= 0:
            raise ValueError(f"num_samples={self.num_samples} and batch_size={self.batch_size} must be positive")

    def methods(self) -> list[Method]:
        """The grid's methods: the full cache once per RoPE, every other policy at every positive budget and every
        compression ratio."""
        out = []
        for rope in self.ropes:
            for policy in self.policies:
                full = policy.partition(":")[0] == "full"
                out += [Method(rope, policy, b, None, self.question_apart) for b in self.budgets if (b == 0) == full]
                if not full:
                    out += [Method(rope, policy, 0, r, self.question_apart) for r in self.compression_ratios]
        return out


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of a grid: a RoPE variant, a KV policy with its budget in tokens (0 with a ``ratio``: the budget
    is ``int(n * (1 - ratio))`` of each prompt's ``n`` compressed tokens) and where the question goes."""

    rope: str
    policy: str
    budget: int
    ratio: float | None = None
    question_apart: bool = False

    @property
    def label(self) -> str:
        return method_label(self.rope, self.policy, self.budget, self.ratio, self.question_apart)

    def budget_for(self, sample: Sample) -> int:
        """The budget in tokens for ``sample``: the fixed one, or the ratio's share of what is compressed (the
        context alone when the question is apart, else the whole prompt), as kvpress counts it."""
        if self.ratio is None:
            return self.budget
        compressed = sample.question_start if self.question_apart else len(sample.ids)
        return int(compressed * (1.0 - self.ratio))


def spec_from_config(cfg: Any) -> GridSpec:
    """A :class:`GridSpec` from an ``ml_collections`` config (``configs/eval_grid.py``); unknown fields are errors."""
    fields = {f.name for f in dataclasses.fields(GridSpec)}
    values = {k: v for k, v in cfg.items() if k != "job"}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown eval_grid field(s) {unknown}; the fields are {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()}
    if values.get("depths") == ():
        values["depths"] = None
    return GridSpec(**values)


def run_grid_job(cfg: Any) -> dict[str, Any]:
    """``lcm run configs/eval_grid.py``: the grid of a config, with its compile count in the log."""
    return run_grid(spec_from_config(cfg))


def method_label(rope: str, policy: str, budget: int, ratio: float | None = None, question_apart: bool = False) -> str:
    """``ROPE`` for the full cache, ``ROPE, POLICY@BUDGET`` (or ``POLICY@r=RATIO``) otherwise, then ``, question
    apart`` where the question was not compressed (no ``|``: labels go into markdown tables)."""
    label = rope if rope not in ("", "default") else "none"
    if policy != "full":
        label += f", {policy}@r={ratio:g}" if ratio is not None else f", {policy}@{budget}"
    return label + (", question apart" if question_apart else "")


def row_label(row: dict[str, Any]) -> str:
    """The method label of a result row (rows written before ratios and question-apart runs have neither)."""
    ratio = row.get("compression_ratio")
    return method_label(row["rope"], row["policy"], row["budget"], ratio, bool(row.get("question_apart")))


# Everything that can change a row's result: a resumed run reuses a row only where every one of these agrees
# (``prompt_sha`` covers the task's wording, chat template, depths and sample count; the budget, for a ratio,
# follows from the prompt and the ratio)
ROW_KEY = (
    "model",
    "task",
    "length",
    "rope",
    "policy",
    "budget",
    "compression_ratio",
    "question_apart",
    "seed",
    "index",
    "prompt_sha",
    "dtype",
    "chunk_size",
    "max_new_tokens",
)


def _row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def prompt_sha(ids: Sequence[int]) -> str:
    """A short digest of a prompt's token ids (rows record it: a resumed run never reuses another prompt's row)."""
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line: redo that sample
            if number != len(lines):
                raise ValueError(f"{path}:{number} is not valid JSON") from None
    return rows


def _drop_partial_line(path: Path) -> None:
    """A run killed mid-write leaves the last line without its newline: cut it, so appending starts clean."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def build_samples(spec: GridSpec, tokenizer: Any, log: Callable[[str], None] = print) -> dict[tuple[str, int], list]:
    """Every prompt of the grid, keyed by (task, length); errors (length below a task's minimum) come here."""
    from lcm.evals.registry import get_task

    samples: dict[tuple[str, int], list[Sample]] = {}
    for task in spec.tasks:
        for length in spec.lengths:
            if task.startswith(FILE_PREFIX):
                from lcm.evals import longbench

                path = task[len(FILE_PREFIX) :]
                built, skipped = longbench.build_samples(
                    tokenizer, path, length, chat=spec.chat, limit=spec.num_samples or None
                )
                if skipped:
                    log(f"{path}: {skipped} malformed line(s) skipped")
            else:
                try:
                    built = get_task(task)(
                        tokenizer, length, spec.num_samples, seed=spec.seed, chat=spec.chat, depths=spec.depths
                    )
                except ValueError as err:
                    raise ValueError(f"task {task!r} at length {length}: {err}") from None
            samples[(task, length)] = built
    return samples


def check_methods(spec: GridSpec, samples: dict[tuple[str, int], list[Sample]]) -> None:
    """One-line errors, before any compute, for what only the prompts decide: a question that could not be
    located where the question goes apart, a ratio's budget a policy cannot run with."""
    from lcm.cache.policies import parse_policy

    if spec.question_apart:
        lost = [(s.task, s.length, s.index) for cell in samples.values() for s in cell if s.question_start is None]
        if lost:
            raise ValueError(
                f"question_apart: the question of {len(lost)} sample(s) could not be located (task, length, "
                f"index: {lost[:3]}{' ...' if len(lost) > 3 else ''}); compress it with the context instead"
            )
    for method in spec.methods():
        if method.ratio is not None:
            for budget in sorted({method.budget_for(s) for cell in samples.values() for s in cell}):
                try:
                    parse_policy(method.policy, budget)
                except ValueError as err:
                    raise ValueError(f"compression ratio {method.ratio:g} of {method.policy!r}: {err}") from None


def run_grid(
    spec: GridSpec, log: Callable[[str], None] = print, loaded: tuple[Any, Any] | None = None, write_report: bool = True
) -> dict[str, Any]:
    """Run ``spec``'s pending samples (module docstring). ``loaded``: the ``(model, tokenizer)`` of ``spec.model``
    already in memory (a job running several grids into one folder); ``write_report=False`` skips the tables and
    plots (the caller writes its own) and returns ``{}``."""
    from lcm.cache.policies import parse_policy
    from lcm.evals.suite import model_with_rope
    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model
    from lcm.io.compile_cache import CompileStats
    from lcm.io.retaining import model_for_policy

    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(spec.model, dtype=spec.dtype) if loaded is None else loaded
    samples = build_samples(spec, tokenizer, log)
    check_methods(spec, samples)
    _drop_partial_line(out / RESULTS)
    done = {_row_key(r) for r in read_results(out)}
    every = [(method, s) for method in spec.methods() for cell in samples.values() for s in cell]
    pending = [(method, s) for method, s in every if _row_key(_identity(spec, s, method)) not in done]
    total = len(every)
    bar = tqdm(total=total, initial=total - len(pending), desc="eval grid", unit="sample")
    if len(pending) < total:
        log(f"resuming: {total - len(pending)} of {total} samples already in {out / RESULTS}")
    stop_ids = list(tokenizer.eos_ids)
    with (out / RESULTS).open("a") as sink:
        # one Engine per method and budget (a ratio's budget follows each prompt's length)
        for (method, budget), group in _group_by(pending, lambda p: (p[0], p[0].budget_for(p[1]))):
            kv_policy = parse_policy(method.policy, budget).with_tokenizer(tokenizer)
            # Locret ranks by the model's trained retaining heads, attached after the RoPE swap
            scored = model_for_policy(model_with_rope(model, method.rope), spec.model, kv_policy)
            engine = Engine(scored, chunk_size=spec.chunk_size, policy=kv_policy)
            # eviction ranks unpadded rows; a question apart is one row's own length
            batchable = kv_policy.accepts_padded_rows() and not method.question_apart
            batch_size = spec.batch_size if batchable else 1
            todo = [s for _, s in group]
            for (task, length), cell in _group_by(todo, lambda s: (s.task, s.length)):
                bar.set_postfix_str(f"{method.label} {task} {length}")
                size = min(batch_size, len(cell))  # a cell smaller than a batch is not padded with copies
                for first in range(0, len(cell), size):
                    batch = cell[first : first + size]
                    started = time.perf_counter()
                    max_new = max(s.max_new_tokens for s in batch)
                    with CompileStats() as compiled:  # the times below include it: the cost table leaves such rows out
                        if method.question_apart:
                            ids = np.asarray(batch[0].ids, np.int32)[None]
                            at = batch[0].question_start
                            outputs = list(engine.generate(ids[:, :at], max_new, stop_ids, question=ids[:, at:]))
                        else:
                            prompts = [list(s.ids) for s in batch]
                            outputs = engine.generate_many(prompts, max_new, stop_ids, batch_size=size)
                    seconds = (time.perf_counter() - started) / len(batch)
                    for sample, ids in zip(batch, outputs, strict=True):
                        text = tokenizer.decode(ids[: sample.max_new_tokens].tolist())
                        row = _result_row(spec, sample, method, text, seconds)
                        row["kv_bytes"] = engine.last_cache_bytes // len(batch)
                        row["prefill_seconds"] = round(engine.last_prefill_seconds / len(batch), 3)
                        steps = max(engine.last_decode_steps, 1)
                        row["decode_ms_per_token"] = round(1000 * engine.last_decode_seconds / steps, 1)
                        row["compile_seconds"] = round(compiled.seconds / len(batch), 3)  # trace + compile or load
                        sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    bar.update(len(batch))
    bar.close()
    if not write_report:
        return {}
    from lcm.evals.report import report  # the report reads results.jsonl; it imports this module

    return report(out, log=log)


@dataclasses.dataclass(frozen=True)
class Scored:
    """One sample's greedy continuation (decoded, cut at ``max_new_tokens``) and its score under the metric."""

    sample: Sample
    output: str
    score: float


def run_samples(
    engine: Any, tokenizer: Any, samples: Sequence[Sample], progress: Callable[[Scored], None] | None = None
) -> list[Scored]:
    """Generate and score ``samples`` one at a time (the shape every KV policy takes: no padding, batch 1), scored
    as :func:`run_grid` scores them; ``engine`` is an :class:`lcm.generate.Engine`. The grid batches and resumes."""
    scored = []
    for sample in samples:
        out = engine.generate(np.array([sample.ids]), sample.max_new_tokens, stop_ids=list(tokenizer.eos_ids))[0]
        text = tokenizer.decode(out[: sample.max_new_tokens].tolist())
        scored.append(Scored(sample, text, longbench.score_sample(sample, text)))
        if progress is not None:
            progress(scored[-1])
    return scored


def _identity(spec: GridSpec, sample: Sample, method: Method) -> dict[str, Any]:
    """The fields of :data:`ROW_KEY` for ``sample`` under ``method``."""
    return {
        "model": spec.model,
        "task": sample.task,
        "length": sample.length,
        "rope": method.rope,
        "policy": method.policy,
        "budget": method.budget_for(sample),
        "compression_ratio": method.ratio,
        "question_apart": method.question_apart,
        "seed": spec.seed,
        "index": sample.index,
        "prompt_sha": prompt_sha(sample.ids),
        "dtype": spec.dtype,
        "chunk_size": spec.chunk_size,
        "max_new_tokens": sample.max_new_tokens,
    }


def _result_row(spec: GridSpec, sample: Sample, method: Method, output: str, seconds: float) -> dict[str, Any]:
    score = longbench.score_sample(sample, output)  # = metrics.score, plus LongBench's per-task rules
    return _identity(spec, sample, method) | {
        "chat": spec.chat,
        "depth": sample.depth,
        "n_tokens": len(sample.ids),
        "question_tokens": len(sample.ids) - sample.question_start if method.question_apart else 0,
        "metric": sample.metric,
        "score": score,
        "output": output,
        "references": list(sample.references),
        "seconds": round(seconds, 3),
    }


def _group_by(items: Iterable[Any], key: Callable[[Any], Any]) -> list[tuple[Any, list[Any]]]:
    groups: dict[Any, list[Any]] = collections.OrderedDict()
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.items())
