"""The grid runner: every (RoPE variant x KV policy x budget) x task x length, resumable, with tables and plots.

``run_grid(spec)`` loads the model once, builds every prompt first (so a bad task or a length below a task's
minimum fails before any compute), then runs the cells in order and appends one JSON line per sample to
``OUT/results.jsonl`` as soon as its batch finishes. Run it again with the same ``OUT`` and every sample already
there is skipped: an interrupted sweep resumes where it stopped, and adding a length or a task runs only what is
new. ``report(OUT)`` turns the JSONL into ``results.md`` (one table per task, mean score x 100, plus the average
over RULER tasks with RULER's effective length), ``heatmap_<task>_depth.png`` (length x depth per method, for
tasks that plant something at a depth), ``heatmap_<task>.png`` (length x method) and ``summary.png``.

Samples of one cell are batched ``batch_size`` at a time through one jitted prefill and decode
(:meth:`lcm.generate.Engine.generate_many`); a padded row computes what it computes alone (tested).
"""

from __future__ import annotations

import collections
import dataclasses
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
        from lcm.ops.rope import parse_rope_spec

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
                parse_rope_spec(rope)
        for policy in self.policies:
            if policy.partition(":")[0] not in POLICIES:
                raise ValueError(f"unknown KV policy {policy!r}; choose one of {sorted(POLICIES)}")
        if any(b < 0 for b in self.budgets) or not self.budgets:
            raise ValueError(f"budgets must be non-negative token counts, got {self.budgets}")
        if any(b > 0 for b in self.budgets) and set(self.policies) == {"full"}:
            raise ValueError(f"budgets {self.budgets} need a KV policy other than `full` (budget 0 = full cache)")
        if any(not p.startswith("full") for p in self.policies) and not any(b > 0 for b in self.budgets):
            raise ValueError(f"policies {self.policies} need a positive budget in tokens (--budget)")
        for _, policy, budget in self.methods():
            parse_policy(policy, budget)  # unknown names, bad parameters, budgets below what a policy keeps
        if self.num_samples < 0 or self.batch_size <= 0:
            raise ValueError(f"num_samples={self.num_samples} and batch_size={self.batch_size} must be positive")

    def methods(self) -> list[tuple[str, str, int]]:
        """(rope, policy, budget) cells: the full cache once per RoPE, every other policy at every positive budget."""
        return [
            (r, p, b)
            for r in self.ropes
            for p in self.policies
            for b in self.budgets
            if (b == 0) == (p.partition(":")[0] == "full")
        ]


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


def method_label(rope: str, policy: str, budget: int) -> str:
    """``ROPE`` for the full cache, ``ROPE, POLICY@BUDGET`` otherwise (no ``|``: labels go into markdown tables)."""
    label = rope if rope not in ("", "default") else "none"
    if policy != "full":
        label += f", {policy}@{budget}"
    return label


def _row_key(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in ("model", "task", "length", "rope", "policy", "budget", "seed", "index"))


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line: redo that sample
            if number != len(path.read_text().splitlines()):
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


