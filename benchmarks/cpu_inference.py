"""CPU inference benchmark: lcm against ``transformers`` on the real SmolLM2 GGUF, float32, same machine, same run.

    python benchmarks/cpu_inference.py [--lengths 1024,2048,4096,8192,16384] [--decode-lengths 2048,8192,16384]
        [--decode-steps 32] [--engines lcm,lcm-xla,transformers] [--out BENCHMARKS.md] [--json FILE]
    lcm bench cpu-inference [same options]

Engines: ``lcm`` (the model's default attention, ``"auto"``: the CPU FFI kernel for prefill chunks and, since
2026-12-01, decode steps), ``lcm-xla`` (the XLA path everywhere, as before the kernel) and ``transformers``.
Every (engine, length) cell runs in its own subprocess, one at a time, so peak RSS is that cell's alone and no
engine's threads or caches disturb another's. A cell loads the model, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), then:

- prefill: the first ``L`` tokens of a fixed prose text, logits at the last position only
  (``logits_to_keep=1`` for transformers, ``Engine.prefill`` for lcm). transformers gets a 128-token warm-up
  call first; lcm runs the prefill twice and the second run is timed. lcm's compile time (tracing, lowering
  and XLA compilation of every program of the cell, prefill and decode) is summed from JAX's monitoring
  events, with the persistent compilation cache off;
- decode: ``--decode-steps`` greedy tokens from that prefilled cache, ms/token averaged over the steps after
  the first (whose time holds lcm's compile);
- peak RSS of the cell after the model was loaded (weights included).

Achieved GFLOP/s count the multiply-adds of a causal prefill (linear layers over ``L`` tokens, attention over
``L(L+1)/2`` query-key pairs, the LM head at one position) and are set against the float32 matmul peak of
this machine, measured in the same run with the issue's shapes ``(4096x576)@(576x1536)`` in XLA and torch.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lcm.cli import int_list, str_list

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2"
WARMUP_TOKENS = 128


def _peak_rss_reset() -> None:
    """Reset VmHWM so the peak counts from here on (Linux >= 4.0; elsewhere the peak includes loading)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prompt_tokens(tokenizer: Any, length: int) -> list[int]:
    from lcm.evals.texts import stdlib_prose

    ids = tokenizer.encode(stdlib_prose())
    if len(ids) < length:
        raise ValueError(f"the benchmark text has {len(ids)} tokens, fewer than the requested {length}")
    return ids[:length]


def prefill_flops(cfg: Any, length: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of a causal prefill of ``length`` tokens with logits at one position."""
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    linear = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f  # q, k, v, o, gate/up/down
    attention_pairs = length * (length + 1) / 2
    per_layer = 2 * linear * length + 2 * 2 * h * hd * attention_pairs  # QK^T and PV
    return cfg.num_layers * per_layer + 2 * d * cfg.vocab_size


def matmul_peak() -> dict[str, float]:
    """Best-of-10 GFLOP/s of a float32 (4096x576)@(576x1536) matmul, in XLA and in torch (all cores)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    flops = 2 * 4096 * 576 * 1536
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4096, 576), np.float32), rng.standard_normal((576, 1536), np.float32)
    matmul = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    matmul(ja, jb).block_until_ready()
    best = {"xla": float("inf"), "torch": float("inf")}
    for _ in range(10):
        start = time.perf_counter()
        matmul(ja, jb).block_until_ready()
        best["xla"] = min(best["xla"], time.perf_counter() - start)
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        for _ in range(10):
            start = time.perf_counter()
            torch.matmul(ta, tb)
            best["torch"] = min(best["torch"], time.perf_counter() - start)
    except ImportError:
        pass
    return {k: flops / v / 1e9 for k, v in best.items() if v < float("inf")}


def _cell_lcm(length: int, decode_steps: int, attention: str = "auto") -> dict[str, Any]:
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model
    from lcm.io.compile_cache import CompileStats

    model, tokenizer = load_model(MODEL, progress=False)
    model.config = dataclasses.replace(model.config, attention_implementation=attention)
    tokens = np.asarray([prompt_tokens(tokenizer, length)], np.int32)
    engine = Engine(model)
    gc.collect()
    _peak_rss_reset()
    stats = CompileStats()
    with stats:
        times, cache = [], None
        for _ in range(2):
            del cache  # the first run's cache goes before the second is allocated: one cache alive at a time
            cache = engine.new_cache(1, length + decode_steps)
            start = time.perf_counter()
            logits, cache = engine.prefill(tokens, cache)
            logits.block_until_ready()
            times.append(time.perf_counter() - start)
        result: dict[str, Any] = {
            "prefill_s": times[1],
            "first_run_s": times[0],
            "first_token": int(jnp.argmax(logits[0])),
        }
        if decode_steps:
            # one step first (it compiles the decode program), then the timed steps from the cache it returns
            first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            warm, cache = engine.decode(first, length, cache, 2)
            start = time.perf_counter()
            rest, cache = engine.decode(jnp.asarray(warm[:, -1]), length + 1, cache, decode_steps)
            result["decode_ms"] = 1e3 * (time.perf_counter() - start) / (decode_steps - 1)
            result["decode_tokens"] = [int(t) for t in (*warm[0], *rest[0, 1:])]
    result["peak_rss_gib"] = _peak_rss_gib()
    result["compile_s"] = stats.seconds  # tracing + lowering + XLA compile of every program, from JAX's events
    result["programs"] = stats.programs
    return result


