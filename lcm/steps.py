"""The jitted programs of inference, as pure functions of ``(graphdef, params, ..., cache)``: one prefill chunk,
a policy's probe chunk, one chunk's token NLLs, a policy's compression, one greedy decode step.

:class:`lcm.generate.Engine` drives them; a custom loop (another sampler, a sharded decode, a TPU serving loop)
can call them directly. ``graphdef`` is static, so one compiled program serves every call of the same (chunk,
capacity) shape, and the cache is donated, so XLA updates it in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lcm.cache.hooks import LayerHooks
from lcm.cache.kv import KVCache, with_scores
from lcm.cache.policies import KVPolicy, compress
from lcm.models.families import Model

# plain jax.jit: JAX's persistent cache (lcm.io.compile_cache) keys on the traced program, so it never goes stale
_jit = jax.jit


def run_chunk(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxC: jax.Array,
    positions_BxC: jax.Array,
    num_valid: jax.Array,
    rope_seq_len: jax.Array,
    cache: KVCache,
    observers_BxC: jax.Array | None = None,
) -> tuple[Model, jax.Array, KVCache]:
    """One right-padded prefill chunk through the decoder (traced inside the jitted callers below); the queries
    ``observers_BxC`` marks are those the KV policy's layer hooks record from."""
    model = nnx.merge(graphdef, params)
    hidden_BxCxD, cache = model.hidden_states(
        tokens_BxC,
        positions_BxC,
        cache,
        num_valid=num_valid,
        rope_seq_len=rope_seq_len,
        observers=observers_BxC,
    )
    return model, hidden_BxCxD, cache


