"""The grid runner: cells, resuming, reports and bad input, on a tiny random model with the real tokenizer.

The model is random (its scores mean nothing); what is tested is the bookkeeping: one JSON line per sample and
method, nothing recomputed on a second run, only new cells on an extended run, a half-written last line redone,
tables and plots written, and one-line errors before any compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lcm.evals import grid, report
from lcm.generate import Engine
from lcm.io import checkpoints
from lcm.io.tokenizer import load_tokenizer
from lcm.models.llama import LlamaConfig, abstract_model, map_params


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture
def tiny_model_loader(monkeypatch: pytest.MonkeyPatch, tokenizer):
    """``load_model`` returning a 1-layer random model over the real vocabulary, and the real tokenizer."""
    cfg = LlamaConfig(
        rms_norm_eps=1e-5,
        rope_base=100000.0,
        max_position_embeddings=8192,
        tie_embeddings=True,
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        attention_q_block=64,
        attention_kv_block=64,
    )
    rng = np.random.default_rng(0)
    model = map_params(abstract_model(cfg), lambda path, leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype))
    calls = []

    def load(spec, dtype="float32", progress=True):
        calls.append(spec)
        return model, tokenizer

    monkeypatch.setattr(checkpoints, "load_model", load)
    return calls


def _spec(tmp_path, **overrides) -> grid.GridSpec:
    values = dict(
        tasks=("passkey", "niah"),
        lengths=(256,),
        num_samples=2,
        batch_size=2,
        chunk_size=128,
        out_dir=str(tmp_path / "grid"),
    )
    return grid.GridSpec(**(values | overrides))


def test_grid_writes_one_row_per_sample_resumes_and_reports(tmp_path, tiny_model_loader) -> None:
    spec = _spec(tmp_path)
    summary = grid.run_grid(spec, log=lambda _: None)
    rows = grid.read_results(spec.out_dir)
    assert len(rows) == 4
    assert {(r["task"], r["index"]) for r in rows} == {(t, i) for t in ("passkey", "niah") for i in (0, 1)}
    assert all(0.0 <= r["score"] <= 1.0 and r["n_tokens"] <= 256 for r in rows)
    assert set(summary["scores"]) == {"passkey", "niah"}
    out = tmp_path / "grid"
    assert (out / "results.md").read_text().count("### ") == 3  # two tasks and the cost table
    assert (out / "summary.png").stat().st_size > 0 and (out / "heatmap_niah_depth.png").stat().st_size > 0

    def no_compute(*args, **kwargs):
        raise AssertionError("a finished sample was recomputed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "generate_many", no_compute)
        grid.run_grid(spec, log=lambda _: None)  # everything is done: nothing runs
    assert len(grid.read_results(spec.out_dir)) == 4

    computed = []
    original = Engine.generate_many

    def counting(self, prompts, *args, **kwargs):
        computed.append(len(prompts))
        return original(self, prompts, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "generate_many", counting)
        grid.run_grid(_spec(tmp_path, lengths=(256, 320)), log=lambda _: None)  # one new length: only its cells
    assert sum(computed) == 4
    rows = grid.read_results(spec.out_dir)
    assert len(rows) == 8 and sorted({r["length"] for r in rows}) == [256, 320]


def test_policies_and_budgets_are_cells_of_the_grid(tmp_path, tiny_model_loader) -> None:
    spec = _spec(
        tmp_path, tasks=("passkey",), lengths=(512,), policies=("full", "streamingllm:sinks=4", "h2o"), budgets=(0, 96)
    )
    assert [m.label for m in spec.methods()] == ["none", "none, streamingllm:sinks=4@96", "none, h2o@96"]
    grid.run_grid(spec, log=lambda _: None)
    rows = grid.read_results(spec.out_dir)
    assert len(rows) == 6
    kv = {r["policy"]: r["kv_bytes"] for r in rows}
    assert kv["streamingllm:sinks=4"] < kv["full"] and kv["h2o"] < kv["full"]  # budget + a chunk, not the prompt
    text = (tmp_path / "grid" / "results.md").read_text()
    assert "| none, h2o@96 |" in text and "### Cost per sample" in text
    assert (tmp_path / "grid" / "budget.png").stat().st_size > 0
    assert all(r["prefill_seconds"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)


def test_a_half_written_last_line_is_redone(tmp_path, tiny_model_loader) -> None:
    spec = _spec(tmp_path, tasks=("passkey",))
    grid.run_grid(spec, log=lambda _: None)
    path = tmp_path / "grid" / grid.RESULTS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed while writing the last sample
    assert len(grid.read_results(spec.out_dir)) == 1
    grid.run_grid(spec, log=lambda _: None)
    assert len(grid.read_results(spec.out_dir)) == 2


def test_batched_cells_score_as_unbatched(tmp_path, tiny_model_loader) -> None:
    """Samples of one cell differ in prompt length by a few tokens; left padding must change no output."""
    cell = {"tasks": ("niah_single_2", "qa"), "lengths": (400,), "num_samples": 3}
    one = grid.run_grid(_spec(tmp_path / "one", batch_size=1, **cell), log=lambda _: None)
    three = grid.run_grid(_spec(tmp_path / "three", batch_size=3, **cell), log=lambda _: None)
    rows_one = grid.read_results(tmp_path / "one" / "grid")
    rows_three = grid.read_results(tmp_path / "three" / "grid")
    assert len({r["n_tokens"] for r in rows_one}) > 2  # the prompts really differ in length
    key = lambda r: (r["task"], r["index"])  # noqa: E731
    assert [r["output"] for r in sorted(rows_one, key=key)] == [r["output"] for r in sorted(rows_three, key=key)]
    assert one["scores"] == three["scores"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": ("ruler_nope",)}, "unknown task 'ruler_nope'"),
        ({"tasks": ("file:/nonexistent.jsonl",)}, "no such JSONL file"),
        ({"policies": ("snapkv2",)}, "unknown KV policy 'snapkv2'"),
        ({"policies": ("snapkv",)}, "need a positive budget"),
        ({"policies": ("snapkv",), "budgets": (16,)}, "budget=16 is smaller than the 33 tokens"),
        ({"ropes": ("warp:factor=2",)}, "unknown rope variant 'warp'"),
        ({"lengths": (0,)}, "positive lengths"),
        ({"budgets": (512,)}, "need a KV policy other than `full`"),
    ],
)
def test_bad_grid_specs_are_one_line_errors(tmp_path, overrides, message) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        _spec(tmp_path, **overrides)


def test_a_length_below_a_task_minimum_fails_before_any_compute(tmp_path, tiny_model_loader, monkeypatch) -> None:
    monkeypatch.setattr(Engine, "generate_many", lambda *a, **k: pytest.fail("ran before validating"))
    with pytest.raises(ValueError, match="task 'passkey' at length 40: .*below"):
        grid.run_grid(_spec(tmp_path, lengths=(256, 40)), log=lambda _: None)


def test_markdown_tables_and_effective_length() -> None:
    def row(task: str, length: int, score: float) -> dict:
        return dict(
            model="m",
            task=task,
            length=length,
            rope="none",
            policy="full",
            budget=0,
            seed=0,
            index=0,
            metric="string_match_all",
            score=score,
            depth=None,
        )

    scores = {1024: (1.0, 0.9), 2048: (0.9, 0.85), 4096: (0.5, 0.7)}  # averages 0.95, 0.875, 0.6
    rows = [row(t, n, s[i]) for n, s in scores.items() for i, t in enumerate(("niah_single_1", "vt"))]
    text = report.markdown(rows)
    assert "| none | 95.0 | 87.5 | 60.0 | 2048 |" in text  # 87.5 > 85.6 at 2k, 60 < 85.6 at 4k
    assert "### vt (string_match_all x 100, 1 samples per cell)" in text
    assert "| none | 90.0 | 85.0 | 70.0 |" in text


def test_budget_table_pivots_policies_against_task_and_budget() -> None:
    def row(task: str, policy: str, budget: int, score: float, length: int = 2048) -> dict:
        return dict(task=task, length=length, rope="none", policy=policy, budget=budget, score=score)

    rows = [row("passkey", "full", 0, 1.0), row("niah", "full", 0, 0.5), row("passkey", "full", 0, 1.0, 4096)]
    rows += [row("passkey", "h2o", 256, 0.0), row("passkey", "h2o", 256, 1.0), row("niah", "h2o", 256, 0.25)]
    rows += [row("passkey", "h2o", 512, 1.0), row("niah", "h2o", 512, 0.75)]
    text = report.budget_table(rows)
    assert "### Score versus KV budget at 2048 tokens" in text and "4096" not in text  # no budgets at 4096
    assert "| policy | passkey 256 (12%) | passkey 512 (25%) | niah 256 (12%) | niah 512 (25%) |" in text
    assert "| full | 100 | 100 | 50 | 50 |" in text  # the full cache under every budget
    assert "| h2o | 50 | 100 | 25 | 75 |" in text  # means over samples
    assert report.budget_table([row("passkey", "full", 0, 1.0)]) == ""


def test_spec_from_config_rejects_unknown_fields() -> None:
    from lcm.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "eval_grid.py") + ":smoke")
    spec = grid.spec_from_config(cfg)
    assert spec.tasks == ("niah_single_1", "vt") and spec.depths is None
    cfg.unlock()
    cfg.lenghts = (1,)
    with pytest.raises(ValueError, match="unknown eval_grid field"):
        grid.spec_from_config(cfg)


def test_a_jsonl_file_runs_as_a_task_and_its_malformed_lines_are_counted(tmp_path, tiny_model_loader) -> None:
    fixture = Path(__file__).parent / "fixtures" / "longbench_mini.jsonl"
    good = fixture.read_text().splitlines()
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join([good[0], '{"context": "no input or answers"}', *good[1:3]]) + "\n")
    logged: list[str] = []
    with pytest.warns(UserWarning, match="mixed.jsonl:2: skipped"):
        grid.run_grid(_spec(tmp_path, tasks=(f"file:{data}",), num_samples=0), log=logged.append)
    assert any("1 malformed line(s) skipped" in line for line in logged)
    rows = grid.read_results(tmp_path / "grid")
    assert len(rows) == 3 and all(r["n_tokens"] <= 256 for r in rows)


def test_padding_changes_no_output_on_the_real_model(smollm2_gguf, tokenizer) -> None:
    """Three prompts of different lengths, batched (left-padded) and one by one, give the same greedy tokens."""
    from lcm.evals.registry import get_task

    model, _ = checkpoints.load_model(smollm2_gguf, progress=False)
    engine = Engine(model, chunk_size=256)
    cells = [("niah_single_2", 300), ("qa", 340), ("passkey", 260)]
    prompts = [list(get_task(task)(tokenizer, length, 1, seed=1)[0].ids) for task, length in cells]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    stop = list(tokenizer.eos_ids)
    batched = engine.generate_many(prompts, 12, stop, batch_size=3)
    alone = [engine.generate_many([p], 12, stop)[0] for p in prompts]
    for one, many in zip(alone, batched, strict=True):
        np.testing.assert_array_equal(one, many)


def test_the_cli_runs_a_grid_and_prints_json(tmp_path, tiny_model_loader, capsys, monkeypatch) -> None:
    from lcm import cli
    from lcm.io import compile_cache

    # `lcm` turns on JAX's process-wide disk cache; keep this test from changing what later tests see
    monkeypatch.setattr(compile_cache, "enable_compilation_cache", lambda *args, **kwargs: None)

    argv = ["eval", "grid", "--tasks", "passkey", "--lengths", "256", "--samples", "1", "--chunk-size", "128"]
    argv += ["--policy", "full", "--policy", "streamingllm", "--budget", "0,96", "--out", str(tmp_path), "--json"]
    assert cli.main(argv) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(payload["scores"]["passkey"]) == {"none", "none, streamingllm@96"}


def test_cost_table_leaves_out_samples_that_compiled() -> None:
    def row(prefill: float, compile_seconds: float | None, length: int = 2048) -> dict:
        r = dict(task="passkey", length=length, rope="none", policy="full", budget=0, kv_bytes=2**20)
        r |= dict(prefill_seconds=prefill, decode_ms_per_token=10 * prefill)
        return r if compile_seconds is None else r | {"compile_seconds": compile_seconds}

    rows = [row(9.0, 4.0), row(1.0, 0.0), row(2.0, 0.0)]  # the first sample paid 4 s of compiling
    rows += [row(5.0, 3.0, 4096), row(6.0, None, 4096)]  # a row without the field (older results) counts as warm
    rows += [row(7.0, 2.0, 8192)]  # a cell of compiling samples only keeps them
    text = report.cost_table(rows)
    assert "| none | 1.0 / 1.50 / 15 | 1.0 / 6.00 / 60 | 1.0 / 7.00 / 70 |" in text


def test_every_generated_task_marks_where_its_question_starts(tokenizer) -> None:
    """Each task's prompt splits into context and question at the question's first token, as kvpress splits its
    RULER prompts: the question text starts the second part, and the context holds none of it."""
    from lcm.evals import giraffe, niah, passkey, ruler
    from lcm.evals.registry import TASKS

    questions = {"passkey": passkey.QUESTION, "niah": niah.QUESTION, "lines": giraffe.LINES_QUESTION_START}
    questions |= {"freeform_qa": "Question:\n", "altered_numeric_qa": "Question:\n"}
    for name, task in TASKS.items():
        for chat in (True, False):
            sample = task(tokenizer, 1500, 1, seed=3, chat=chat)[0]
            at = sample.question_start
            assert at is not None and 0 < at < len(sample.ids), (name, chat)
            question = tokenizer.decode(sample.ids[at:], skip_special=False)
            context = tokenizer.decode(sample.ids[:at], skip_special=False)
            starts = questions.get(name) or ruler.TASKS[name].question
            starts = (starts,) if isinstance(starts, str) else starts
            assert question.lstrip().startswith(starts), (name, chat, question[:60])
            assert not any(s in question[1:] for s in starts)  # the last occurrence: none inside the question
            assert sample.references[0] not in question  # the answer lies in the context
            assert len(context) > 3 * len(question)


def test_question_start_is_none_where_the_text_does_not_encode_back(tokenizer) -> None:
    from lcm.evals.tasks import question_start

    ids = tokenizer.encode("Some context here. What is the pass key? The pass key is", add_special=False)
    at = question_start(tokenizer, ids, "What is")
    assert tokenizer.decode(ids[at:]) == " What is the pass key? The pass key is"  # " What" is one token
    assert tokenizer.decode(ids[:at]) == "Some context here."
    assert question_start(tokenizer, ids, "Nowhere") is None
    byte_split = tokenizer.encode("𝔸", add_special=False)  # one character over several byte tokens
    assert len(byte_split) > 1
    mangled = ids[:3] + byte_split[:1] + ids[3:]  # half a character: decodes to U+FFFD, re-encodes differently
    assert question_start(tokenizer, mangled, "What is") is None


def test_compression_ratio_and_question_apart_run_as_kvpress_does(tmp_path, tiny_model_loader, monkeypatch) -> None:
    """A ratio keeps int(n * (1 - r)) of the n compressed tokens (the context alone with the question apart), the
    question is fed after compression, and the rows say which setting produced them."""
    calls = []
    original = Engine.generate

    def recording(self, tokens, max_new_tokens, stop_ids=(), question=None):
        calls.append((self.policy.budget, tokens.shape[1], None if question is None else question.shape[1]))
        return original(self, tokens, max_new_tokens, stop_ids, question=question)

    monkeypatch.setattr(Engine, "generate", recording)
    spec = _spec(
        tmp_path,
        tasks=("passkey",),
        lengths=(512,),
        policies=("snapkv", "h2o"),
        budgets=(0,),
        compression_ratios=(0.5,),
        question_apart=True,
    )
    grid.run_grid(spec, log=lambda _: None)
    rows = grid.read_results(spec.out_dir)
    assert len(rows) == 4 and all(r["compression_ratio"] == 0.5 and r["question_apart"] for r in rows)
    for r in rows:
        context = r["n_tokens"] - r["question_tokens"]
        assert r["question_tokens"] > 5 and r["budget"] == int(context * 0.5)
        assert (r["budget"], context, r["question_tokens"]) in calls
    text = (tmp_path / "grid" / "results.md").read_text()
    assert "| none, snapkv@r=0.5, question apart |" in text and "passkey r=0.5" in text


def test_a_resumed_grid_reuses_only_rows_of_the_same_settings(tmp_path, tiny_model_loader) -> None:
    """Rows computed with another chat setting, dtype, chunk size or compression setting are not reused."""
    base = _spec(tmp_path, tasks=("niah_single_1",), policies=("full", "snapkv"), budgets=(0, 128))
    grid.run_grid(base, log=lambda _: None)
    assert len(grid.read_results(base.out_dir)) == 4
    for changed in ({"chat": False}, {"chunk_size": 64}, {"question_apart": True}, {"depths": (0.3,)}):
        logged: list[str] = []
        before = len(grid.read_results(base.out_dir))
        grid.run_grid(
            _spec(
                tmp_path,
                **({"tasks": ("niah_single_1",), "policies": ("full", "snapkv"), "budgets": (0, 128)} | changed),
            ),
            log=logged.append,
        )
        assert len(grid.read_results(base.out_dir)) == before + 4, changed
        assert not any("resuming" in line for line in logged), changed


def test_a_ratio_too_small_for_a_policy_fails_before_any_compute(tmp_path, tiny_model_loader, monkeypatch) -> None:
    monkeypatch.setattr(Engine, "generate_many", lambda *a, **k: pytest.fail("ran before validating"))
    spec = _spec(tmp_path, tasks=("passkey",), policies=("snapkv",), budgets=(0,), compression_ratios=(0.95,))
    with pytest.raises(ValueError, match=r"compression ratio 0.95 of 'snapkv': snapkv: budget=1[0-9] is smaller"):
        grid.run_grid(spec, log=lambda _: None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"policies": ("snapkv",), "compression_ratios": (1.0,)}, "strictly between 0 and 1"),
        ({"policies": ("snapkv",), "compression_ratios": (0.0,)}, "strictly between 0 and 1"),
        ({"compression_ratios": (0.5,)}, "need a KV policy other than `full`"),
    ],
)
def test_bad_compression_ratios_are_one_line_errors(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _spec(tmp_path, **overrides)


def test_the_budget_table_has_a_column_per_ratio() -> None:
    def row(policy: str, budget: int, ratio: float | None, score: float) -> dict:
        return dict(
            task="qa",
            length=4096,
            rope="none",
            policy=policy,
            budget=budget,
            compression_ratio=ratio,
            question_apart=ratio is not None,
            score=score,
        )

    rows = [row("full", 0, None, 1.0), row("snapkv", 1000, 0.75, 0.5), row("snapkv", 1010, 0.75, 0.0)]
    rows += [row("snapkv", 256, None, 0.25)]
    text = report.budget_table(rows)
    assert "| policy | qa 256 (6%) | qa r=0.75 |" in text
    assert "| snapkv, question apart |  | 25 |" in text and "| snapkv | 25 |  |" in text
