"""Past the trained length without training: one table comparing position schemes, RoPE scaling and KV policies.

``lcm run configs/extrapolation_32k.py`` runs, for every method of the config (a RoPE spec, a position scheme of
:mod:`lcm.ops.position_schemes`, or a KV policy that keeps positions inside its cache: ``ROPE[+POLICY@BUDGET]``),
the config's stages in order — passkey at each length with seeded random depths, the NIAH grid and RULER-style tasks
at 16k, perplexity at each length — and writes one table (``results.md``), a plot of passkey accuracy versus length
with one line per method (``passkey.png``, its numbers in ``passkey.json``) and ``summary.json``.

It is resumable: grid samples go to ``results.jsonl`` through :func:`lcm.evals.grid.run_grid` (a row is reused only
where every option that changes it agrees, :data:`lcm.evals.grid.ROW_KEY`), perplexities to ``perplexity.jsonl``
keyed by method, length, text digest, dtype and chunk; a run stopped anywhere continues where it stopped, and
adding a method or a length runs only what is new. Stages run one method after another so the long cells can be
spread over sessions (``--config.stages=passkey_16k`` runs one stage).

Misses that are the model's own: the table lists, per method, the 8k passkey trials it misses and how many of those
the plain model with its full cache (``none``) misses too: at its trained length, those are the model's failures,
not the method's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcm.evals import grid, texts

PERPLEXITY = "perplexity.jsonl"
TASK_COLUMNS = ("niah", "niah_single_1", "niah_multikey_1", "vt")


@dataclasses.dataclass(frozen=True)
class Method:
    """``ROPE[+POLICY@BUDGET]``: a RoPE spec or position scheme, and optionally a KV policy with its budget."""

    rope: str
    policy: str = "full"
    budget: int = 0

    @classmethod
    def parse(cls, spec: str) -> Method:
        rope, plus, rest = spec.partition("+")
        if not plus:
            return cls(rope.strip() or "none")
        policy, at, budget = rest.partition("@")
        if not at or not budget.strip().isdigit() or int(budget) <= 0:
            raise ValueError(f"method {spec!r}: write ROPE+POLICY@BUDGET with a budget in tokens > 0")
        return cls(rope.strip() or "none", policy.strip(), int(budget))

    @property
    def label(self) -> str:
        return grid.method_label(self.rope, self.policy, self.budget)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One block of work: a grid task (``passkey``, ``niah``, a RULER task) or ``perplexity``, at some lengths."""

    name: str
    task: str
    lengths: tuple[int, ...]
    samples: int = 1


def passkey_depths(num: int, seed: int) -> tuple[float, ...]:
    """``num`` seeded random needle depths in [0, 1] (three decimals), the same for every method and length."""
    return tuple(round(float(x), 3) for x in np.random.default_rng([seed, 2024]).uniform(0.0, 1.0, num))


def stages_from_config(cfg: Any) -> list[Stage]:
    out = []
    for name in cfg.stages:
        if name not in cfg.stage:
            raise ValueError(f"stage {name!r} is not defined; the config defines {sorted(cfg.stage)}")
        stage = cfg.stage[name]
        lengths = tuple(int(n) for n in stage.lengths)
        if not lengths or min(lengths) < 2:
            raise ValueError(f"stage {name!r}: lengths {lengths} must be token counts >= 2")
        out.append(Stage(name, stage.task, lengths, int(stage.get("samples", 1))))
    return out


def check_config(cfg: Any) -> tuple[list[Method], list[Stage]]:
    """Methods and stages of a config; every spec parsed and every task known before any model is loaded."""
    from lcm.cache.policies import parse_policy
    from lcm.evals.registry import get_task
    from lcm.evals.suite import parse_model_rope
    from lcm.ops.position_schemes import is_position_scheme

    methods = [Method.parse(spec) for spec in cfg.methods]
    if len({m.label for m in methods}) != len(methods):
        raise ValueError(f"methods {list(cfg.methods)} name one method twice")
    for method in methods:
        if method.rope != "none":
            parse_model_rope(method.rope)
        policy = parse_policy(method.policy, method.budget)
        if is_position_scheme(method.rope):
            policy.check_position_scheme(method.rope.partition(":")[0])
    stages = stages_from_config(cfg)
    for stage in stages:
        if stage.task != "perplexity":
            get_task(stage.task)
    return methods, stages


