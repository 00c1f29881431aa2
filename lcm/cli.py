"""``lcm``: the command line. Thin by design: every command calls functions that notebooks can import.

    lcm [--import MODULE ...] COMMAND ...   (MODULE registers its own KV policies / RoPE variants first)
    lcm run CONFIG[:ARG] [--config.x=y ...]
    lcm fetch-model NAME
    lcm eval perplexity --model M --input FILE --length N [--stride S] [--rope SPEC] [--json]
    lcm eval passkey --model M --lengths 2048,8192 --trials 10 [--depth 0.5] [--seed 0] [--rope SPEC]
        [--policy NAME[:k=v,...] --budget N] [--json]
    lcm eval lines --model M (--lengths 2048,4096 | --num-lines 100,200) --trials 10 [--depth 0.5] [--seed 0]
        [--rope SPEC] [--policy NAME[:k=v,...] --budget N] [--no-chat] [--json]
    lcm eval niah --model M --lengths ... --depths ... [--haystack FILE] --out DIR [--rope SPEC] [--json]
    lcm eval grid --model M --tasks T1,T2,file:X.jsonl --lengths ... [--rope SPEC ...] [--policy NAME ...]
        [--budget N,...] [--samples 5] [--batch-size 4] --out DIR [--json]
    lcm bench cpu-inference|prefill-breakdown [its own flags]   (needs a source checkout)

Bad input (unknown RoPE variant, missing parameter, corrupt checkpoint, missing file) is one line on stderr and
exit code 2. With ``--json`` the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """An error in what the user asked for: reported in one line, exit code 2."""


def int_list(text: str) -> list[int]:
    """Argparse type: comma-separated positive integers (``2048,8192``); the benchmarks' flags use it too."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0 or max(values) > 1:
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return values


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from lcm.cache.policies import parse_policy
    from lcm.evals.suite import context_warning, model_with_rope, parse_model_rope
    from lcm.generate import Engine
    from lcm.io.checkpoints import load_model
    from lcm.io.retaining import model_for_policy
    from lcm.ops.position_schemes import is_position_scheme

    if args.rope not in ("none", "default", ""):
        parse_model_rope(args.rope)  # fail on an unknown variant before loading weights
    policy = parse_policy(getattr(args, "policy", "full"), getattr(args, "budget", 0))
    if is_position_scheme(args.rope):
        policy.check_position_scheme(args.rope.partition(":")[0])
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model = model_for_policy(model_with_rope(model, args.rope), args.model, policy)  # heads after the RoPE swap
    lengths = getattr(args, "lengths", None) or [getattr(args, "length", 0)]
    warning = context_warning(model, args.rope, lengths)
    if warning:
        print(warning, file=sys.stderr)
    return model, tokenizer, Engine(model, chunk_size=args.chunk_size, policy=policy.with_tokenizer(tokenizer))


def _rope_record(args: argparse.Namespace, engine: Any) -> str:
    """The RoPE spec a result was produced under: a position scheme with its defaults resolved for the model (``dca``
    is recorded as ``dca:chunk=6144,window=512``), else the spec as given."""
    scheme = getattr(engine.config, "position_scheme", None)
    return args.rope if scheme is None else scheme.spec


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    print(human)
    if args.json:
        print(json.dumps(payload))


def cmd_perplexity(args: argparse.Namespace) -> None:
    import numpy as np

    from lcm.evals import perplexity, texts

    text = texts.read_text(args.input)
    _, tokenizer, engine = _load(args)
    ids = np.array(tokenizer.encode(text))
    if args.stride:
        result = perplexity.sliding_window_nll(engine, ids, args.length, args.stride)
    else:
        result = perplexity.prefix_nll(engine, ids, args.length)
    payload = {**result.to_dict(), "model": args.model, "rope": _rope_record(args, engine), "input": args.input}
    _emit(args, payload, f"nll {result.nll:.4f}  ppl {result.ppl:.3f}  over {result.n_tokens} predictions")


def cmd_passkey(args: argparse.Namespace) -> None:
    from lcm.evals import passkey

    _, tokenizer, engine = _load(args)
    engine.reuse_prefix = True  # trials share their prompts up to the needle; no time is reported
    acc, trials = passkey.run_passkey(
        engine,
        tokenizer,
        args.lengths,
        args.trials,
        args.depth,
        args.seed,
        filler=args.filler,
        needle=args.needle,
        question=args.question,
        progress=lambda t: print(
            f"  {t.length}: key {t.key} -> {t.output.strip()[:40]!r} {'ok' if t.correct else 'MISS'}", file=sys.stderr
        ),
    )
    payload = {
        "accuracy": {str(n): a for n, a in acc.items()},
        "trials": args.trials,
        "model": args.model,
        "rope": _rope_record(args, engine),
        "outputs": [t.__dict__ for t in trials],
    }
    _emit(args, payload, "passkey accuracy: " + ", ".join(f"{n}: {a:.0%}" for n, a in acc.items()))


