"""The KV-policy contract from outside the package: a policy defined here — its per-layer state
(``init_layer``), what its layers record (``layer_hooks().record``), which queries observe (``observers``), its
ranking (``priority``) — runs through the unchanged Engine and model, and keeps exactly what a full-cache run says
it should. Also: the attention-mass hook against the dense reference, and the hooks' one-line errors."""

from __future__ import annotations

import dataclasses
import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache.hooks import AttentionMass, LayerHooks, LayerView
from lcm.cache.kv import LayerCache, with_scores
from lcm.cache.policies import KVPolicy, TokenSelect
from lcm.generate import Engine
from lcm.models.llama import Llama
from lcm.ops import masks
from lcm.ops.kv_scores import reference_attention_mass


@dataclasses.dataclass(frozen=True)
class KeyNorms(LayerHooks):
    """Records the L2 norm of every new entry's key (pre-RoPE: rotation keeps norms) per KV head."""

    def record(self, view: LayerView, state: LayerCache) -> LayerCache:
        if view.observers is None:
            return state
        norms = jnp.linalg.norm(view.k_pre.astype(jnp.float32), axis=-1).swapaxes(1, 2)  # [B, K, T]
        zero = jnp.zeros((), jnp.int32)
        return dataclasses.replace(
            state, scores=jax.lax.dynamic_update_slice(state.scores, norms, (zero, zero, view.start))
        )


@dataclasses.dataclass(frozen=True)
class SmallestKeys(KVPolicy):
    """Keeps the ``budget`` entries of smallest key norm per layer and KV head, once, after the prompt."""

    name: typing.ClassVar[str] = "smallest_keys_test"

    def init_layer(self, layer: LayerCache, num_heads: int, head_dim: int) -> LayerCache:
        return with_scores(layer)

    def layer_hooks(self) -> KeyNorms:
        return KeyNorms()

    def observers(self, positions: np.ndarray, prompt_length: int) -> np.ndarray:
        return np.ones(positions.shape, bool)

    def priority(self, scores: jax.Array, length: jax.Array, prompt_seen: jax.Array) -> jax.Array:
        return jnp.where(jnp.arange(scores.shape[-1]) < length, -scores, -jnp.inf)


def test_a_policy_defined_outside_keeps_what_its_hooks_record(model: Llama) -> None:
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 30))
    budget = 10
    engine = Engine(model, chunk_size=8, policy=SmallestKeys(budget=budget))
    _, cache = engine.prefill(tokens, engine.new_cache(1, 30))
    full = Engine(model, chunk_size=8, keys_pre_rope=True)  # pre-RoPE keys: their norms are the recorded ones
    _, reference = full.prefill(tokens, full.new_cache(1, 30))
    for index, (layer, whole) in enumerate(zip(cache.layers, reference.layers, strict=True)):
        assert int(layer.length) == budget
        norms = np.linalg.norm(np.asarray(whole.keys[0, :, :30], np.float64), axis=-1)  # [K, 30]
        for head in range(model.config.num_kv_heads):
            want = np.sort(np.argsort(norms[head], kind="stable")[:budget])
            # the kept entries are the full cache's entries at those slots, in slot order: compare values
            # (never rotated) and the recorded norms (the same layers' float32 arithmetic, fused differently)
            got_values = np.asarray(layer.values[0, head, :budget])
            np.testing.assert_allclose(got_values, np.asarray(whole.values[0, head, want]), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(
                np.asarray(layer.scores[0, head, :budget]), norms[head, want], rtol=1e-5, err_msg=f"layer {index}"
            )


def test_a_policy_that_needs_scores_gets_them_and_the_attention_mass_hook(model: Llama) -> None:
    """``needs_scores = True`` is all a policy ranking by attention mass declares: the Engine's cache then holds
    zeroed scores in every layer, and its layers add the mass of the policy's observers (here every query)."""

    @dataclasses.dataclass(frozen=True)
    class Watched(KVPolicy):
        name: typing.ClassVar[str] = "watched_test"
        needs_scores: typing.ClassVar[bool] = True

        def observers(self, positions: np.ndarray, prompt_length: int) -> np.ndarray:
            return np.ones(positions.shape, bool)

    policy = Watched(budget=64)
    assert policy.layer_hooks() == AttentionMass() and KVPolicy().layer_hooks() is None
    engine = Engine(model, chunk_size=8, policy=policy)
    cache = engine.new_cache(1, 16)
    assert all(float(jnp.abs(layer.scores).sum()) == 0.0 for layer in cache.layers)
    _, cache = engine.prefill(np.zeros((1, 12), np.int32), cache)
    group = model.config.num_heads // model.config.num_kv_heads
    for layer in cache.layers:  # each of the 12 queries spreads probability 1 per query head over its keys
        np.testing.assert_allclose(np.asarray(layer.scores).sum(-1), 12 * group, rtol=1e-5)


def test_attention_mass_hook_adds_the_dense_reference_for_observers_only() -> None:
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 5, 4, 8)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((1, 2, 16, 8)), jnp.float32)
    mask = masks.causal() & masks.offsets(q_offset=7, kv_length=12)
    state = with_scores(
        LayerCache(keys=keys, values=keys, positions=jnp.zeros((1, 16), jnp.int32), length=jnp.int32(12))
    )
    state = dataclasses.replace(state, scores=jnp.full((1, 2, 16), 0.5, jnp.float32))
    observers = jnp.asarray([[True, False, True, True, False]])
    view = LayerView(
        q=q, q_pre=q, k_pre=None, v=None, keys=keys, stored_keys=keys, values=keys, mask=mask, start=jnp.int32(7),
        num_valid=jnp.int32(5), observers=observers, inv_freq=None, attention_factor=1.0, module=None,
        keys_pre_rope=False,
    )  # fmt: skip
    got = AttentionMass().record(view, state).scores
    chex.assert_trees_all_close(got, 0.5 + reference_attention_mass(q, keys, observers, mask=mask), atol=1e-6)
    unobserved = dataclasses.replace(view, observers=None)
    assert AttentionMass().record(unobserved, state) is state  # decode steps record nothing


def test_hooks_without_their_state_are_one_line_errors(model: Llama) -> None:
    tokens = np.zeros((1, 4), np.int32)
    engine = Engine(model, chunk_size=8, policy=TokenSelect(budget=40))
    cache = model.init_cache(1, 8, keys_pre_rope=True)  # no selection caches: not Engine.new_cache
    cache = dataclasses.replace(cache, hooks=engine.policy.layer_hooks())
    with pytest.raises(ValueError, match="TokenSelect needs keys stored pre-RoPE and a selection cache") as err:
        model(tokens, np.arange(4)[None], cache)
    assert "\n" not in str(err.value)
    plain = dataclasses.replace(model.init_cache(1, 8), hooks=AttentionMass())  # no scores allocated
    with pytest.raises(ValueError, match="attention mass needs the layer's scores"):
        model.hidden_states(jnp.asarray(tokens), jnp.arange(4)[None], plain, observers=jnp.ones((1, 4), bool))
