"""The issue's InfiniPot claim at real scale: SmolLM2 reads a 64k-token input through a 2k-token pot, and the cache
keeps one size across every CCD cycle (slow: about 10 minutes on 2 CPU cores; ``pytest -m slow``)."""

from __future__ import annotations

import numpy as np
import pytest

import lcm.steps
from lcm.cache.infinipot import InfiniPot
from lcm.evals.texts import stdlib_prose
from lcm.generate import Engine
from lcm.io.checkpoints import load_model


@pytest.mark.slow
def test_64k_tokens_through_a_2k_pot_in_bounded_memory(smollm2_gguf, monkeypatch) -> None:
    model, tokenizer = load_model(str(smollm2_gguf), progress=False)
    budget, chunk, length = 2048, 512, 65536
    policy = InfiniPot(budget=budget).with_tokenizer(tokenizer)
    cycles = []
    compress_fn = lcm.steps.compress_cache

    def spy(policy, cache, prompt_seen, *final):
        out = compress_fn(policy, cache, prompt_seen, *final)
        cycles.append((cache.capacity, int(out.length), out.num_bytes))
        return out

    monkeypatch.setattr(lcm.steps, "compress_cache", spy)
    text = stdlib_prose()
    ids = tokenizer.encode(text)
    tokens = np.asarray((ids * (length // len(ids) + 1))[:length], np.int32)[None]
    engine = Engine(model, chunk_size=chunk, policy=policy)
    capacity = engine.prompt_capacity(length)
    assert capacity == budget + chunk + len(policy.catalyst_ids)  # the pot, whatever the input's length
    cache = engine.new_cache(1, capacity)
    logits, cache = engine.prefill(tokens, cache)
    assert len(cycles) == (length - budget) // chunk - 1  # a CCD cycle per chunk once the pot is full, but the last
    assert {c[0] for c in cycles} == {cache.capacity} and {c[1] for c in cycles} == {budget}
    assert len({c[2] for c in cycles}) == 1  # the same bytes after every cycle: memory does not grow with the input
    assert int(cache.length) == budget + chunk and np.isfinite(np.asarray(logits)).all()
