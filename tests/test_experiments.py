"""The scripts in experiments/ that assemble tables from committed records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trial(length: int, depth: float, correct: bool) -> dict:
    output = " 12345." if correct else " no"
    return {"length": length, "depth": depth, "key": 12345, "output": output, "correct": correct}


def test_rope_16k_table_merges_records_per_variant_and_length(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = _experiment("rope_16k_table")
    eight = {
        "date": "2026-12-02",
        "device": "cpu",
        "passkey_trials": {"yarn:factor=2": [_trial(8192, 0.5, True), _trial(8192, 0.25, False)]},
        "perplexity": {"yarn:factor=2": [{"length": 4096, "ppl": 8.5}, {"length": 8192, "ppl": 7.25}]},
        "seconds": {"yarn:factor=2": 600.0},
    }
    sixteen = {
        "date": "2026-12-03",
        "device": "cpu",
        "passkey_trials": {"yarn:factor=2": [_trial(16384, 0.75, True)]},
        "perplexity": {"yarn:factor=2": [{"length": 16384, "ppl": 6.375}]},
        "seconds": {"yarn:factor=2": 1200.0},
    }
    for name, record in (("yarn_8k", eight), ("yarn_16k", sixteen)):
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    table.main([str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| `yarn:factor=2` | 1/2 | 1/1 | 8.50 | 7.25 | 6.38 | 8k @ 0.25: 'no' |"
    assert out[-1] == "- `yarn:factor=2`: 30 min on cpu, 2026-12-02, 2026-12-03"
    # a variant that misses everything gets two examples and a count
    broken = {"passkey_trials": {"linear:factor=2": [_trial(8192, d / 10, False) for d in range(5)]}}
    (tmp_path / "linear_8k.json").write_text(json.dumps(broken))
    table.main([str(tmp_path)])
    row = capsys.readouterr().out.splitlines()[2]
    assert row == "| `linear:factor=2` | 0/5 | — | — | — | — | 8k @ 0.00: 'no'; 8k @ 0.10: 'no'; 3 more |"
    with pytest.raises(SystemExit, match="no records in"):
        table.main([str(tmp_path / "empty")])


def test_rope_16k_table_rewrites_only_the_readme_block(tmp_path: Path) -> None:
    table = _experiment("rope_16k_table")
    record = {"passkey_trials": {"ntk:factor=2": [_trial(16384, 0.5, True)]}, "seconds": {"ntk:factor=2": 60.0}}
    (tmp_path / "ntk_16k.json").write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.BEGIN}\nold table\n{table.END}\noutro\n")
    table.main([str(tmp_path), "--readme", str(readme)])
    lines = readme.read_text().splitlines()
    assert lines[:2] == ["intro", table.BEGIN] and lines[-2:] == [table.END, "outro"]
    assert "old table" not in lines and "| `ntk:factor=2` | — | 1/1 | — | — | — | — |" in lines
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="need exactly one"):
        table.main([str(tmp_path), "--readme", str(readme)])


def test_committed_rope_16k_records_are_read() -> None:
    table = _experiment("rope_16k_table")
    records = [json.loads(p.read_text()) for p in sorted((ROOT / "experiments/results/rope_16k").glob("*.json"))]
    merged = table.merge(records)
    assert "none" in merged and len(merged["none"]["trials"][8192]) == 10


def test_passkey_vs_transformers_rejects_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    script = _experiment("passkey_vs_transformers")
    with pytest.raises(SystemExit):
        script.main(["--length", "0"])
    assert "need a positive --length and --max-new-tokens and a non-negative --trial" in capsys.readouterr().err


def test_greedy_ids_compare_reports_every_difference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    greedy = _experiment("greedy_ids")
    row = {"task": "passkey", "length": 2048, "policy": "full", "budget": 0, "index": 0, "prompt_sha256": "ab"}
    before = [row | {"ids": [1, 2, 3], "text": "a"}, row | {"index": 1, "ids": [4], "text": "b"}]
    same = tmp_path / "same.jsonl"
    for path, rows in ((tmp_path / "before.jsonl", before), (same, before)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert greedy.compare(tmp_path / "before.jsonl", same) == 0
    after = [row | {"ids": [1, 2, 4], "text": "c"}, row | {"index": 2, "ids": [4], "text": "b"}]
    (tmp_path / "after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after))
    assert greedy.compare(tmp_path / "before.jsonl", tmp_path / "after.jsonl") == 1
    out = capsys.readouterr().out
    assert "ids differ at step 2" in out and "only in before" in out and "only in after" in out
    assert "0 of 1 cases identical" in out


HLO = """HloModule jit_{name}, is_scheduled=true

