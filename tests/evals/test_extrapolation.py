"""The extrapolation comparison job (lcm.evals.extrapolation): method specs, config checks before any load, the
table and plot from result rows, the length-limit warning, and (slow) the tiny config end to end with resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcm.config import load_config
from lcm.evals import extrapolation, grid
from lcm.evals.suite import context_warning
from lcm.models.llama import LlamaConfig, random_model

REPO = Path(__file__).resolve().parents[2]


def test_method_specs() -> None:
    assert extrapolation.Method.parse("selfextend") == extrapolation.Method("selfextend")
    method = extrapolation.Method.parse("none+tokenselect@2048")
    assert (method.rope, method.policy, method.budget) == ("none", "tokenselect", 2048)
    assert method.label == "none, tokenselect@2048"
    for bad in ("none+h2o", "none+h2o@0", "none+h2o@x"):
        with pytest.raises(ValueError, match="ROPE\\+POLICY@BUDGET"):
            extrapolation.Method.parse(bad)


def test_default_config_checks_and_depths() -> None:
    cfg = load_config(str(REPO / "configs/extrapolation_32k.py"), [])
    methods, stages = extrapolation.check_config(cfg)
    assert len(methods) == 8 and [s.name for s in stages][:2] == ["passkey_16k", "passkey_8k"]
    assert {(s.task, s.lengths, s.samples) for s in stages if s.task == "passkey"} == {
        ("passkey", (16384,), 10),
        ("passkey", (8192,), 10),
        ("passkey", (32768,), 5),
    }
    depths = extrapolation.passkey_depths(10, 0)
    assert depths == extrapolation.passkey_depths(10, 0) != extrapolation.passkey_depths(10, 1)
    assert all(0.0 <= d <= 1.0 for d in depths) and len(set(depths)) == 10
    cfg.unlock()
    cfg.methods = ("none", "none")
    with pytest.raises(ValueError, match="name one method twice"):
        extrapolation.check_config(cfg)


def _row(label_rope: str, task: str, length: int, index: int, score: float, policy: str = "full", budget: int = 0):
    key = {"model": "m", "task": task, "length": length, "rope": label_rope, "policy": policy, "budget": budget}
    return key | {"index": index, "score": score, "output": "x"}


def test_table_and_plot_from_rows(tmp_path: Path) -> None:
    rows = [
        _row("none", "passkey", 8192, 0, 1.0),
        _row("none", "passkey", 8192, 1, 0.0),
        _row("none", "passkey", 16384, 0, 0.0),
        _row("selfextend", "passkey", 8192, 0, 0.0),
        _row("selfextend", "passkey", 8192, 1, 0.0),
        _row("selfextend", "passkey", 16384, 0, 1.0),
        _row("selfextend", "vt", 16384, 0, 0.5),
        _row("none", "passkey", 16384, 1, 1.0, "tokenselect", 2048),
    ]
    (tmp_path / grid.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    (tmp_path / extrapolation.PERPLEXITY).write_text(json.dumps({"method": "selfextend", "length": 8192, "ppl": 9.5}))
    summary = extrapolation.write_report(tmp_path, ["none", "selfextend"], 8192, log=lambda _: None)
    assert list(summary) == ["none", "selfextend", "none, tokenselect@2048"]
    table = (tmp_path / "results.md").read_text()
    assert "| `none` | 1/2 | 0/1 | — | — | [1] (1 shared) |" in table
    assert "| `selfextend` | 0/2 | 1/1 | 9.50 | 50 (n=1) | [0, 1] (1 shared) |" in table
    assert "| `none, tokenselect@2048` | — | 1/1 | — | — | not run |" in table
    assert json.loads((tmp_path / "passkey.json").read_text())["selfextend"] == {"8192": 0.0, "16384": 1.0}
    assert (tmp_path / "passkey.png").stat().st_size > 10_000


def test_length_past_a_schemes_limit_warns() -> None:
    model = random_model(LlamaConfig.preset("smollm2-135m", num_layers=1, vocab_size=64), 0)
    warning = context_warning(model, "selfextend:group=2,window=1024", [32768])
    assert warning and "15360 tokens" in warning  # (8192 - 1024) * 2 + 1024
    assert context_warning(model, "selfextend:group=16,window=1024", [32768]) is None
    assert context_warning(model, "dca", [131072]) is None  # DCA has no limit


@pytest.mark.slow
def test_tiny_config_end_to_end_and_resume(tmp_path: Path, smollm2_gguf: Path) -> None:
    overrides = [f"--config.out_dir={tmp_path}", "--config.methods=none,selfextend:group=4,window=128"]
    cfg = load_config(str(REPO / "configs/extrapolation_32k.py:tiny"), overrides)
    summary = extrapolation.run_extrapolation_job(cfg, log=lambda _: None)
    assert set(summary) == {"none", "selfextend:group=4,window=128"}
    rows = (tmp_path / grid.RESULTS).read_text().splitlines()
    assert len(rows) == 2 * (2 * 2 + 1)  # two methods x (two passkey lengths x 2 trials + one task sample)
    extrapolation.run_extrapolation_job(cfg, log=lambda _: None)  # resumes: nothing new
    assert (tmp_path / grid.RESULTS).read_text().splitlines() == rows