def _cell_transformers(length: int, decode_steps: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from lcm.io.fetch import model_path
    from lcm.io.tokenizer import load_tokenizer

    path = model_path(MODEL)
    # the same token ids for both engines, from the GGUF's tokenizer alone: no lcm weights, no JAX in this process
    ids = torch.tensor([prompt_tokens(load_tokenizer(path), length)])
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    gc.collect()
    _peak_rss_reset()
    with torch.inference_mode():
        model(ids[:, :WARMUP_TOKENS], logits_to_keep=1)
        start = time.perf_counter()
        out = model(ids, logits_to_keep=1, use_cache=True)
        result: dict[str, Any] = {"prefill_s": time.perf_counter() - start}
        token = out.logits[:, -1].argmax(-1)
        result["first_token"] = int(token[0])
        if decode_steps:
            past, step_times, tokens = out.past_key_values, [], [int(token[0])]
            for _step in range(decode_steps):
                start = time.perf_counter()
                out = model(token[:, None], past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
                step_times.append(time.perf_counter() - start)
                tokens.append(int(token[0]))
            result["decode_ms"] = 1e3 * float(np.mean(step_times[1:]))
            result["decode_tokens"] = tokens
    result["peak_rss_gib"] = _peak_rss_gib()
    return result


def _cell_lcm_xla(length: int, decode_steps: int) -> dict[str, Any]:
    return _cell_lcm(length, decode_steps, attention="xla")


CELLS = {"lcm": _cell_lcm, "lcm-xla": _cell_lcm_xla, "transformers": _cell_transformers}


def run_cell(engine: str, length: int, decode_steps: int) -> dict[str, Any]:
    """One (engine, length) cell in a fresh interpreter; its JSON result is the last line of its stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", engine, str(length), str(decode_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} at {length} tokens failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        out["lcm"] = rev.stdout.strip() or "unknown"
    except OSError:
        out["lcm"] = "unknown"
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
                return f"{name}, {os.cpu_count()} cores, {isa}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _fmt(cell: dict[str, Any], key: str, spec: str) -> str:
    return format(cell[key], spec) if key in cell else "—"


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if key in a and key in b else "—"


def _agreeing_tokens(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How many greedy tokens (first from prefill, then decoded) the two engines share before they differ."""
    if "first_token" not in a or "first_token" not in b:
        return "—"
    xs = [a["first_token"], *a.get("decode_tokens", [])[1:]]
    ys = [b["first_token"], *b.get("decode_tokens", [])[1:]]
    n = min(len(xs), len(ys))
    same = next((i for i in range(n) if xs[i] != ys[i]), n)
    return f"{same}/{n}"


def median_cell(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's runs of a cell as one: the run of median prefill time, with the median decode time and every
    run's prefill seconds (``prefill_runs``) when there was more than one."""
    ordered = sorted(cells, key=lambda c: c["prefill_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    if len(cells) > 1:
        out["prefill_s"] = statistics.median(c["prefill_s"] for c in cells)
        out["prefill_runs"] = [round(c["prefill_s"], 2) for c in cells]
        decode = [c["decode_ms"] for c in cells if "decode_ms" in c]
        if decode:
            out["decode_ms"] = statistics.median(decode)
    return out


def markdown(report: dict[str, Any]) -> str:
    peak = report["matmul_peak_gflops"]
    lines = [
        f"### CPU inference, SmolLM2-135M f32 — {report['date']}",
        "",
        f"- device: {report['device']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- f32 matmul peak (4096x576)@(576x1536), best of 10: XLA {peak.get('xla', 0):.0f} GFLOP/s, "
        f"torch {peak.get('torch', 0):.0f} GFLOP/s",
        f"- shapes: batch 1, {report['config']}; prefill = last-position logits; decode = {report['decode_steps']}"
        " greedy steps, mean of steps 2..N; each cell a fresh process, peak RSS after load (weights included)",
        f"- command: `{report['command']}`",
        "",
        "| tokens | lcm prefill s | transformers prefill s | lcm / transformers | lcm GFLOP/s (% of XLA peak) "
        "| transformers GFLOP/s | lcm compile s | lcm decode ms/tok | transformers decode ms/tok | decode ratio "
        "| lcm peak RSS GiB | transformers peak RSS GiB | same greedy tokens "
        "| lcm-xla prefill s | lcm-xla / transformers | lcm-xla decode ms/tok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lcm, hf, xla = row.get("lcm", {}), row.get("transformers", {}), row.get("lcm-xla", {})
        rate = {name: row["flops"] / cell["prefill_s"] / 1e9 for name, cell in (("lcm", lcm), ("hf", hf)) if cell}
        lcm_rate = f"{rate['lcm']:.0f} ({100 * rate['lcm'] / peak['xla']:.0f}%)" if "lcm" in rate else "—"
        hf_rate = f"{rate['hf']:.0f}" if "hf" in rate else "—"
        cells = [
            str(row["length"]),
            _fmt(lcm, "prefill_s", ".2f"),
            _fmt(hf, "prefill_s", ".2f"),
            _ratio(lcm, hf, "prefill_s"),
            lcm_rate,
            hf_rate,
            _fmt(lcm, "compile_s", ".1f"),
            _fmt(lcm, "decode_ms", ".0f"),
            _fmt(hf, "decode_ms", ".0f"),
            _ratio(lcm, hf, "decode_ms"),
            _fmt(lcm, "peak_rss_gib", ".2f"),
            _fmt(hf, "peak_rss_gib", ".2f"),
            _agreeing_tokens(lcm, hf),
            _fmt(xla, "prefill_s", ".2f"),
            _ratio(xla, hf, "prefill_s"),
            _fmt(xla, "decode_ms", ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    runs = [
        f"{row['length']}: lcm {row['lcm']['prefill_runs']} s, transformers {row['transformers']['prefill_runs']} s"
        for row in report["rows"]
        if "prefill_runs" in row.get("lcm", {}) and "prefill_runs" in row.get("transformers", {})
    ]
    if runs:
        lines += ["", "Medians of alternating runs; every run's prefill, in order: " + "; ".join(runs) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcm bench cpu-inference", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int_list, default="1024,2048,4096,8192,16384")
    parser.add_argument("--decode-lengths", type=int_list, default="2048,8192,16384")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument(
        "--reps", type=int, default=1, help="runs of each cell, the engines alternating; the table shows medians"
    )
    parser.add_argument("--engines", type=str_list, default="lcm,transformers")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file the table is appended to")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--cell", nargs=3, metavar=("ENGINE", "LENGTH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        engine, length, steps = args.cell[0], int(args.cell[1]), int(args.cell[2])
        print(json.dumps(CELLS[engine](length, steps)))
        return 0

    engines = args.engines
    for engine in engines:
        if engine not in CELLS:
            parser.error(f"unknown engine {engine!r}; choose from {sorted(CELLS)}")
    lengths, decode_lengths = args.lengths, set(args.decode_lengths)
    if args.decode_steps < 2:
        parser.error(f"--decode-steps={args.decode_steps}: need at least 2 (the first step holds the compile)")
    if args.reps < 1:
        parser.error(f"--reps={args.reps}: need at least 1")

    from lcm.io.fetch import model_path
    from lcm.models.llama import LlamaConfig

    model_path(MODEL)  # fetch once, outside the timed cells
    cfg = LlamaConfig.preset("smollm2-135m")  # SmolLM2's shapes are the config defaults
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": _cpu_name(),
        "versions": _versions(),
        "matmul_peak_gflops": matmul_peak(),
        "config": f"{cfg.num_layers} layers, d={cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads",
        "decode_steps": args.decode_steps,
        "command": "python benchmarks/cpu_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": [],
    }
    for length in lengths:
        row: dict[str, Any] = {"length": length, "flops": prefill_flops(cfg, length)}
        steps = args.decode_steps if length in decode_lengths else 0
        runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in engines}
        for rep in range(args.reps):  # alternating order, so a slow minute of a shared machine hits both engines
            for engine in engines if rep % 2 == 0 else engines[::-1]:
                runs[engine].append(run_cell(engine, length, steps))
                shown = {k: v for k, v in runs[engine][-1].items() if k != "decode_tokens"}
                print(f"{engine:12s} {length:6d}: {json.dumps(shown)}", flush=True)
        row |= {engine: median_cell(cells) for engine, cells in runs.items()}
        report["rows"].append(row)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    table = markdown(report)
    print(table)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
