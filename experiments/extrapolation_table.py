"""The README's extrapolation table from the saved rows of ``configs/extrapolation_32k.py`` runs.

The job appends to ``experiments/results/extrapolation_32k/`` (``results.jsonl``, ``perplexity.jsonl``) as its stages
finish, over several sessions on a CPU; this script rewrites ``results.md``, ``passkey.png``/``passkey.json`` and
``summary.json`` there from whatever rows exist (``—`` where a cell is not measured yet), and with ``--readme`` the
table between the lines ``<!-- extrapolation table: begin -->`` and ``<!-- extrapolation table: end -->``.

    python experiments/extrapolation_table.py [RESULTS_DIR] [--readme README.md]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from lcm.evals import extrapolation
from lcm.evals.report import replace_between

BEGIN, END = "<!-- extrapolation table: begin -->", "<!-- extrapolation table: end -->"
TRAINED = 8192  # SmolLM2-135M's trained context


def _config_methods() -> list[str]:
    path = Path(__file__).resolve().parents[1] / "configs" / "extrapolation_32k.py"
    spec = importlib.util.spec_from_file_location("extrapolation_32k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [extrapolation.Method.parse(m).label for m in module.METHODS]


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the BEGIN and END lines replaced by ``block``."""
    return replace_between(text, BEGIN, END, block)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).parent / "results" / "extrapolation_32k"
    parser.add_argument("results", nargs="?", type=Path, default=default)
    parser.add_argument("--readme", type=Path, help="markdown file whose table block to rewrite")
    args = parser.parse_args(argv)
    if not (args.results / "results.jsonl").is_file():
        raise SystemExit(f"no results.jsonl in {args.results}")
    labels = _config_methods()
    extrapolation.write_report(args.results, labels, TRAINED, log=lambda line: None)
    block = extrapolation.markdown(extrapolation.summarise(args.results, labels), TRAINED)
    print(block)
    if args.readme is not None:
        args.readme.write_text(replace_block(args.readme.read_text(), block))


if __name__ == "__main__":
    main()