@_jit(static_argnums=(0,), donate_argnames=("cache",))
def prefill_chunk(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxC: jax.Array,
    positions_BxC: jax.Array,
    num_valid: jax.Array,
    rope_seq_len: jax.Array,
    cache: KVCache,
    observers_BxC: jax.Array | None = None,
    previous_logits_BxV: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """One prefill chunk written after the cache's filled slots; logits ``[B, V]`` at its last real token. The
    policy's hooks (``cache.hooks``) record what they need from the chunk's layers and, after the last layer,
    from the model's predictions (:meth:`lcm.cache.hooks.LayerHooks.chunk_logits`; ``previous_logits_BxV`` are
    the previous chunk's; ``None`` or zeros before the first: a uniform prediction)."""
    start = cache.length
    model, hidden_BxCxD, cache = run_chunk(
        graphdef, params, tokens_BxC, positions_BxC, num_valid, rope_seq_len, cache, observers_BxC
    )
    hooks = cache.hooks if cache.hooks is not None else LayerHooks()
    if previous_logits_BxV is None:
        previous_logits_BxV = jnp.zeros((tokens_BxC.shape[0], model.config.vocab_size), jnp.float32)
    return hooks.chunk_logits(model, cache, start, tokens_BxC, hidden_BxCxD, num_valid, previous_logits_BxV)


@_jit(static_argnums=(0,), donate_argnames=("cache",))
def probe_chunk(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxP: jax.Array,
    positions_BxP: jax.Array,
    rope_seq_len: jax.Array,
    cache: KVCache,
) -> KVCache:
    """A policy's probe chunk (e.g. a catalyst prompt) fed after the filled slots on zeroed scores, its queries the
    only observers; its own entries are dropped again (``length`` set back, so they count as empty and the next
    chunk overwrites them). Each layer's ``scores`` is then the attention each cached key receives from the probe."""
    lengths = [layer.length for layer in cache.layers]
    cache = dataclasses.replace(cache, layers=tuple(with_scores(layer) for layer in cache.layers))
    observers_BxP = jnp.ones(tokens_BxP.shape, bool)
    num_valid = jnp.int32(tokens_BxP.shape[1])
    _, _, cache = run_chunk(graphdef, params, tokens_BxP, positions_BxP, num_valid, rope_seq_len, cache, observers_BxP)
    return cache.replace_layers(length=lengths)


@_jit(static_argnums=(0,), donate_argnames=("cache",))
def nll_chunk(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxC: jax.Array,
    targets_BxC: jax.Array,
    positions_BxC: jax.Array,
    num_valid: jax.Array,
    rope_seq_len: jax.Array,
    cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """One chunk through the decoder; ``[B, C]`` NLLs of ``targets_BxC`` (the next tokens) under its logits."""
    model, hidden_BxCxD, cache = run_chunk(graphdef, params, tokens_BxC, positions_BxC, num_valid, rope_seq_len, cache)
    logits_BxCxV = model.logits(hidden_BxCxD)
    logprobs = jax.nn.log_softmax(logits_BxCxV, axis=-1)
    nll_BxC = -jnp.take_along_axis(logprobs, targets_BxC[..., None], axis=-1)[..., 0]
    return nll_BxC, cache


@_jit(static_argnums=(0, 3), donate_argnames=("cache",))
def compress_cache(policy: KVPolicy, cache: KVCache, prompt_seen: jax.Array, final: bool = False) -> KVCache:
    """:func:`lcm.cache.policies.compress` jitted, the policy static: the cache compacted to the policy's budget."""
    return compress(policy, cache, prompt_seen, final)


@_jit(static_argnums=(1,))
def shrink_cache(cache: KVCache, capacities: tuple[int, ...]) -> KVCache:
    """Layer ``i`` with room for ``capacities[i]`` entries (:meth:`LayerCache.cut`: a full buffer's first slots;
    after eviction the rest is empty)."""
    if len(capacities) != len(cache.layers):
        raise ValueError(f"shrink_cache: {len(capacities)} capacities for {len(cache.layers)} layers")
    return dataclasses.replace(
        cache, layers=tuple(layer.cut(n) for layer, n in zip(cache.layers, capacities, strict=True))
    )


@_jit(static_argnums=(0,), donate_argnames=("cache",))
def decode_step(
    graphdef: nnx.GraphDef, params: nnx.State, token_B: jax.Array, position_B: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """One greedy step: ``token_B`` at ``position_B`` written into the cache's next slot; the argmax next token."""
    model = nnx.merge(graphdef, params)
    hidden_Bx1xD, cache = model.hidden_states(token_B[:, None], position_B[:, None], cache)
    logits_BxV = model.logits(hidden_Bx1xD[:, 0])
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), cache


@_jit(static_argnums=(0, 5), donate_argnames=("cache",))
def decode_block(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    token_B: jax.Array,
    position_B: jax.Array,
    cache: KVCache,
    block: int,
    num_steps: jax.Array,
    stop_ids_N: jax.Array,
    done_B: jax.Array,
) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
    """Up to ``num_steps`` (<= ``block``, traced) greedy steps in one ``lax.while_loop`` on the device, stopping
    early once every row has produced a token in ``stop_ids_N`` (``done_B`` says which rows already have).

    Each step is :func:`decode_step`'s: ``token_B`` at ``position_B`` written into the cache's next slot, the argmax
    next token. Returns the tokens ``[B, block]`` (the first ``count`` are real), ``count``, the cache and the rows
    done: the host reads ``count`` once per block instead of a token per step, and one program serves every
    ``num_steps`` of a capacity.
    """
    model = nnx.merge(graphdef, params)

    def keep_going(carry: tuple) -> jax.Array:
        step, _, _, _, _, done = carry
        return (step < num_steps) & ~jnp.all(done)

    def one_step(carry: tuple) -> tuple:
        step, token, position, cache, out_BxN, done = carry
        hidden_Bx1xD, cache = model.hidden_states(token[:, None], position[:, None], cache)
        token = jnp.argmax(model.logits(hidden_Bx1xD[:, 0]), axis=-1).astype(jnp.int32)
        out_BxN = jax.lax.dynamic_update_index_in_dim(out_BxN, token, step, axis=1)
        done = done | jnp.isin(token, stop_ids_N)
        return step + 1, token, position + 1, cache, out_BxN, done

    out_BxN = jnp.zeros((token_B.shape[0], block), jnp.int32)
    init = (jnp.int32(0), token_B, position_B, cache, out_BxN, done_B)
    count, _, _, cache, out_BxN, done_B = jax.lax.while_loop(keep_going, one_step, init)
    return out_BxN, count, cache, done_B
