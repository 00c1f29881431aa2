"""The CPU benchmark's arithmetic and report, without running it (timings are never unit-tested)."""

import importlib.util
from pathlib import Path

import pytest

from lcm.cli import main
from lcm.models.llama import LlamaConfig


def _benchmark(name: str):
    """The script ``benchmarks/NAME.py`` as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _benchmark("cpu_inference")


def test_prefill_flops_match_the_issue_hand_count_at_8k() -> None:
    # issue [I]: a causal 8k SmolLM2 prefill is ~4.1 TFLOP, 1.7 in the linear layers and 2.3 in attention
    cfg = LlamaConfig.preset("smollm2-135m")
    total = bench.prefill_flops(cfg, 8192)
    linear = 30 * 2 * 8192 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536)
    attention = 30 * 4 * 9 * 64 * 8192 * 8193 / 2
    assert total == pytest.approx(linear + attention + 2 * 576 * 49152)
    assert linear == pytest.approx(1.74e12, rel=0.01) and attention == pytest.approx(2.32e12, rel=0.01)


def test_markdown_reports_ratios_rates_and_token_agreement() -> None:
    report = {
        "date": "2026-11-25 12:00 UTC",
        "device": "test CPU",
        "versions": {"jax": "0"},
        "matmul_peak_gflops": {"xla": 100.0, "torch": 90.0},
        "config": "30 layers",
        "decode_steps": 3,
        "command": "python benchmarks/cpu_inference.py",
        "rows": [
            {
                "length": 2048,
                "flops": 500e9,
                "lcm": {
                    "prefill_s": 5.0,
                    "compile_s": 12.0,
                    "decode_ms": 40.0,
                    "peak_rss_gib": 1.0,
                    "first_token": 7,
                    "decode_tokens": [7, 8, 9, 10],
                },
                "transformers": {
                    "prefill_s": 10.0,
                    "decode_ms": 50.0,
                    "peak_rss_gib": 1.5,
                    "first_token": 7,
                    "decode_tokens": [7, 8, 1, 10],
                },
                "lcm-xla": {"prefill_s": 8.0, "decode_ms": 41.0},
            },
            {"length": 4096, "flops": 1e12, "lcm": {"prefill_s": 20.0, "first_token": 3}},
        ],
    }
    text = bench.markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| 2048"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["5.00", "10.00", "0.50"]
    assert cells[4] == "100 (100%)" and cells[5] == "50"  # 500 GFLOP in 5 s against a 100 GFLOP/s peak
    assert cells[9] == "0.80" and cells[12] == "2/4"  # decode ratio; tokens agree until the third
    assert cells[13:16] == ["8.00", "0.80", "41"]  # the XLA-attention engine beside them
    assert "| 4096 | 20.00 | — | — |" in text


def test_repeated_cells_report_medians_and_every_run() -> None:
    runs = [{"prefill_s": 9.0, "decode_ms": 30.0, "first_token": 1}, {"prefill_s": 5.0, "decode_ms": 50.0}]
    runs.append({"prefill_s": 7.0, "decode_ms": 40.0, "first_token": 3})
    cell = bench.median_cell(runs)
    assert cell["prefill_s"] == 7.0 and cell["decode_ms"] == 40.0 and cell["first_token"] == 3  # the median run
    assert cell["prefill_runs"] == [9.0, 5.0, 7.0]  # in the order they ran
    assert bench.median_cell(runs[:1]) == runs[0]  # one run: as it is
    two = bench.median_cell(runs[:2])
    assert two["prefill_s"] == 7.0 and two["decode_ms"] == 40.0  # an even count: the mean of the middle two
    report = {"date": "d", "device": "cpu", "versions": {}, "matmul_peak_gflops": {"xla": 1.0}, "config": "c"}
    report |= {"decode_steps": 3, "command": "x", "rows": [{"length": 8, "flops": 1.0, "lcm": cell}]}
    report["rows"][0]["transformers"] = bench.median_cell([{"prefill_s": 8.0}, {"prefill_s": 10.0}])
    text = bench.markdown(report)
    assert "| 8 | 7.00 | 9.00 | 0.78 |" in text
    assert "every run's prefill, in order: 8: lcm [9.0, 5.0, 7.0] s, transformers [8.0, 10.0] s." in text


def test_bench_cli_rejects_an_unknown_engine(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "cpu-inference", "--engines", "lcm,llama.cpp"])
    assert exit_info.value.code == 2
    assert "unknown engine 'llama.cpp'" in capsys.readouterr().err


def test_kernel_ab_counts_causal_flops_and_rejects_bad_input(capsys) -> None:
    kernel_ab = _benchmark("kernel_ab")
    # 512-query chunks over a causal prefix sum to the causal triangle n(n+1)/2, x 9 heads x 64 dims x 4 flops
    assert kernel_ab.attention_flops(2048) == 4 * 9 * 64 * 2048 * 2049 / 2
    with pytest.raises(SystemExit):
        kernel_ab.main(["missing.cc"])
    assert "source 'missing.cc' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernel_ab.main([__file__, "--length", "1000"])
    assert "--length=1000 must be a positive multiple of 512" in capsys.readouterr().err


def test_decode_ab_rejects_bad_input(capsys) -> None:
    decode_ab = _benchmark("decode_ab")
    with pytest.raises(ValueError, match="unknown attention implementation 'gpu'"):
        decode_ab.main(["--implementations", "xla,gpu"])
    with pytest.raises(SystemExit):
        decode_ab.main(["--lengths", "2k"])
    assert "argument --lengths: expected comma-separated integers, got '2k'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decode_ab.main(["--lengths", "0"])
    assert "argument --lengths: expected positive integers, got '0'" in capsys.readouterr().err


def test_padded_batch_ab_rejects_bad_input(capsys) -> None:
    padded_batch_ab = _benchmark("padded_batch_ab")
    with pytest.raises(ValueError, match="unknown attention implementation 'gpu'"):
        padded_batch_ab.main(["--implementations", "gpu"])
    with pytest.raises(SystemExit):
        padded_batch_ab.main(["--lengths", "100,x"])
    assert "argument --lengths: expected comma-separated integers, got '100,x'" in capsys.readouterr().err


def test_train_forward_ab_and_tree_ab_reject_bad_input(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _benchmark("train_forward_ab").main(["--length", "0"])
    assert exit_info.value.code == 2 and "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _benchmark("tree_ab").main([])
    assert exit_info.value.code == 2 and "give the two trees" in capsys.readouterr().err


def test_layer_scan_ab_rejects_bad_input(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _benchmark("layer_scan_ab").main(["--reps", "0"])
    assert exit_info.value.code == 2 and "need positive --chunk, --steps and --reps" in capsys.readouterr().err


def test_gemma3_window_memory_is_the_closed_form_and_both_layouts_agree() -> None:
    import jax.numpy as jnp

    from lcm.models.gemma3 import Gemma3Config, pattern_layer_types, random_model

    window = _benchmark("gemma3_window")
    cfg = Gemma3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=6, num_heads=2, num_kv_heads=1, head_dim=8,
        rms_norm_eps=1e-6, rope_base=1e6, local_rope_base=1e4, sliding_window=4, layer_types=pattern_layer_types(6),
        query_pre_attn_scalar=8.0, max_position_embeddings=64,
    )  # fmt: skip
    model = random_model(cfg)
    per_slot = 2 * 1 * 8 * 4 + 4  # keys and values float32, one int32 position
    capacity = 40
    assert window._bytes(model, capacity, False) == 6 * (capacity * per_slot + 4)
    assert window._bytes(model, capacity, True) == 5 * (4 * per_slot + 4) + 1 * (capacity * per_slot + 4)
    logits = []
    for layout in (True, False):
        cache = window._filled(model, 30, layout, seed=1)
        hidden, _ = model.hidden_states(jnp.zeros((1, 1), jnp.int32), jnp.asarray([[30]]), cache)
        logits.append(model.logits(hidden))
    assert jnp.allclose(logits[0], logits[1], atol=1e-5)
