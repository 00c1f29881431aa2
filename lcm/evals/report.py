"""Tables and plots of an eval grid's ``results.jsonl`` (:mod:`lcm.evals.grid`).

``report(OUT)`` writes ``results.md`` — one table per task (mean score x 100), the average over RULER tasks with
RULER's effective length, for grids with KV budgets a table of score versus budget per policy, and a cost table
(KV bytes measured from the cache arrays, prefill seconds, decode ms/token) — plus ``heatmap_<task>.png``
(length x method), ``heatmap_<task>_depth*.png`` (length x depth per method, for tasks that plant something at a
depth), ``budget.png`` (score versus KV budget per policy) and ``summary.png`` (mean score versus length per
method).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcm.evals.grid import RESULTS, read_results, row_label


def _methods_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row_label(r) for r in rows))


def score_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[int, tuple[float, int]]]]:
    """``{task: {method: {length: (mean score, samples)}}}``."""
    cells: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
    for r in rows:
        cells[(r["task"], row_label(r), r["length"])].append(r["score"])
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
    budgets = budget_table(rows)
    if budgets:
        parts.append(budgets)
    cost = cost_table(rows)
    if cost:
        parts.append(cost)
    return "\n\n".join(parts) + "\n"


def _setting(row: dict[str, Any]) -> tuple[int, float]:
    """A row's compression setting, sortable: ``(0, 0)`` the full cache, ``(1, budget)`` a budget in tokens,
    ``(2, ratio)`` a compression ratio."""
    if row.get("compression_ratio") is not None:
        return (2, row["compression_ratio"])
    return (1, row["budget"]) if row["budget"] > 0 else (0, 0)


def _setting_header(setting: tuple[int, float], length: int) -> str:
    kind, value = setting
    return f"r={value:g}" if kind == 2 else f"{value} ({value / length:.0%})"


def budget_table(rows: Sequence[dict[str, Any]]) -> str:
    """Mean score x 100 per KV policy (rows) and task x budget (columns), one table per length, a budget in tokens
    also as a share of the length, a compression ratio as ``r=...``; the full cache is one row whose score stands
    under every budget. Empty when the grid has no budgets."""
    settings = sorted({_setting(r) for r in rows} - {(0, 0)})
    if not settings:
        return ""
    scores: dict[tuple[str, str, int, tuple[int, float]], list[float]] = collections.defaultdict(list)
    for r in rows:
        policy = r["policy"] if r["rope"] in ("none", "", "default") else f"{r['rope']} {r['policy']}"
        policy += ", question apart" if r.get("question_apart") else ""
        scores[(policy, r["task"], r["length"], _setting(r))].append(r["score"])
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    policies = list(dict.fromkeys(key[0] for key in scores))
    parts = []
    for length in sorted({r["length"] for r in rows}):
        if not any(key[2] == length and key[3] != (0, 0) for key in scores):
            continue
        header = " | ".join(f"{t} {_setting_header(b, length)}" for t in tasks for b in settings)
        lines = [f"### Score versus KV budget at {length} tokens (x 100; budget in tokens and share, or ratio)", ""]
        lines += [f"| policy | {header} |", "|---" * (len(tasks) * len(settings) + 1) + "|"]
        for policy in policies:
            cells = []
            for t in tasks:
                for b in settings:
                    got = scores.get((policy, t, length, b)) or scores.get((policy, t, length, (0, 0)))
                    cells.append(f"{100 * np.mean(got):.0f}" if got else "")
            if any(cells):
                lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def cost_table(rows: Sequence[dict[str, Any]]) -> str:
    """KV-cache bytes of the prompt (measured from the cache arrays at their largest), prefill seconds and decode
    ms/token per method and length, medians over every task's samples; empty for results without these fields.
    A sample whose run traced, compiled or loaded a program (``compile_seconds`` > 0, the first of a cell) is left
    out where its cell has others: its times include that work."""
    rows = [r for r in rows if "kv_bytes" in r]
    if not rows:
        return ""
    lengths = sorted({r["length"] for r in rows})
    cells: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        cells[(row_label(r), r["length"])].append(r)
    header = "| method | " + " | ".join(f"{n}: KV MiB / prefill s / decode ms/token" for n in lengths) + " |"
    title = (
        "### Cost per sample (medians over samples and tasks; wall time, leaving out samples whose run compiled or "
        "loaded a program where a cell has others)"
    )
    lines = [title, "", header, "|---" * (len(lengths) + 1) + "|"]
    for method in _methods_of(rows):
        out = []
        for n in lengths:
            group = cells.get((method, n), [])
            if not group:
                out.append("")
                continue
            warm = [r for r in group if r.get("compile_seconds", 0) == 0]  # rows before the field count as warm
            group = warm or group
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
                    if row_label(r) == method:
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
    """Score (mean over lengths) versus KV budget in tokens, one line per policy (and question setting) and panel
    per task; the full cache dashed. Rows run at a compression ratio are in the tables only."""
    rows = [r for r in rows if r.get("compression_ratio") is None]
    budgets = sorted({r["budget"] for r in rows if r["budget"] > 0})
    if not budgets:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        by: dict[tuple[str, str, bool, int], list[float]] = collections.defaultdict(list)
        for r in rows:
            if r["task"] == task:
                by[(r["rope"], r["policy"], bool(r.get("question_apart")), r["budget"])].append(r["score"])
        for rope, policy, apart in dict.fromkeys(k[:3] for k in by):
            label = policy if rope in ("none", "", "default") else f"{rope} {policy}"
            label += " (question apart)" if apart else ""
            if policy == "full":
                ax.axhline(np.mean(by[(rope, policy, apart, 0)]), linestyle="--", color="gray", label=label)
                continue
            xs = [b for b in budgets if (rope, policy, apart, b) in by]
            ax.plot(xs, [np.mean(by[(rope, policy, apart, b)]) for b in xs], marker="o", label=label)
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


def replace_between(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with what lies between its one ``begin`` line and its one ``end`` line replaced by ``block`` (the
    scripts that rewrite a README table from saved results); a missing or repeated marker is an error."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"need exactly one {begin!r} line followed by one {end!r} line")
    head, rest = text.split(begin)
    return f"{head}{begin}\n{block}\n{end}{rest.split(end)[1]}"
