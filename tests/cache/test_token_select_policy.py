"""TokenSelect in the Engine: chunked prefill and decode against a float64 numpy decoder that selects by the
paper's rules (METHODS §5) on its own, the full-cache equivalence below the budget, and bad input.

The reference (``numpy_decoder.py``) re-implements the whole tiny decoder in numpy from the model's parameters,
and here TokenSelect per layer and chunk: pre-RoPE keys, fingerprint = mean query rotated at
``n_local + t``, soft vote over the candidates, ``n_init`` ∪ top-k ∪ ``n_local``, contiguous positions, and the
selection cache's reuse rule. Only the parameters are shared with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy_decoder import NumpyDecoder, rope, softmax

from lcm.cache.policies import POLICIES, TokenSelect, make_policy
from lcm.generate import Engine
from lcm.models.llama import Llama


class ReferenceTokenSelect(NumpyDecoder):
    """The numpy decoder whose layers attend to TokenSelect's selection once the cache exceeds the budget."""

    def __init__(self, model: Llama, n_init: int, k: int, n_local: int, threshold: float):
        super().__init__(model)
        self.n_init, self.k, self.n_local, self.threshold = n_init, k, n_local, threshold
        self.budget = n_init + k + n_local
        self.cached: list[tuple[np.ndarray, np.ndarray] | None] = [None for _ in self.layers]  # (q̄, top-k)
        self.selections = 0  # layer steps that attended to a selection
        self.reuses = 0  # ... of which reused the cached top-k

    def attended(self, layer: int, q: np.ndarray) -> np.ndarray:
        n = len(self.keys[layer])
        if n <= self.budget:
            return np.arange(n)
        self.selections += 1
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        q_mean = rope(q, self.n_local + np.arange(len(q)), self.inv_freq).mean(axis=0)  # [H, D]
        candidates = np.arange(self.n_init, n - self.n_local)
        cached = self.cached[layer]
        a = q_mean.ravel()
        if cached is not None and len(q) == 1:  # the selection cache serves decode steps only
            b = cached[0].ravel()
            similar = a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= self.threshold
            if similar and cached[1][-1] < n - self.n_local:
                self.reuses += 1
                return np.asarray([*range(self.n_init), *cached[1].tolist(), *range(n - self.n_local, n)])
        keys = self.keys[layer][candidates]  # [C, K, D], pre-RoPE
        scores = np.stack([keys[:, h // group] @ q_mean[h] for h in range(self.cfg.num_heads)])  # no 1/sqrt(d)
        votes = softmax(scores).sum(axis=0)
        top = np.sort(candidates[np.argsort(-votes, kind="stable")[: self.k]])
        self.cached[layer] = (q_mean, top)
        return np.asarray([*range(self.n_init), *top.tolist(), *range(n - self.n_local, n)])


@pytest.mark.parametrize("threshold", [2.0, -1.0], ids=["never-reuse", "always-reuse"])
def test_prefill_and_decode_match_the_numpy_reference(model: Llama, threshold: float) -> None:
    policy = TokenSelect(budget=16, n_init=2, n_local=8, threshold=threshold)  # k = 6
    tokens = np.random.default_rng(7).integers(0, model.config.vocab_size, (1, 45))  # 6 chunks, the last one ragged
    engine = Engine(model, chunk_size=8, policy=policy)
    cache = engine.new_cache(1, 45 + 8)
    logits, cache = engine.prefill(tokens, cache)
    reference = ReferenceTokenSelect(model, n_init=2, k=6, n_local=8, threshold=threshold)
    want_logits, want_tokens = reference.generate(tokens[0].tolist(), chunk=8, max_new_tokens=8)
    assert reference.selections > 0
    if threshold < 0:
        assert reference.reuses > 0  # the cached selection is exercised, not only recomputation
    else:
        assert reference.reuses == 0
    # float32 against float64 through 2 layers of O(1) activations: round-off ~1e-6; a wrong selection or
    # position moves logits by O(0.1)
    np.testing.assert_allclose(np.asarray(logits[0]), want_logits, atol=1e-4, rtol=1e-4)
    assert all(bool(np.asarray(layer.selection.filled).all()) for layer in cache.layers)
    np.testing.assert_array_equal(engine.generate(tokens, 8)[0], want_tokens)


def test_the_engine_prefills_in_chunks_that_fit_the_local_window(model: Llama) -> None:
    engine = Engine(model, chunk_size=512, policy=TokenSelect(budget=64))
    assert engine.policy.attention_rule().n_local == 16 and engine.chunk_size == 16
    assert engine.prompt_capacity(1000) == 1000  # nothing is evicted: the cache holds the whole prompt


def test_defaults_split_the_budget_as_the_paper() -> None:
    rule = TokenSelect(budget=2688).attention_rule()
    assert (rule.n_init, rule.k, rule.n_local, rule.threshold) == (128, 2048, 512, 0.9)  # METHODS §5
    rule = make_policy("tokenselect", 1024).attention_rule()
    assert (rule.n_init, rule.k, rule.n_local) == (64, 704, 256)  # the paper's proportions
    assert POLICIES["tokenselect"] is TokenSelect


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_policy("tokenselect", 64, n_init=32, n_local=32), "budget=64 is smaller than the 65 tokens"),
        (lambda: make_policy("tokenselect", 8, n_local=8), "budget=8 is smaller than the 9 tokens"),
        (lambda: make_policy("tokenselect", 64, n_local=2.5), "n_local=2.5 must be an integer"),
        (lambda: make_policy("tokenselect", 64, threshold="high"), "threshold='high' must be a number"),
        (lambda: make_policy("tokenselect", 64, n_local=0), "n_local=0 leaves the current token out"),
        (lambda: make_policy("tokenselect", 64, k=8), "unknown parameter 'k'"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
