"""Evals: prompt builders (passkey, NIAH) on the real tokenizer, and perplexity definitions on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from lcm.evals import niah, passkey, perplexity, texts
from lcm.generate import Engine
from lcm.io.tokenizer import load_tokenizer
from lcm.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def tiny_engine() -> Engine:
    cfg = LlamaConfig(
        rms_norm_eps=1e-5,
        rope_base=100000.0,
        max_position_embeddings=8192,
        tie_embeddings=True,
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    return Engine(Llama(cfg, rngs=nnx.Rngs(0)), chunk_size=16)


@pytest.mark.parametrize("length", [200, 1024, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt_fits_and_hides_the_key_at_depth(tokenizer, length: int, depth: float) -> None:
    prompt = passkey.build_prompt(tokenizer, length, key=48213, depth=depth)
    assert length - 40 <= len(prompt.ids) <= length  # filler granularity is ~25 tokens
    text = tokenizer.decode(prompt.ids)
    needle = passkey.NEEDLE.format(key=48213)
    assert text.count(needle) == 1 and text.endswith(passkey.QUESTION)
    body = text[len(passkey.TASK) : -len(passkey.QUESTION)]
    where = body.index(needle) / max(len(body) - len(needle), 1)
    assert abs(where - depth) < 0.05


def test_passkey_prompt_too_short_is_an_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="below the passkey prompt's minimum"):
        passkey.build_prompt(tokenizer, 20, key=12345, depth=0.5)


def test_passkey_wording_is_a_parameter(tokenizer) -> None:
    wording = dict(
        filler="The river runs to the sea. Birds sing at dawn.",
        needle="The secret code is {key}. Keep it in mind. {key} is the secret code.",
        question="What is the secret code? The secret code is",
    )
    prompt = passkey.build_prompt(tokenizer, 512, key=70312, depth=0.25, **wording)
    text = tokenizer.decode(prompt.ids)
    assert len(prompt.ids) <= 512 and text.endswith(wording["question"])
    assert text.count("The secret code is 70312.") == 1 and "grass" not in text and "pass key" not in text
    with pytest.raises(ValueError, match="must contain {key}"):
        passkey.build_prompt(tokenizer, 512, key=1, depth=0.5, needle="The code is {code}.")


def test_first_integer() -> None:
    assert passkey.first_integer(" 36209.\nThe pass key is 1") == 36209
    assert passkey.first_integer("no digits") is None


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_prompt_fits_and_places_the_needle(tokenizer, depth: float) -> None:
    hay = tokenizer.encode(texts.stdlib_prose(), add_special=False)
    task = niah.NeedleTask()
    ids = niah.build_prompt(tokenizer, hay, 1024, depth, task)
    assert 1024 - 64 <= len(ids) <= 1024
    text = tokenizer.decode(ids, skip_special=False)
    assert text.count(task.needle) == 1 and text.endswith(task.answer_prefix)
    start = text.index("<|im_start|>user") + len("<|im_start|>user")
    end = text.index(task.question)
    relative = (text.index(task.needle) - start) / (end - start)
    assert abs(relative - depth) < 0.1


def test_answer_recall() -> None:
    assert niah.answer_recall("Eat a sandwich and sit in Dolores Park on a sunny day.", niah.ANSWER) == 1.0
    assert niah.answer_recall("go to the beach", niah.ANSWER) == 0.0
    assert 0 < niah.answer_recall("eat a sandwich", niah.ANSWER) < 1


def test_niah_grid_and_heatmap(tmp_path) -> None:
    results = [niah.NeedleResult(n, d, n, float(i), "") for i, (n, d) in enumerate([(64, 0.0), (128, 0.0), (64, 1.0)])]
    payload = niah.save_niah(results, tmp_path)
    assert payload["lengths"] == [64, 128] and payload["depths"] == [0.0, 1.0]
    assert payload["scores"][0] == [0.0, 1.0] and payload["scores"][1][0] == 2.0
    assert np.isnan(payload["scores"][1][1])
    assert (tmp_path / "niah.png").stat().st_size > 0 and (tmp_path / "niah.json").is_file()


def test_prefix_nll_is_the_mean_of_next_token_nlls(tiny_engine: Engine) -> None:
    ids = np.random.default_rng(0).integers(0, 97, 50)
    full = tiny_engine.token_nlls(ids[None])[0]
    result = perplexity.prefix_nll(tiny_engine, ids, 40)
    assert result.n_tokens == 39
    np.testing.assert_allclose(result.nll, tiny_engine.token_nlls(ids[None, :40])[0].mean(), rtol=1e-6)
    # causal model: the first 39 predictions do not depend on tokens after position 40
    np.testing.assert_allclose(result.nll, full[:39].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than the requested length"):
        perplexity.prefix_nll(tiny_engine, ids, 51)


def test_sliding_window_scores_every_token_once(tiny_engine: Engine) -> None:
    ids = np.random.default_rng(1).integers(0, 97, 70)
    whole = tiny_engine.token_nlls(ids[None])[0]
    # a window as long as the text is one causal pass
    one = perplexity.sliding_window_nll(tiny_engine, ids, length=70, stride=70)
    assert one.n_tokens == 69
    np.testing.assert_allclose(one.nll, whole.mean(), rtol=1e-5)
    # disjoint windows restart their context: the first token of each has nothing to be predicted from
    disjoint = perplexity.sliding_window_nll(tiny_engine, ids, length=30, stride=30)
    expected = [tiny_engine.token_nlls(ids[None, s : s + 30])[0] for s in (0, 30, 60)]
    assert disjoint.n_tokens == 29 + 29 + 9
    np.testing.assert_allclose(disjoint.nll, np.concatenate(expected).mean(), rtol=1e-5)
    strided = perplexity.sliding_window_nll(tiny_engine, ids, length=30, stride=10)
    assert strided.n_tokens == 69
    with pytest.raises(ValueError, match="stride"):
        perplexity.sliding_window_nll(tiny_engine, ids, length=30, stride=31)


@pytest.mark.parametrize("rope", ["default", "dynamic"])
def test_perplexity_vs_length_equals_prefix_nll_at_each_length(tiny_engine: Engine, rope: str) -> None:
    """One long pass reused for every length must equal separate passes; dynamic NTK must not reuse it."""
    from lcm.models.llama import with_config

    model = tiny_engine.model
    if rope == "dynamic":  # trained length 24: lengths 40 and 60 get different frequencies
        cfg = model.config.with_rope("dynamic", {"factor": 2.0, "original_max_position_embeddings": 24})
        model = with_config(model, cfg)
    engine = tiny_engine.with_model(model)
    ids = np.random.default_rng(2).integers(0, 97, 60)
    swept = perplexity.perplexity_vs_length(engine, ids, [10, 40, 60])
    separate = [perplexity.prefix_nll(engine, ids, n) for n in (10, 40, 60)]
    for a, b in zip(swept, separate, strict=True):
        assert a.n_tokens == b.n_tokens
        np.testing.assert_allclose(a.nll, b.nll, rtol=1e-5)


def test_suite_table_and_plots(tmp_path) -> None:
    from lcm.evals.suite import _plot, markdown_table

    results = {
        "model": "m",
        "passkey": {"none": {"1024": 1.0, "2048": 0.5}, "ntk:factor=2": {"1024": 1.0}},
        "perplexity": {"none": [{"length": 512, "ppl": 12.345}], "ntk:factor=2": [{"length": 512, "ppl": 13.0}]},
        "niah": {"none": {"mean_score": 0.75}},
    }
    table = markdown_table(results).splitlines()
    assert table[0] == "| RoPE | passkey 1024 | passkey 2048 | ppl 512 | NIAH mean |"
    assert table[2] == "| `none` | 100% | 50% | 12.35 | 0.75 |"
    assert table[3] == "| `ntk:factor=2` | 100% |  | 13.00 |  |"
    _plot(tmp_path, results)
    assert (tmp_path / "perplexity.png").stat().st_size > 0 and (tmp_path / "passkey.png").stat().st_size > 0


class _RecordingEngine:
    """Answers every prompt with the first 5-digit number in it (the passkey) or a fixed text; keeps the prompts."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.prompts = tokenizer, []

    def generate(self, ids: np.ndarray, max_new_tokens: int, stop_ids=()) -> np.ndarray:
        self.prompts.append(ids)
        text = self.tokenizer.decode(ids.tolist())
        key = text.split("pass key is ")[1][:6] if "pass key is " in text else "no"
        answer = " " + "".join(c for c in key if c.isdigit() or key == "no")
        return np.array([self.tokenizer.encode(answer, add_special=False)])