def run_grid(spec: GridSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    from lcm.cache.policies import parse_policy
    from lcm.evals.suite import model_with_rope
    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model

    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(spec.model, dtype=spec.dtype)
    samples = build_samples(spec, tokenizer, log)
    _drop_partial_line(out / RESULTS)
    done = {_row_key(r) for r in read_results(out)}

    def key(sample: Sample, rope: str, policy: str, budget: int) -> tuple:
        return (spec.model, sample.task, sample.length, rope, policy, budget, spec.seed, sample.index)

    pending = [
        (method, s)
        for method in spec.methods()
        for cell in samples.values()
        for s in cell
        if key(s, *method) not in done
    ]
    total = len(pending) + sum(len(c) for c in samples.values()) * len(spec.methods()) - len(pending)
    bar = tqdm(total=total, initial=total - len(pending), desc="eval grid", unit="sample")
    if len(pending) < total:
        log(f"resuming: {total - len(pending)} of {total} samples already in {out / RESULTS}")
    stop_ids = list(tokenizer.eos_ids)
    with (out / RESULTS).open("a") as sink:
        for (rope, policy, budget), group in _group_by(pending, lambda p: p[0]):
            kv_policy = parse_policy(policy, budget)
            engine = Engine(model_with_rope(model, rope), chunk_size=spec.chunk_size, policy=kv_policy)
            batch_size = 1 if kv_policy.bounded else spec.batch_size  # eviction works on unpadded rows
            todo = [s for _, s in group]
            for (task, length), cell in _group_by(todo, lambda s: (s.task, s.length)):
                bar.set_postfix_str(f"{method_label(rope, policy, budget)} {task} {length}")
                for first in range(0, len(cell), batch_size):
                    batch = cell[first : first + batch_size]
                    started = time.perf_counter()
                    max_new = max(s.max_new_tokens for s in batch)
                    outputs = engine.generate_many(
                        [list(s.ids) for s in batch], max_new, stop_ids, batch_size=batch_size
                    )
                    seconds = (time.perf_counter() - started) / len(batch)
                    for sample, ids in zip(batch, outputs, strict=True):
                        text = tokenizer.decode(ids[: sample.max_new_tokens].tolist())
                        row = _result_row(spec, sample, rope, policy, budget, text, seconds)
                        row["kv_bytes"] = engine.last_cache_bytes // len(batch)
                        row["prefill_seconds"] = round(engine.last_prefill_seconds / len(batch), 3)
                        steps = max(engine.last_decode_steps, 1)
                        row["decode_ms_per_token"] = round(1000 * engine.last_decode_seconds / steps, 1)
                        sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    bar.update(len(batch))
    bar.close()
    summary = report(out, log=log)
    return summary


def _result_row(
    spec: GridSpec, sample: Sample, rope: str, policy: str, budget: int, output: str, seconds: float
) -> dict[str, Any]:
    score = longbench.score_sample(sample, output)  # = metrics.score, plus LongBench's per-task rules
    return {
        "model": spec.model,
        "task": sample.task,
        "length": sample.length,
        "rope": rope,
        "policy": policy,
        "budget": budget,
        "seed": spec.seed,
        "index": sample.index,
        "depth": sample.depth,
        "n_tokens": len(sample.ids),
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


def _methods_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(method_label(r["rope"], r["policy"], r["budget"]) for r in rows))


def score_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[int, tuple[float, int]]]]:
    """``{task: {method: {length: (mean score, samples)}}}``."""
    cells: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
    for r in rows:
        cells[(r["task"], method_label(r["rope"], r["policy"], r["budget"]), r["length"])].append(r["score"])
    table: dict[str, dict[str, dict[int, tuple[float, int]]]] = {}
    for (task, method, length), scores in cells.items():
        table.setdefault(task, {}).setdefault(method, {})[length] = (float(np.mean(scores)), len(scores))
    return table


def markdown(rows: Sequence[dict[str, Any]], threshold: float = 0.856) -> str:
    """One table per task (mean score x 100, samples per cell in the header) and the RULER average."""
    from lcm.evals.registry import RULER_TASKS
    from lcm.evals.ruler import effective_length

    table = score_table(rows)
    lengths = sorted({r["length"] for r in rows})
    parts = []
    ruler_tasks = [t for t in table if t in RULER_TASKS]
    if len(ruler_tasks) > 1:
        header = "| method | " + " | ".join(str(n) for n in lengths) + " | effective length |"
        lines = [f"### RULER average over {len(ruler_tasks)} tasks ({', '.join(ruler_tasks)})", "", header]
        lines.append("|---" * (len(lengths) + 2) + "|")
        for method in _methods_of(rows):
            means = {}
            for n in lengths:
                per_task = [table[t][method][n][0] for t in ruler_tasks if n in table[t].get(method, {})]
                if len(per_task) == len(ruler_tasks):
                    means[n] = float(np.mean(per_task))
            effective = effective_length(means, threshold)
            cells = [f"{100 * means[n]:.1f}" if n in means else "" for n in lengths]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {effective or '< ' + str(lengths[0])} |")
        parts.append(
            "\n".join(lines) + f"\n\nEffective length: the longest length up to which the average stays "
            f"above {100 * threshold:.1f} (RULER's threshold, Llama-2-7B's 4k average)."
        )
    for task, by_method in table.items():
        counts = sorted({c for m in by_method.values() for _, c in m.values()})
        header = "| method | " + " | ".join(str(n) for n in lengths) + " |"
        metric = next(r["metric"] for r in rows if r["task"] == task)
        lines = [f"### {task} ({metric} x 100, {'/'.join(map(str, counts))} samples per cell)", "", header]
        lines.append("|---" * (len(lengths) + 1) + "|")
        for method, by_length in by_method.items():
            cells = [f"{100 * by_length[n][0]:.1f}" if n in by_length else "" for n in lengths]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    cost = cost_table(rows)
    if cost:
        parts.append(cost)
    return "\n\n".join(parts) + "\n"