def cmd_lines(args: argparse.Namespace) -> None:
    from lcm.evals import giraffe
    from lcm.evals.grid import Scored, run_samples

    if bool(args.lengths) == bool(args.num_lines):
        raise BadInput("give exactly one of --lengths (tokens, lines fitted) and --num-lines (lines, as Giraffe)")
    _, tokenizer, engine = _load(args)
    chat = not args.no_chat
    depths = None if args.depth is None else [args.depth]
    if args.lengths:
        cells = {n: giraffe.generate_lines(tokenizer, n, args.trials, args.seed, chat, depths) for n in args.lengths}
    else:  # no depth: a seeded random line per trial, as LongChat and Giraffe draw it
        cells = {
            n: [giraffe.lines_prompt(tokenizer, n, args.seed, i, chat, args.depth) for i in range(args.trials)]
            for n in args.num_lines
        }
    unit = "tokens" if args.lengths else "lines"

    def show(s: Scored) -> None:
        meta = s.sample.meta
        where = f"line {meta['line_index'] + 1}/{meta['num_lines']}, {len(s.sample.ids)} tokens"
        verdict = "ok" if s.score == 1.0 else "MISS"
        print(f"  {where}: {s.sample.references[0]} -> {s.output.strip()[:40]!r} {verdict}", file=sys.stderr)

    accuracy, outputs = {}, []
    for n, samples in cells.items():
        scored = run_samples(engine, tokenizer, samples, progress=show)
        accuracy[str(n)] = sum(s.score for s in scored) / len(scored)
        outputs += [s.sample.to_dict() | {"output": s.output, "score": s.score} for s in scored]
    payload = {
        "accuracy": accuracy,
        "unit": unit,
        "trials": args.trials,
        "model": args.model,
        "rope": _rope_record(args, engine),
        "policy": args.policy,
        "budget": args.budget,
        "outputs": outputs,
    }
    _emit(args, payload, f"lines accuracy by {unit}: " + ", ".join(f"{n}: {a:.0%}" for n, a in accuracy.items()))


def cmd_niah(args: argparse.Namespace) -> None:
    from lcm.evals import niah, texts

    haystack = texts.read_text(args.haystack) if args.haystack else texts.stdlib_prose()
    _, tokenizer, engine = _load(args)
    engine.reuse_prefix = True  # the depths of one length share their haystack up to the needle
    task = niah.NeedleTask(
        needle=args.needle, question=args.question, answer=args.answer, answer_prefix=args.answer_prefix
    )
    results = niah.run_niah(engine, tokenizer, haystack, args.lengths, args.depths, task=task)
    payload = niah.save_niah(results, args.out, title=f"NIAH {args.model}, RoPE {args.rope}")
    grid = "\n".join(
        f"depth {d:>4.0%}: " + "  ".join(f"{s:.2f}" for s in row)
        for d, row in zip(payload["depths"], payload["scores"], strict=True)
    )
    payload = {k: payload[k] for k in ("lengths", "depths", "scores", "mean_score")} | {"out": str(args.out)}
    _emit(args, payload, f"lengths {payload['lengths']}\n{grid}\nwrote {args.out}/niah.png and niah.json")