def _shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    differs = np.flatnonzero(a[: min(len(a), len(b))] != b[: min(len(a), len(b))])
    return int(differs[0]) if differs.size else min(len(a), len(b))


def test_passkey_and_niah_run_shallow_depths_first_and_report_in_order(tokenizer) -> None:
    """The order that lets ``reuse_prefix`` share prompts: each prompt agrees with the previous one up to the
    previous needle; results keep the caller's order."""
    engine = _RecordingEngine(tokenizer)
    accuracy, records = passkey.run_passkey(engine, tokenizer, [1024], trials=5, seed=3)
    assert accuracy == {1024: 1.0} and len(records) == 5
    depths = [r.depth for r in records]
    expected = []
    for trial in range(5):  # trial order, as drawn from each trial's seed: the key, then the depth
        rng = np.random.default_rng((3, 1024, trial))
        rng.integers(10000, 100000)
        expected.append(float(rng.uniform()))
    np.testing.assert_allclose(depths, expected)
    run = [passkey.build_prompt(tokenizer, 1024, r.key, r.depth).ids for r in sorted(records, key=lambda r: r.depth)]
    assert [list(p) for p in engine.prompts] == run  # ran shallowest first
    for a, b, depth in zip(run[:-1], run[1:], sorted(depths)[:-1], strict=True):  # the next agrees up to this needle
        assert _shared_prefix(np.array(a), np.array(b)) > 0.9 * 1024 * depth

    engine = _RecordingEngine(tokenizer)
    results = niah.run_niah(engine, tokenizer, texts.stdlib_prose()[:20000], [512], [1.0, 0.0, 0.5])
    assert [r.depth for r in results] == [1.0, 0.0, 0.5]
    assert [len(p) for p in engine.prompts] == [512] * 3
    first, second = engine.prompts[0], engine.prompts[1]
    assert _shared_prefix(first, second) < 40 < _shared_prefix(second, engine.prompts[2])  # 0.0, then 0.5, then 1.0