def cost_table(rows: Sequence[dict[str, Any]]) -> str:
    """KV-cache bytes of the prompt (measured from the cache arrays at their largest), prefill seconds and decode
    ms/token per method and length, medians over every task's samples (the first sample of a cell also pays
    for compiling its programs; the median leaves that out); empty for results without these fields."""
    rows = [r for r in rows if "kv_bytes" in r]
    if not rows:
        return ""
    lengths = sorted({r["length"] for r in rows})
    cells: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        cells[(method_label(r["rope"], r["policy"], r["budget"]), r["length"])].append(r)
    header = "| method | " + " | ".join(f"{n}: KV MiB / prefill s / decode ms/token" for n in lengths) + " |"
    title = "### Cost per sample (medians over samples and tasks; wall time)"
    lines = [title, "", header, "|---" * (len(lengths) + 1) + "|"]
    for method in _methods_of(rows):
        out = []
        for n in lengths:
            group = cells.get((method, n), [])
            if not group:
                out.append("")
                continue
            mib = np.median([r["kv_bytes"] for r in group]) / 2**20
            prefill = np.median([r["prefill_seconds"] for r in group])
            decode = np.median([r["decode_ms_per_token"] for r in group])
            out.append(f"{mib:.1f} / {prefill:.2f} / {decode:.0f}")
        lines.append(f"| {method} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def report(out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tables and plots from ``results.jsonl``; returns ``{task: {method: {length: mean}}}`` and the paths."""
    out = Path(out_dir)
    rows = read_results(out)
    if not rows:
        raise ValueError(f"{out / RESULTS} has no results yet")
    text = markdown(rows)
    (out / "results.md").write_text(f"# Eval grid: {rows[0]['model']}\n\n{text}")
    plots = _plot(out, rows)
    log(text)
    log(f"wrote {out / 'results.md'} and {len(plots)} plots")
    table = score_table(rows)
    return {
        "scores": {t: {m: {n: v[0] for n, v in by.items()} for m, by in bm.items()} for t, bm in table.items()},
        "results_md": str(out / "results.md"),
        "plots": [str(p) for p in plots],
    }


def _plot(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = score_table(rows)
    lengths = sorted({r["length"] for r in rows})
    methods = _methods_of(rows)
    paths = []
    for task, by_method in table.items():
        grid = np.array([[by_method.get(m, {}).get(n, (np.nan, 0))[0] for n in lengths] for m in methods])
        paths.append(
            _heatmap(
                plt,
                grid,
                lengths,
                methods,
                "method",
                f"{task}: score by length and method",
                out / f"heatmap_{_safe(task)}.png",
            )
        )
        depth_rows = [r for r in rows if r["task"] == task and r.get("depth") is not None]
        depths = sorted({round(r["depth"], 2) for r in depth_rows})
        if len(depths) > 1:
            for method in methods:
                cells: dict[tuple[float, int], list[float]] = collections.defaultdict(list)
                for r in depth_rows:
                    if method_label(r["rope"], r["policy"], r["budget"]) == method:
                        cells[(round(r["depth"], 2), r["length"])].append(r["score"])
                grid = np.array(
                    [[np.mean(cells[(d, n)]) if cells[(d, n)] else np.nan for n in lengths] for d in depths]
                )
                name = f"heatmap_{_safe(task)}_depth" + (f"_{_safe(method)}" if len(methods) > 1 else "") + ".png"
                paths.append(
                    _heatmap(
                        plt,
                        grid,
                        lengths,
                        [f"{d:.0%}" for d in depths],
                        "depth",
                        f"{task} [{method}]: score by length and depth",
                        out / name,
                    )
                )
    budget_plot = _plot_budgets(plt, out, rows)
    if budget_plot is not None:
        paths.append(budget_plot)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        means = [
            np.mean([table[t][method][n][0] for t in table if n in table[t].get(method, {})] or [np.nan])
            for n in lengths
        ]
        ax.plot(lengths, means, marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"mean score over {len(table)} tasks")
    ax.set_title(f"{rows[0]['model']}: eval grid")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)
    plt.close(fig)
    return [*paths, out / "summary.png"]


def _plot_budgets(plt: Any, out: Path, rows: Sequence[dict[str, Any]]) -> Path | None:
    """Score (mean over lengths) versus KV budget, one line per policy and panel per task; the full cache dashed."""
    budgets = sorted({r["budget"] for r in rows if r["budget"] > 0})
    if not budgets:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        by: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
        for r in rows:
            if r["task"] == task:
                by[(r["rope"], r["policy"], r["budget"])].append(r["score"])
        for rope, policy in dict.fromkeys((k[0], k[1]) for k in by):
            label = method_label(rope, policy, 1).split(", ")[-1] if policy != "full" else f"{rope} full"
            if policy == "full":
                ax.axhline(np.mean(by[(rope, policy, 0)]), linestyle="--", color="gray", label=label)
                continue
            xs = [b for b in budgets if (rope, policy, b) in by]
            ax.plot(xs, [np.mean(by[(rope, policy, b)]) for b in xs], marker="o", label=label.split("@")[0])
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("KV budget (tokens)")
        ax.set_ylabel("score")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "budget.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _heatmap(
    plt: Any, grid: np.ndarray, lengths: list[int], labels: list[str], ylabel: str, title: str, path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.9 * len(lengths)), max(2.5, 1.2 + 0.45 * len(labels))))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(ylabel)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="score")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