FileNames
1 "{file}"

StackFrames
1 {{file_name_id=1 function_name_id=1}}

%fused (p: f32[4]) -> f32[4] {{
  %p = f32[4]{{0}} parameter(0), metadata={{op_name="{op}" stack_frame_id=1}}
  ROOT %r = f32[4]{{0}} {instr}(%p), metadata={{op_name="{op}"}}
}}

ENTRY %main (x: f32[4]) -> f32[4] {{
  ROOT %c = f32[4]{{0}} fusion(%x), kind=kLoop, calls=%fused
}}
"""


def test_hlo_identity_ignores_metadata_but_sees_every_instruction(tmp_path: Path, capsys) -> None:
    hlo = _experiment("hlo_identity")
    base = HLO.format(name="a", file="/x/a.py", op="jit(f)/exp", instr="exponential")
    moved = HLO.format(name="b", file="/y/b.py", op="jit(g)/exp", instr="exponential")  # only tables/metadata differ
    changed = HLO.format(name="a", file="/x/a.py", op="jit(f)/exp", instr="negate")  # a computation differs
    assert hlo.normalise(base) == hlo.normalise(moved)
    assert hlo.normalise(base) != hlo.normalise(changed)  # the tables are cut, not what follows them
    for folder, text in (("before", base), ("same", moved), ("after", changed)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "p_decode_block.hlo").write_text(text)
        (tmp_path / folder / "ids.json").write_text('{"p": [[1, 2]]}')
    assert hlo.compare(tmp_path / "before", tmp_path / "same") == 0
    assert hlo.compare(tmp_path / "before", tmp_path / "after") == 1
    assert "DIFFERENT  p_decode_block.hlo" in capsys.readouterr().out


def test_gemma3_passkey_parity_rejects_bad_arguments(tmp_path: Path) -> None:
    script = _experiment("gemma3_passkey_parity")
    for bad in (["--trials", "0"], ["--length", "-1"], ["--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as err:
            script.main([*bad, *([] if "--out" in bad else ["--out", str(tmp_path / "x.jsonl")])])
        assert err.value.code == 2


@pytest.mark.slow
@pytest.mark.parity
def test_gemma3_greedy_passkey_ids_equal_transformers_at_4k(tmp_path: Path, gemma3_gguf: Path) -> None:
    """[M]'s must-show: ten passkey prompts at 4k, lcm's greedy ids equal transformers' (~10 min on 2 cores)."""
    script = _experiment("gemma3_passkey_parity")
    out = tmp_path / "parity.jsonl"
    assert script.main(["--length", "4096", "--trials", "10", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 10


def test_extrapolation_table_rewrites_the_readme_block_from_rows(tmp_path: Path) -> None:
    table = _experiment("extrapolation_table")
    rows = [
        {"model": "m", "task": "passkey", "length": 16384, "rope": "selfextend", "policy": "full", "budget": 0}
        | {"index": i, "score": float(i != 1), "output": "x"}
        for i in range(3)
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.BEGIN}\nold\n{table.END}\nafter\n")
    table.main([str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{table.END}\nafter\n") and "old" not in text
    assert "| `selfextend` | 2/3 | not run |" in text
    assert (tmp_path / "passkey.png").is_file()
