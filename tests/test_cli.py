"""The `lcm` command line: its contract (JSON last line, exit code 2 on bad input) and one real-model run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcm import cli
from lcm.config import load_config

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "perplexity", "--input", "nope.txt", "--length", "8"], "does not exist"),
        (["eval", "passkey", "--model", "/nonexistent/model.gguf", "--lengths", "64"], "not found"),
        (["eval", "passkey", "--rope", "warp:factor=2", "--lengths", "64"], "unknown rope variant 'warp'"),
        (["eval", "passkey", "--rope", "linear:scale=2", "--lengths", "64"], "scale"),
        (["eval", "passkey", "--rope", "linear:factor=2,layers=local", "--lengths", "64"], "layers='local'"),
        (
            ["eval", "passkey", "--rope", "linear:factor=2,layers=all,layers=all", "--lengths", "64"],
            "'layers' given twice",
        ),
        (["eval", "passkey", "--lengths", "64", "--trials", "0"], "--trials=0"),
        (["eval", "passkey", "--lengths", "64", "--depth", "1.5"], "--depth=1.5"),
        (["run", "configs/nope.py"], "does not exist"),
        (["eval", "grid", "--tasks", "nope", "--lengths", "512", "--out", "x"], "unknown task 'nope'"),
        (["eval", "grid", "--tasks", "vt", "--lengths", "512", "--policy", "magic", "--out", "x"], "unknown KV policy"),
        (["run", "configs/eval_grid.py:huge"], "unknown eval_grid variant 'huge'"),
        (["eval", "passkey", "--lengths", "64", "--policy", "streamingllm", "--budget", "3"], "budget=3 is smaller"),
        (["eval", "passkey", "--lengths", "64", "--policy", "h2o:recent=x", "--budget", "64"], "recent='x'"),
        (["run", "configs/quickstart.py", "--config.passkey.trails=3"], "unknown config field 'passkey.trails'"),
        (["run", "configs/quickstart.py", "--config.passkey.trials=many"], "expected a value of type int"),
        (["eval", "lines", "--trials", "2"], "exactly one of --lengths"),
        (["eval", "lines", "--lengths", "512", "--num-lines", "5"], "exactly one of --lengths"),
        (["eval", "lines", "--num-lines", "5", "--depth", "2"], "--depth=2"),
        (["eval", "grid", "--tasks", "vt", "--lengths", "512", "--compression-ratio", "0.5", "--out", "x"], "`full`"),
        (["eval", "passkey", "--rope", "selfextend:group=0", "--lengths", "64"], "group=0 must be an integer >= 1"),
        (["eval", "passkey", "--rope", "dca:chunk=100,window=60", "--lengths", "64"], "below chunk - window"),
        (["eval", "passkey", "--rope", "rerope:window=64,window=32", "--lengths", "64"], "given twice"),
        (
            ["eval", "passkey", "--rope", "selfextend", "--lengths", "64", "--policy", "h2o", "--budget", "64"],
            "does not combine with the position scheme 'selfextend'",
        ),
        (
            ["eval", "grid", "--tasks", "vt", "--lengths", "512", "--rope", "rerope", "--policy", "snapkv"]
            + ["--budget", "512", "--out", "x"],
            "does not combine with the position scheme 'rerope'",
        ),
        (["run", "configs/extrapolation_32k.py", "--config.methods=dca+tokenselect@2048"], "does not combine"),
        (["run", "configs/extrapolation_32k.py", "--config.methods=none+h2o"], "ROPE+POLICY@BUDGET"),
        (["run", "configs/extrapolation_32k.py", "--config.stages=nope"], "stage 'nope' is not defined"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], needle: str
) -> None:
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_BAD_INPUT
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_corrupt_gguf_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, _, err = run_cli(capsys, "eval", "passkey", "--model", str(bad), "--lengths", "64")
    assert code == cli.EXIT_BAD_INPUT
    assert "bad.gguf" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "passkey", "--lengths", "1k"],
        ["eval", "grid", "--tasks", "vt", "--lengths", "512", "--out", "x", "--compression-ratio", "1"],
        ["eval", "grid", "--tasks", "vt", "--lengths", "512", "--out", "x", "--compression-ratio", "half"],
        ["eval", "grid", "--tasks", "vt", "--lengths", "512", "--out", "x", "--compression-ratio", "nan"],
    ],
)
def test_argparse_rejects_bad_lists(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage, then its one-line error
    assert "error: argument" in last and ("--compression-ratio" in last) == ("--compression-ratio" in argv)


def test_configs_load_and_override() -> None:
    cfg = load_config(
        str(REPO / "configs/quickstart.py"), ["--config.passkey.lengths=512,1024", "--config.dtype=bfloat16"]
    )
    assert tuple(cfg.passkey.lengths) == (512, 1024) and cfg.dtype == "bfloat16"
    cpu = load_config(str(REPO / "configs/rope_16k.py:cpu"))
    assert cpu.passkey.trials == 1 and "yarn:factor=2" in cpu.rope
    # a spec's own parameters are comma-separated too: they stay with their spec
    specs = load_config(
        str(REPO / "configs/rope_16k.py"), ["--config.rope=none,yarn:factor=2,beta_fast=16,ntk:factor=4"]
    )
    assert tuple(specs.rope) == ("none", "yarn:factor=2,beta_fast=16", "ntk:factor=4")


def test_real_model_passkey_1k_2k_ten_of_ten(capsys: pytest.CaptureFixture[str], smollm2_gguf: Path) -> None:
    """The issue's bar, in CI: SmolLM2 with the full cache retrieves every passkey at 1k and 2k tokens."""
    code, out, _ = run_cli(
        capsys, "eval", "passkey", "--model", "smollm2", "--lengths", "1024,2048", "--trials", "10", "--json"
    )
    assert code == 0
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["accuracy"] == {"1024": 1.0, "2048": 1.0}, payload["outputs"]


