"""The long-context suite behind ``lcm run``: passkey, NIAH and perplexity versus length, per RoPE variant.

One model is loaded once; each RoPE variant is the same parameters under another config (no copy). Results go to
``out_dir``: ``results.json`` (everything, trial by trial), ``results.md`` (the table), ``perplexity.png``,
``passkey.png`` and ``niah_<variant>/niah.{json,png}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lcm.evals import niah, passkey, perplexity, texts
from lcm.generate import Engine
from lcm.io.checkpoints import load_model
from lcm.io.compile_cache import CompileStats
from lcm.models.families import Model, with_config
from lcm.ops.position_schemes import is_position_scheme, parse_position_scheme
from lcm.ops.rope import parse_rope_spec

ROPE_LAYERS = ("global", "all")


def parse_model_rope(spec: str) -> tuple[str, dict[str, Any], str]:
    """``VARIANT[:k=v,...][,layers=global|all]``: :func:`lcm.ops.rope.parse_rope_spec`, plus which layers the
    variant scales on a model with sliding-window layers (Gemma 3): ``global`` (the default, Gemma's own recipe)
    or ``all`` (the local layers too, each kind on its own base). A model whose layers are all global takes either.
    """
    if is_position_scheme(spec):  # a training-free extrapolation scheme inside attention (plain RoPE frequencies)
        scheme = parse_position_scheme(spec)
        return scheme.name, {f.name: getattr(scheme, f.name) for f in dataclasses.fields(scheme)}, "all"
    name, colon, body = spec.partition(":")
    items = [item for item in (part.strip() for part in body.split(",")) if item]
    layers = [item.partition("=")[2].strip() for item in items if item.partition("=")[0].strip() == "layers"]
    if len(layers) > 1:
        raise ValueError(f"rope spec {spec!r}: parameter 'layers' given twice")
    if layers and layers[0] not in ROPE_LAYERS:
        raise ValueError(f"rope spec {spec!r}: layers={layers[0]!r}; choose one of {list(ROPE_LAYERS)}")
    rest = ",".join(item for item in items if item.partition("=")[0].strip() != "layers")
    variant, params = parse_rope_spec(name + (colon + rest if rest else ""))
    return variant, params, layers[0] if layers else "global"


def model_with_rope(model: Model, spec: str) -> Model:
    """``spec`` is ``none``/``default`` or ``VARIANT[:k=v,...][,layers=global|all]`` (:func:`parse_model_rope`)."""
    if spec in ("none", "default", ""):
        return model
    if is_position_scheme(spec):
        scheme = parse_position_scheme(spec)
        if not hasattr(model.config, "with_position_scheme"):
            raise ValueError(
                f"position scheme {scheme.name!r} is implemented for the LLaMA family (SmolLM2), not for "
                f"{type(model.config).__name__}"
            )
        return with_config(model, model.config.with_position_scheme(scheme))
    variant, params, layers = parse_model_rope(spec)
    return with_config(model, model.config.with_rope(variant, params, layers=layers))


def context_warning(model: Model, rope_spec: str, lengths: list[int]) -> str | None:
    trained = model.config.max_position_embeddings
    if is_position_scheme(rope_spec):
        scheme = parse_position_scheme(rope_spec).resolved(trained)
        limit = scheme.max_length(trained)
        if limit is not None and lengths and max(lengths) > limit:
            return (
                f"warning: lengths up to {max(lengths)} exceed the {limit} tokens that {scheme.spec} supports for a "
                f"model trained to {trained} (its positions would leave the trained range)"
            )
        return None
    if rope_spec in ("none", "default", "") and lengths and max(lengths) > trained:
        return (
            f"warning: lengths up to {max(lengths)} exceed the model's trained context of {trained} tokens "
            "without RoPE scaling (allowed: this is the extrapolation baseline)"
        )
    return None


def _plot(out: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rope, rows in results["perplexity"].items():
        ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=rope)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["length"] for rows in results["perplexity"].values() for r in rows})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_xlabel("tokens")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{results['model']}: perplexity vs length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for rope, acc in results["passkey"].items():
        lengths = sorted(int(n) for n in acc)
        ax.plot(lengths, [acc[str(n)] for n in lengths], marker="o", label=rope)
    ax.set_xscale("log", base=2)
    ticks = sorted({int(n) for acc in results["passkey"].values() for n in acc})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("tokens")
    ax.set_ylabel("passkey accuracy")
    ax.set_title(f"{results['model']}: passkey retrieval")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "passkey.png", dpi=120)
    plt.close(fig)


def markdown_table(results: dict[str, Any]) -> str:
    ropes = list(results["passkey"] or results["perplexity"])
    pk_lengths = sorted({int(n) for acc in results["passkey"].values() for n in acc})
    ppl_lengths = sorted({r["length"] for rows in results["perplexity"].values() for r in rows})
    header = ["RoPE"] + [f"passkey {n}" for n in pk_lengths] + [f"ppl {n}" for n in ppl_lengths]
    if results["niah"]:
        header.append("NIAH mean")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rope in ropes:
        row = [f"`{rope}`"]
        acc = results["passkey"].get(rope, {})
        row += [f"{acc[str(n)]:.0%}" if str(n) in acc else "" for n in pk_lengths]
        ppl = {r["length"]: r["ppl"] for r in results["perplexity"].get(rope, [])}
        row += [f"{ppl[n]:.2f}" if n in ppl else "" for n in ppl_lengths]
        if results["niah"]:
            row.append(f"{results['niah'][rope]['mean_score']:.2f}" if rope in results["niah"] else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _write(out: Path, cfg: ml_collections.ConfigDict, results: dict[str, Any]) -> str:
    table = markdown_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(
        f"# {cfg.model} long-context suite\n\n{results['device']}, {results['date']}, "
        f"{results['seconds']['total']} s in all, peak RSS {results['peak_rss_gib']} GiB, "
        f"{results['compile']['compiled']} XLA programs compiled in {results['compile']['compile_seconds']} s "
        f"({results['compile']['cache_hits']} more from the disk cache)\n\n{table}\n"
    )
    _plot(out, results)
    return table


def run_suite(cfg: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    results: dict[str, Any] = {
        "model": cfg.model,
        "config": cfg.to_dict(),
        "device": f"{jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cores)",
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "passkey": {},
        "perplexity": {},
        "niah": {},
        "seconds": {},
    }
    code_ids = None
    if cfg.perplexity.lengths:
        text = texts.text_from(cfg.perplexity.input, "code")
        code_ids = np.array(tokenizer.encode(text))
    haystack = None
    if cfg.niah.lengths:
        haystack = texts.text_from(cfg.niah.haystack, "prose")

    with CompileStats() as stats:  # every compilation of the run, reported in results.json and results.md
        table = _run_variants(cfg, model, tokenizer, code_ids, haystack, out, results, started, stats, log)
    log(table)
    log(f"wrote {out}/results.md, results.json, perplexity.png, passkey.png")
    return results


def _run_variants(
    cfg: ml_collections.ConfigDict,
    model: Model,
    tokenizer: Any,
    code_ids: np.ndarray | None,
    haystack: str | None,
    out: Path,
    results: dict[str, Any],
    started: float,
    stats: CompileStats,
    log: Callable[[str], None],
) -> str:
    table = ""
    for rope in cfg.rope:
        # passkey trials and NIAH depths of one length share their prompts' beginnings: computed once
        engine = Engine(model_with_rope(model, rope), chunk_size=cfg.chunk_size, reuse_prefix=True)
        all_lengths = list(cfg.passkey.lengths) + list(cfg.niah.lengths) + list(cfg.perplexity.lengths)
        warning = context_warning(model, rope, all_lengths)
        if warning:
            log(warning)
        t0 = time.time()
        if cfg.passkey.lengths:
            bar = tqdm(total=len(cfg.passkey.lengths) * cfg.passkey.trials, desc=f"passkey [{rope}]", leave=False)
            depth = None if cfg.passkey.depth < 0 else cfg.passkey.depth
            acc, trials = passkey.run_passkey(
                engine,
                tokenizer,
                list(cfg.passkey.lengths),
                cfg.passkey.trials,
                depth,
                cfg.passkey.seed,
                progress=lambda _, bar=bar: bar.update(),
            )
            bar.close()
            results["passkey"][rope] = {str(n): a for n, a in acc.items()}
            results.setdefault("passkey_trials", {})[rope] = [t.__dict__ for t in trials]
            log(f"[{rope}] passkey accuracy: " + ", ".join(f"{n}: {a:.0%}" for n, a in acc.items()))
        if cfg.niah.lengths:
            grid = len(cfg.niah.lengths) * len(cfg.niah.depths)
            bar = tqdm(total=grid, desc=f"niah [{rope}]", leave=False)
            res = niah.run_niah(
                engine,
                tokenizer,
                haystack,
                list(cfg.niah.lengths),
                list(cfg.niah.depths),
                progress=lambda _, bar=bar: bar.update(),
            )
            bar.close()
            payload = niah.save_niah(res, out / f"niah_{rope.replace(':', '_')}", title=f"NIAH, RoPE {rope}")
            results["niah"][rope] = {k: payload[k] for k in ("lengths", "depths", "scores", "mean_score")}
            log(f"[{rope}] NIAH mean answer recall: {payload['mean_score']:.2f}")
        if cfg.perplexity.lengths:
            lengths = list(cfg.perplexity.lengths)
            rows = [r.to_dict() for r in perplexity.perplexity_vs_length(engine, code_ids, lengths)]
            results["perplexity"][rope] = rows
            log(f"[{rope}] perplexity: " + ", ".join(f"{r['length']}: {r['ppl']:.2f}" for r in rows))
        results["seconds"][rope] = round(time.time() - t0, 1)
        results["seconds"]["total"] = round(time.time() - started, 1)
        results["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        results["compile"] = stats.summary()
        table = _write(out, cfg, results)  # after every variant, so a long run keeps what it finished
    return table