def run_extrapolation_job(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``lcm run configs/extrapolation_32k.py`` (module docstring)."""
    from lcm.evals.suite import context_warning
    from lcm.io.checkpoints import load_model
    from lcm.ops.position_schemes import is_position_scheme

    methods, stages = check_config(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    longest = max(n for stage in stages for n in stage.lengths)
    for method in methods:  # a scheme read past the length its setting supports: said, not refused
        warning = context_warning(model, method.rope, [longest]) if is_position_scheme(method.rope) else None
        if warning:
            log(warning)
    for stage in stages:
        for method in methods:
            log(f"[{stage.name}] {method.label}")
            if stage.task == "perplexity":
                _perplexity(cfg, method, stage, model, tokenizer, out, log)
                continue
            spec = grid.GridSpec(
                model=cfg.model,
                tasks=(stage.task,),
                lengths=stage.lengths,
                ropes=(method.rope,),
                policies=(method.policy,),
                budgets=(method.budget,),
                num_samples=stage.samples,
                seed=cfg.seed,
                depths=passkey_depths(stage.samples, cfg.seed) if stage.task == "passkey" else None,
                chat=cfg.chat,
                chunk_size=cfg.chunk_size,
                dtype=cfg.dtype,
                out_dir=str(out),
            )
            grid.run_grid(spec, log=log, loaded=(model, tokenizer), write_report=False)
    return write_report(out, [m.label for m in methods], model.config.max_position_embeddings, log)


def _perplexity(cfg: Any, method: Method, stage: Stage, model: Any, tokenizer: Any, out: Path, log: Callable) -> None:
    from lcm.cache.policies import parse_policy
    from lcm.evals.perplexity import perplexity_vs_length
    from lcm.evals.suite import model_with_rope
    from lcm.generate import Engine

    policy = parse_policy(method.policy, method.budget)
    if not policy.keeps_everything():
        log(f"  skipped: {method.policy} changes what later tokens see, so its per-token NLLs are not one pass's")
        return
    ids = np.asarray(tokenizer.encode(texts.text_from(cfg.perplexity_text, "prose"), add_special=False), np.int32)
    digest = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
    key = {"method": method.label, "text_sha": digest, "dtype": cfg.dtype, "chunk_size": cfg.chunk_size}
    done = {row["length"] for row in read_jsonl(out / PERPLEXITY) if all(row.get(k) == v for k, v in key.items())}
    todo = [n for n in stage.lengths if n not in done]
    if not todo:
        return
    if len(ids) < max(todo):
        raise ValueError(f"the perplexity text has {len(ids)} tokens, fewer than the length {max(todo)}")
    engine = Engine(model_with_rope(model, method.rope), chunk_size=cfg.chunk_size, policy=policy)
    with (out / PERPLEXITY).open("a") as sink:
        for result in perplexity_vs_length(engine, ids, todo):
            sink.write(json.dumps(key | result.to_dict()) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of ``path`` (none if it does not exist; a cut last line is ignored)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarise(out: Path, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Per method: passkey trials by length, perplexity by length, mean task scores at each length, and the 8k
    passkey misses shared with the plain model (``none``)."""
    rows = grid.read_results(out)
    table: dict[str, dict[str, Any]] = {}

    def cell(label: str) -> dict[str, Any]:
        return table.setdefault(label, {"passkey": {}, "ppl": {}, "tasks": {}, "passkey_misses": {}})

    for row in rows:
        entry = cell(grid.row_label(row))
        if row["task"] == "passkey":
            entry["passkey"].setdefault(row["length"], []).append(bool(row["score"] >= 1.0))
            if row["score"] < 1.0:
                entry["passkey_misses"].setdefault(row["length"], []).append(row["index"])
        else:
            entry["tasks"].setdefault(row["task"], {}).setdefault(row["length"], []).append(float(row["score"]))
    for row in read_jsonl(out / PERPLEXITY):
        cell(row["method"])["ppl"][row["length"]] = row["ppl"]
    order = list(labels or []) + sorted(set(table) - set(labels or []))
    return {label: table[label] for label in order if label in table}


def markdown(summary: dict[str, Any], trained: int) -> str:
    lengths = sorted({n for entry in summary.values() for n in entry["passkey"]})
    ppl_lengths = sorted({n for entry in summary.values() for n in entry["ppl"]})
    task_cells = sorted(
        {(task, n) for entry in summary.values() for task, by in entry["tasks"].items() for n in by},
        key=lambda x: (TASK_COLUMNS.index(x[0]) if x[0] in TASK_COLUMNS else len(TASK_COLUMNS), x[0], x[1]),
    )
    head = (
        [f"passkey {_k(n)}" for n in lengths]
        + [f"ppl {_k(n)}" for n in ppl_lengths]
        + [f"{task} {_k(n)}" for task, n in task_cells]
    )
    lines = ["| method | " + " | ".join(head) + f" | passkey misses at {_k(trained)} (shared with none) |"]
    lines.append("|---" * (len(head) + 2) + "|")
    plain = set(summary.get("none", {}).get("passkey_misses", {}).get(trained, []))
    for label, entry in summary.items():
        values = []
        for n in lengths:
            trials = entry["passkey"].get(n, [])
            values.append(f"{sum(trials)}/{len(trials)}" if trials else "—")
        values += [f"{entry['ppl'][n]:.2f}" if n in entry["ppl"] else "—" for n in ppl_lengths]
        for task, n in task_cells:
            scores = entry["tasks"].get(task, {}).get(n, [])
            values.append(f"{100 * np.mean(scores):.0f} (n={len(scores)})" if scores else "—")
        misses = sorted(entry["passkey_misses"].get(trained, []))
        shared = len(plain & set(misses))
        note = f"{misses} ({shared} shared)" if misses else ("—" if trained in entry["passkey"] else "not run")
        lines.append(f"| `{label}` | " + " | ".join(values) + f" | {note} |")
    return "\n".join(lines)


def write_report(out: Path, labels: Sequence[str], trained: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``results.md``, ``passkey.json`` + ``passkey.png`` and ``summary.json`` from what ``out`` holds."""
    summary = summarise(out, labels)
    text = markdown(summary, trained)
    (out / "results.md").write_text(
        f"# Past the trained length ({_k(trained)} tokens) without training\n\n"
        "Passkey: correct/trials at seeded random depths; ppl: perplexity of the prefix of that length; tasks: mean "
        "score x 100 over n samples.\n\n" + text + "\n"
    )
    curves = {
        label: {str(n): float(np.mean(t)) for n, t in sorted(entry["passkey"].items())}
        for label, entry in summary.items()
        if entry["passkey"]
    }
    (out / "passkey.json").write_text(json.dumps(curves, indent=1))
    plot_passkey(curves, out / "passkey.png", trained)
    serialisable = json.loads(json.dumps(summary, default=str))
    (out / "summary.json").write_text(json.dumps(serialisable, indent=1))
    log(text)
    return serialisable


def plot_passkey(curves: dict[str, dict[str, float]], path: Path, trained: int) -> None:
    """Passkey accuracy versus length, one line per method; a dashed line at the trained length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = "osD^v<>px*h"
    for i, (label, curve) in enumerate(curves.items()):
        xs = [int(n) for n in curve]
        # a small offset per method, so equal accuracies do not hide each other (the values are in passkey.json)
        shift = i - (len(curves) - 1) / 2
        ys = [y + 0.006 * shift for y in curve.values()]
        ax.plot([x * (1 + 0.012 * shift) for x in xs], ys, marker=markers[i % len(markers)], label=label)
    ax.axvline(trained, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ticks = sorted({int(n) for curve in curves.values() for n in curve})
    ax.set_xticks(ticks, [_k(n) for n in ticks])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title(f"Passkey past the trained length ({_k(trained)})")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _k(n: int) -> str:
    """``8192`` -> ``8k``; lengths below 1024 or not a whole number of k as they are."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