def test_real_model_perplexity_json(capsys: pytest.CaptureFixture[str], smollm2_gguf: Path, tmp_path: Path) -> None:
    import inspect
    import typing

    text = tmp_path / "typing.py.txt"
    text.write_text(inspect.getsource(typing))
    code, out, _ = run_cli(
        capsys, "eval", "perplexity", "--model", "smollm2", "--input", str(text), "--length", "512", "--json"
    )
    assert code == 0
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["n_tokens"] == 511
    # Python source is easy for a code-trained model: a mean NLL between 0.5 and 4 nats is sane, 10.8 = uniform
    assert 0.5 < payload["nll"] < 4.0
    # Dual Chunk Attention within one chunk (512 < 6144 - 512) is plain RoPE through its own attention parts: the
    # same NLL to float32 round-off, and the JSON records the scheme with the defaults it resolved to for 8k
    argv = ["eval", "perplexity", "--model", "smollm2", "--input", str(text), "--length", "512", "--rope", "dca"]
    code, out, _ = run_cli(capsys, *argv, "--json")
    assert code == 0
    scheme = json.loads(out.strip().splitlines()[-1])
    assert scheme["rope"] == "dca:chunk=6144,window=512"
    assert abs(scheme["nll"] - payload["nll"]) < 1e-4


def test_real_model_lines_json(capsys: pytest.CaptureFixture[str], smollm2_gguf: Path) -> None:
    """`lcm eval lines`: the JSON contract, each trial's score recomputed from its output, the line counts asked."""
    import re

    code, out, _ = run_cli(capsys, "eval", "lines", "--num-lines", "4,8", "--trials", "2", "--seed", "3", "--json")
    assert code == 0
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["unit"] == "lines" and set(payload["accuracy"]) == {"4", "8"}
    for n in (4, 8):
        rows = [r for r in payload["outputs"] if r["meta"]["num_lines"] == n]
        assert len(rows) == 2
        for row in rows:  # LongChat's rule, independently: the first integer of the continuation is the value
            first = re.search(r"-?\d+", row["output"])
            assert row["score"] == float(first is not None and first.group() == row["references"][0])
        assert payload["accuracy"][str(n)] == sum(r["score"] for r in rows) / 2


def _config_variants() -> list[str]:
    """Every config file with each variant it names in its own "choose one of [...]" error."""
    import re

    specs = []
    for path in sorted((REPO / "configs").glob("*.py")):
        with pytest.raises(ValueError, match=r"choose one of \[") as err:  # a bad variant is never ignored
            load_config(f"{path}:no-such-variant")
        names = re.search(r"choose one of \[(.*)\]", str(err.value)).group(1)
        specs += [f"{path}:{n.strip().strip(chr(39))}" for n in names.split(",") if n.strip()] or [str(path)]
    return specs


@pytest.mark.parametrize("spec", _config_variants(), ids=lambda s: Path(s).name)
def test_every_config_variant_loads_and_names_a_job(spec: str) -> None:
    from lcm.evals.grid import spec_from_config

    cfg = load_config(spec)
    assert cfg.job in cli._jobs()
    if cfg.job == "eval_grid":
        spec_from_config(cfg)  # validates tasks, policies, budgets and lengths without loading a model


def test_policy_and_rope_registered_from_outside(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smollm2_gguf: Path
) -> None:
    """The README's own module, written to a folder of its own and imported by `--import`: its policy and RoPE
    variant run by name through `lcm eval passkey`, without editing lcm; the policy keeps the newest entries, so
    the budget holds and the needle at depth 0 is gone while one at depth 1 is found."""
    import sys

    from lcm.cache.policies import POLICIES
    from lcm.ops.rope import ROPE_VARIANTS

    readme = (REPO / "README.md").read_text()
    source = readme.split("# mypolicies.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mypolicies.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        results = {}
        for depth in ("0", "1"):
            argv = ["--import", "mypolicies", "eval", "passkey", "--model", "smollm2", "--lengths", "1024"]
            argv += ["--trials", "1", "--depth", depth, "--policy", "recent", "--budget", "256"]
            argv += ["--rope", "base_scaled:factor=1", "--json"]
            code, out, err = run_cli(capsys, *argv)
            assert code == 0, err
            results[depth] = json.loads(out.strip().splitlines()[-1])
        assert results["1"]["accuracy"] == {"1024": 1.0}, results["1"]
        assert results["0"]["accuracy"] == {"1024": 0.0}, results["0"]
        code, _, err = run_cli(capsys, "--import", "no_such_module_xyz", "eval", "passkey", "--lengths", "64")
        assert code == cli.EXIT_BAD_INPUT and "--import no_such_module_xyz" in err and len(err.splitlines()) == 1
    finally:
        POLICIES.pop("recent", None)
        ROPE_VARIANTS.pop("base_scaled", None)
        sys.modules.pop("mypolicies", None)


def test_library_warnings_print_as_one_line() -> None:
    from lcm import cli

    line = cli._one_line_warning(UserWarning("pyramidkv: this is SnapKV"), UserWarning, "/x/pyramidkv.py", 12)
    assert line == "lcm: warning: pyramidkv: this is SnapKV\n"
