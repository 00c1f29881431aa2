"""Locret in the Engine: chunked prefill with eviction by the retaining heads' scores (stabilisers, the last
chunk, the never-evicted ``n_loc`` tail) and decoding, against the float64 numpy decoder (``numpy_decoder.py``)
that evicts by the paper's rules (METHODS §9) on its own; the full-cache equivalence; the missing-heads error.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from numpy_decoder import NumpyDecoder, silu

from lcm.cache.locret import Locret
from lcm.cache.policies import POLICIES
from lcm.generate import Engine
from lcm.models.llama import Llama
from lcm.models.retaining import RetainingHeads, attach_retaining_heads


class ReferenceLocret(NumpyDecoder):
    """The numpy decoder that scores each new entry with its layer's retaining head and, after each chunk, keeps
    the ``budget`` best per KV head, the ``n_s`` newest always unless it is the last chunk."""

    def __init__(self, model: Llama, budget: int, stabilizers: int):
        super().__init__(model)
        self.budget, self.stabilizers = budget, stabilizers
        self.w = [
            (np.asarray(b.retaining.w1[...], np.float64), np.asarray(b.retaining.w2[...], np.float64))
            for b in model.layers
        ]
        self.scores = [np.zeros((0, model.config.num_kv_heads)) for _ in model.layers]
        self.evictions = 0

    def new_entries(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        w1, w2 = self.w[layer]
        features = np.concatenate([x.reshape(len(x), -1) for x in (q, k, v)], axis=-1)  # [T, (H + 2K) D]
        self.scores[layer] = np.concatenate([self.scores[layer], silu(features @ w1) @ w2])

    def evict(self, final: bool) -> None:
        for layer in range(len(self.layers)):
            n = len(self.keys[layer])
            if n <= self.budget:
                continue
            self.evictions += 1
            rank = self.scores[layer].copy()
            if not final:
                rank[n - self.stabilizers :] = np.inf
            keep = np.sort(np.argsort(-rank, axis=0, kind="stable")[: self.budget], axis=0)  # [budget, K]
            heads = np.arange(rank.shape[1])[None]
            self.keys[layer] = self.keys[layer][keep, heads]
            self.values[layer] = self.values[layer][keep, heads]
            self.scores[layer] = self.scores[layer][keep, heads]


@pytest.fixture(scope="module")
def with_heads(model: Llama) -> Llama:
    heads = RetainingHeads(model.config, hidden_width=16, rngs=nnx.Rngs(3))
    return attach_retaining_heads(model, heads)


@pytest.mark.parametrize("n_loc", [0, 5, 11], ids=["no-tail", "tail-in-a-chunk", "tail-over-two-chunks"])
def test_prefill_and_decode_match_the_numpy_reference(with_heads: Llama, n_loc: int) -> None:
    policy = Locret(budget=12, stabilizers=3, n_loc=n_loc)
    tokens = np.random.default_rng(11).integers(0, with_heads.config.vocab_size, (1, 43))
    engine = Engine(with_heads, chunk_size=8, policy=policy)
    logits, cache = engine.prefill(tokens, engine.new_cache(1, engine.prompt_capacity(43)))
    assert int(cache.length) == 12 + n_loc  # the budget, then the tail that is never evicted
    reference = ReferenceLocret(with_heads, budget=12, stabilizers=3)
    want_logits, want_tokens = reference.generate(tokens[0].tolist(), chunk=8, max_new_tokens=6, tail=n_loc)
    assert reference.evictions > 0
    # float32 against float64 through 2 layers: round-off ~1e-6; one wrongly kept entry moves logits by O(0.1)
    np.testing.assert_allclose(np.asarray(logits[0]), want_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(engine.generate(tokens, 6)[0], want_tokens)


def test_a_model_without_heads_is_a_one_line_error(model: Llama) -> None:
    with pytest.raises(ValueError, match="train them with: lcm run configs/locret_smollm2.py"):
        Engine(model, policy=Locret(budget=64))
    assert POLICIES["locret"] is Locret
