"""The README's RoPE-scaling table from the records of ``configs/rope_16k.py`` runs.

A CPU session runs one RoPE variant and one length at a time (see ``configs/rope_16k.py``) and copies its
``results.json`` to ``experiments/results/rope_16k/<variant>_<length>.json``; this script merges whatever records
exist into one markdown table (``—`` where a cell was not measured yet) with each trial's misses listed, and the
wall time each variant's runs took. ``--readme`` writes both into a markdown file between the lines
``<!-- rope_16k table: begin -->`` and ``<!-- rope_16k table: end -->`` (the README's), leaving the prose around them.

    python experiments/rope_16k_table.py [RECORDS_DIR] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lcm.evals.report import replace_between

VARIANTS = ("none", "linear:factor=2", "ntk:factor=2", "dynamic:factor=2", "yarn:factor=2")
PASSKEY_LENGTHS = (8192, 16384)
PPL_LENGTHS = (4096, 8192, 16384)
BEGIN, END = "<!-- rope_16k table: begin -->", "<!-- rope_16k table: end -->"


def merge(records: list[dict]) -> dict[str, dict]:
    """Per RoPE spec: passkey trials by length, perplexity by length, seconds, dates, devices."""
    table: dict[str, dict] = {}
    for record in records:
        for spec, trials in record.get("passkey_trials", {}).items():
            cell = table.setdefault(spec, {"trials": {}, "ppl": {}, "seconds": 0.0, "dates": set(), "devices": set()})
            for trial in trials:
                cell["trials"].setdefault(trial["length"], []).append(trial)
        for spec, rows in record.get("perplexity", {}).items():
            cell = table.setdefault(spec, {"trials": {}, "ppl": {}, "seconds": 0.0, "dates": set(), "devices": set()})
            cell["ppl"].update({row["length"]: row["ppl"] for row in rows})
        for spec, seconds in record.get("seconds", {}).items():
            if spec in table:
                table[spec]["seconds"] += seconds
                table[spec]["dates"].add(record.get("date", "?"))
                table[spec]["devices"].add(record.get("device", "?"))
    return table


def markdown(table: dict[str, dict]) -> str:
    head = [f"passkey {n}" for n in PASSKEY_LENGTHS] + [f"ppl {n}" for n in PPL_LENGTHS]
    lines = ["| RoPE (factor 2) | " + " | ".join(head) + " | misses (depth: answer) |", "|---" * (len(head) + 2) + "|"]
    for spec in sorted(table, key=lambda s: VARIANTS.index(s) if s in VARIANTS else len(VARIANTS)):
        cell = table[spec]
        passkey = []
        for n in PASSKEY_LENGTHS:
            trials = cell["trials"].get(n, [])
            passkey.append(f"{sum(t['correct'] for t in trials)}/{len(trials)}" if trials else "—")
        ppl = [f"{cell['ppl'][n]:.2f}" if n in cell["ppl"] else "—" for n in PPL_LENGTHS]
        misses = [
            f"{n // 1024}k @ {t['depth']:.2f}: {t['output'].strip().splitlines()[0][:30]!r}"
            for n in PASSKEY_LENGTHS
            for t in cell["trials"].get(n, [])
            if not t["correct"]
        ]
        if len(misses) > 2:  # a broken variant misses everything: two examples say how
            misses = [*misses[:2], f"{len(misses) - 2} more"]
        lines.append(f"| `{spec}` | " + " | ".join(passkey + ppl) + f" | {'; '.join(misses) or '—'} |")
    return "\n".join(lines)


def timings(table: dict[str, dict]) -> str:
    lines = []
    for spec in sorted(table, key=lambda s: VARIANTS.index(s) if s in VARIANTS else len(VARIANTS)):
        cell = table[spec]
        devices, dates = ", ".join(sorted(cell["devices"])), ", ".join(sorted(cell["dates"]))
        lines.append(f"- `{spec}`: {cell['seconds'] / 60:.0f} min on {devices}, {dates}")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the BEGIN and END lines replaced by ``block``."""
    return replace_between(text, BEGIN, END, block)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="?", type=Path, default=Path(__file__).parent / "results" / "rope_16k")
    parser.add_argument("--readme", type=Path, help="markdown file whose table block to rewrite")
    args = parser.parse_args(argv)
    paths = sorted(args.records.glob("*.json"))
    if not paths:
        raise SystemExit(f"no records in {args.records}")
    table = merge([json.loads(p.read_text()) for p in paths])
    block = f"{markdown(table)}\n\nWall time of each variant's runs:\n\n{timings(table)}"
    print(block)
    if args.readme is not None:
        args.readme.write_text(replace_block(args.readme.read_text(), block))


if __name__ == "__main__":
    main()