def str_list(text: str) -> list[str]:
    """Argparse type: a non-empty comma-separated list of names."""
    values = [s.strip() for s in text.split(",") if s.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _budgets(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"budgets must be token counts >= 0 (0 = full cache), got {text!r}")
    return values


def _ratios(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios in (0, 1), got {text!r}") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"compression ratios must lie strictly between 0 and 1, got {text!r}")
    return values


def cmd_grid(args: argparse.Namespace) -> None:
    from lcm.evals.grid import GridSpec, run_grid

    spec = GridSpec(
        model=args.model,
        tasks=tuple(args.tasks),
        lengths=tuple(args.lengths),
        ropes=tuple(args.rope or ["none"]),
        policies=tuple(args.policy or ["full"]),
        budgets=tuple(args.budget),
        compression_ratios=tuple(args.compression_ratio),
        question_apart=args.question_apart,
        num_samples=args.samples,
        seed=args.seed,
        depths=tuple(args.depths) if args.depths else None,
        batch_size=args.batch_size,
        chat=not args.no_chat,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        out_dir=args.out,
    )
    summary = run_grid(spec, log=lambda line: print(line, file=sys.stderr))
    _emit(args, summary, f"wrote {summary['results_md']}")


BENCHMARKS = {"cpu-inference": "cpu_inference.py", "prefill-breakdown": "prefill_breakdown.py"}


def cmd_bench(args: argparse.Namespace) -> None:
    """Run a script of ``benchmarks/`` (they live beside the package, in a source checkout) with its own flags."""
    import runpy

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    script = folder / BENCHMARKS[args.name]
    if not script.is_file():
        raise BadInput(f"lcm bench needs a source checkout: {script} does not exist")
    sys.argv = [f"lcm bench {args.name}", *args.rest]
    namespace = runpy.run_path(str(script))
    code = namespace["main"](list(args.rest))
    if code:
        raise SystemExit(code)


def cmd_fetch(args: argparse.Namespace) -> None:
    from lcm.io.fetch import model_path

    print(model_path(args.name, download=True))


JOBS: dict[str, Callable[..., Any]] = {}


def _jobs() -> dict[str, Callable[..., Any]]:
    from lcm.evals.extrapolation import run_extrapolation_job
    from lcm.evals.grid import run_grid_job
    from lcm.evals.suite import run_suite
    from lcm.train.locret_run import run_locret_job

    return {
        "long_context_suite": run_suite,
        "eval_grid": run_grid_job,
        "extrapolation": run_extrapolation_job,
        "locret_train": run_locret_job,
        **JOBS,
    }


def cmd_run(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    from lcm.config import load_config

    cfg = load_config(args.config, overrides)
    jobs = _jobs()
    if cfg.job not in jobs:
        raise BadInput(f"unknown job {cfg.job!r} in {args.config}; choose one of {sorted(jobs)}")
    jobs[cfg.job](cfg)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="registered name, a .gguf file or an HF folder")
    p.add_argument("--rope", default="none", help="none | VARIANT[:key=value,...], e.g. yarn:factor=2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk in tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    from lcm.cache.policies import POLICIES

    p.add_argument(
        "--policy",
        default="full",
        help=f"KV policy NAME[:k=v,...]: {', '.join(sorted(POLICIES))} (and any --import registers)",
    )
    p.add_argument("--budget", type=int, default=0, help="KV budget in tokens per layer and KV head (0 = full)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcm", description="long-context methods for LMs in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment config (--config.x=y overrides)")
    run.add_argument("config", help="path to a config file, optionally PATH:ARG")
    fetch = sub.add_parser("fetch-model", help="download a registered model into the cache")
    fetch.add_argument("name")
    bench = sub.add_parser("bench", help="run a benchmark of benchmarks/ (its flags follow its name)")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    ev = sub.add_parser("eval", help="run one evaluation")
    evs = ev.add_subparsers(dest="eval", required=True)

    p = evs.add_parser("perplexity", help="mean NLL of the first LENGTH tokens of a text")
    _add_model_args(p)
    p.add_argument("--input", required=True, help="UTF-8 text file")
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--stride", type=int, default=0, help="sliding-window evaluation of the whole text")
    p.set_defaults(func=cmd_perplexity)

    from lcm.evals import passkey as passkey_text

    p = evs.add_parser("passkey", help="passkey retrieval accuracy per length")
    _add_model_args(p)
    _add_policy_args(p)
    p.add_argument("--lengths", type=int_list, required=True)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--depth", type=float, default=None, help="needle depth in [0, 1]; default random per trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler", default=passkey_text.FILLER, help="filler sentence(s), repeated to the length")
    p.add_argument("--needle", default=passkey_text.NEEDLE, help="the needle line; must contain {key}")
    p.add_argument("--question", default=passkey_text.QUESTION, help="the question the answer continues")
    p.set_defaults(func=cmd_passkey)

    p = evs.add_parser("lines", help="LongChat-Lines (Giraffe) accuracy per length or per number of lines")
    _add_model_args(p)
    _add_policy_args(p)
    p.add_argument("--lengths", type=int_list, default=None, help="prompt lengths in tokens (lines fitted)")
    p.add_argument("--num-lines", type=int_list, default=None, help="numbers of lines (Giraffe's sweep)")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--depth", type=float, default=None, help="the asked line's depth in [0, 1]; default spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="a plain prompt, no chat template")
    p.set_defaults(func=cmd_lines)

    from lcm.evals.niah import ANSWER, ANSWER_PREFIX, NEEDLE, QUESTION

    p = evs.add_parser("niah", help="needle in a haystack over lengths x depths")
    _add_model_args(p)
    _add_policy_args(p)
    p.add_argument("--lengths", type=int_list, required=True)
    p.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--haystack", default="", help="text file (default: the Python reference docs)")
    p.add_argument("--out", required=True, help="folder for niah.png and niah.json")
    p.add_argument("--needle", default=NEEDLE)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--answer", default=ANSWER)
    p.add_argument("--answer-prefix", default=ANSWER_PREFIX)
    p.set_defaults(func=cmd_niah)

    p = evs.add_parser("grid", help="every task x length x RoPE x KV policy; resumable (results.jsonl)")
    p.add_argument("--model", default="smollm2", help="registered name, a .gguf file or an HF folder")
    p.add_argument("--tasks", type=str_list, required=True, help="task names or file:PATH.jsonl, comma-separated")
    p.add_argument("--lengths", type=int_list, required=True)
    p.add_argument("--rope", action="append", help="a RoPE spec; repeat the flag to compare several")
    p.add_argument("--policy", action="append", help="a KV policy NAME[:k=v,...]; repeat the flag for several")
    p.add_argument("--budget", type=_budgets, default=[0], help="KV budgets in tokens (0 = full cache)")
    p.add_argument(
        "--compression-ratio",
        type=_ratios,
        default=[],
        help="kvpress's compression ratios r, comma-separated: a policy keeps int(n * (1 - r)) of n prompt tokens",
    )
    p.add_argument(
        "--question-apart",
        action="store_true",
        help="append each task's question after compression, uncompressed (kvpress); default: compress it too",
    )
    p.add_argument("--samples", type=int, default=5, help="samples per (task, length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depths", type=_float_list, default=None, help="needle depths cycled over samples")
    p.add_argument("--batch-size", type=int, default=1, help="samples per prefill/decode batch")
    p.add_argument("--no-chat", action="store_true", help="plain prompts, no chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk in tokens")
    p.add_argument("--out", required=True, help="folder for results.jsonl, results.md and plots")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=cmd_grid)
    return parser


def import_modules(argv: list[str]) -> list[str]:
    """Import every ``--import MODULE`` (or ``--import=MODULE``) of ``argv``, anywhere in it, so that the KV
    policies and RoPE variants it registers are known when the rest is parsed; ``argv`` without them. The
    current directory is searched first, as ``python -m`` does."""
    import importlib

    rest, modules = [], []
    items = iter(argv)
    for item in items:
        if item == "--import":
            module = next(items, None)
            if module is None or module.startswith("-"):
                raise BadInput("--import needs a module name, e.g. --import mypkg.policies")
            modules.append(module)
        elif item.startswith("--import="):
            modules.append(item.split("=", 1)[1])
        else:
            rest.append(item)
    if modules and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise BadInput(f"--import {module}: {err}") from None
    return rest


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"lcm: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning  # a library warning (e.g. pyramidkv's fallback) is one stderr line
    try:
        argv = import_modules(argv)
    except (BadInput, ValueError, TypeError) as err:
        print(f"lcm: error: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_BAD_INPUT
    parser = build_parser()
    overrides = [a for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    try:
        if args.command == "fetch-model":
            cmd_fetch(args)
            return 0
        if args.command == "bench":
            cmd_bench(args)
            return 0
        from lcm.io.compile_cache import CompileStats, enable_compilation_cache

        enable_compilation_cache()
        stats = CompileStats()
        with stats:
            _dispatch(args, overrides)
        summary = stats.summary()
        print(
            f"lcm: compiled {summary['compiled']} XLA programs in {summary['compile_seconds']:.1f} s "
            f"({summary['cache_hits']} more loaded from the disk cache)",
            file=sys.stderr,
        )
    except (BadInput, ValueError, FileNotFoundError) as err:
        message = err.args[0] if err.args else str(err)
        print(f"lcm: error: {message}".splitlines()[0], file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _dispatch(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    if args.command == "run":
        cmd_run(args, overrides)
    else:
        if overrides:
            raise BadInput(f"--config.* overrides apply to `lcm run` only, got {overrides[0]!r}")
        if getattr(args, "trials", 1) <= 0:
            raise BadInput(f"--trials={args.trials} must be positive")
        if getattr(args, "depth", None) is not None and not 0 <= args.depth <= 1:
            raise BadInput(f"--depth={args.depth} must lie in [0, 1]")
        args.func(args)


if __name__ == "__main__":
    sys.exit(main())
