"""The entries each policy keeps, against NVIDIA kvpress 0.5.5's own presses on the same tiny model and prompt.

``tests/fixtures/kvpress/kept.json`` was written by ``experiments/kvpress_fixture/make_fixture.py``, run in its own
environment (kvpress pins transformers 5.2): kvpress's press applied as its pipeline applies it, and every kept key
matched bitwise to its prompt position. The model is ``tests/fixtures/kvpress/tiny_llama`` (float32), whose
logits lcm reproduces to ~4e-5. Each press's smallest relative score gap between the last kept and the first dropped
entry (recorded in the fixture) is >= 7.7e-4, far above that round-off, so the kept sets must agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lcm.cache.policies import make_policy
from lcm.generate import Engine
from lcm.io.hf import load_hf_folder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kvpress"
# lcm's policy for each kvpress press: the same budget (kvpress keeps int(96 * (1 - 0.5)) = 48) and parameters
POLICIES = {
    "knorm": ("knorm", {}),
    "tova": ("tova", {}),
    "snapkv": ("snapkv", {"window": 8, "kernel": 5}),
    "pyramidkv": ("pyramidkv", {"window": 8, "kernel": 5, "beta": 20}),
}


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads((FIXTURES / "kept.json").read_text())


@pytest.fixture(scope="module")
def prefilled(fixture: dict):
    model = load_hf_folder(FIXTURES / "tiny_llama", progress=False)
    prompt = np.asarray(fixture["prompt_ids"], np.int32)[None]
    full = Engine(model, chunk_size=32)
    _, cache = full.prefill(prompt, full.new_cache(1, prompt.shape[1]))
    return model, prompt, cache


def _positions_of(kept_keys: np.ndarray, all_keys: np.ndarray) -> list[int]:
    """The prompt position of each kept key: the full cache's nearest key (they are the same computation)."""
    distance = ((kept_keys[:, None, :] - all_keys[None, :, :]) ** 2).sum(-1)
    nearest = distance.argmin(axis=1)
    assert np.all(distance[np.arange(len(nearest)), nearest] == 0.0)  # bit-equal: a kept key is a computed key
    return sorted(nearest.tolist())


@pytest.mark.parametrize("press", sorted(POLICIES))
def test_each_layer_and_head_keeps_what_kvpress_keeps(fixture: dict, prefilled, press: str) -> None:
    model, prompt, full = prefilled
    name, params = POLICIES[press]
    want = fixture["presses"][press]
    assert want["params"]["compression_ratio"] == 0.5
    engine = Engine(model, chunk_size=32, policy=make_policy(name, prompt.shape[1] // 2, **params))
    _, cache = engine.prefill(prompt, engine.new_cache(1, prompt.shape[1]))
    assert [int(layer.length) for layer in cache.layers] == want["n_kept_per_layer"]
    for index, (got, ref) in enumerate(zip(cache.layers, full.layers, strict=True)):
        n = int(got.length)
        for head in range(got.keys.shape[1]):
            kept = _positions_of(np.asarray(got.keys[0, head, :n]), np.asarray(ref.keys[0, head, : prompt.shape[1]]))
            assert kept == want["kept"][index][head], f"{press}: layer {index}, KV head {head}"
