"""The training forward (``model(tokens, positions)`` with no cache): against a dense plain-jnp decoder written here
from the LLaMA equations, loss and gradients with packed documents; documents never see each other; and its
backward's memory grows with the number of layers, not with layers x a stacked cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm.models.llama import LlamaConfig, random_model

TINY = LlamaConfig(
    rms_norm_eps=1e-5,
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    rope_base=10000.0,
    max_position_embeddings=64,
    tie_embeddings=False,
    qkv_bias=True,
    attention_q_block=8,  # several query and key tiles over a 40-token row, so tiles of other documents are skipped
    attention_kv_block=8,
)
# two rows of packed documents: 3 documents, then 2 (lengths 12 + 17 + 11 and 25 + 15)
SEGMENTS = np.array([[0] * 12 + [1] * 17 + [2] * 11, [0] * 25 + [1] * 15], np.int32)


def _positions_restarting(segments: np.ndarray) -> np.ndarray:
    """Each document's positions count from 0 (ProLong's choice for packed rows)."""
    out = np.zeros_like(segments)
    for b, row in enumerate(segments):
        for t in range(1, row.size):
            out[b, t] = 0 if row[t] != row[t - 1] else out[b, t - 1] + 1
    return out


def _dense_forward(params: nnx.State, cfg: LlamaConfig, tokens, positions, segments) -> jax.Array:
    """Logits of the LLaMA decoder in plain jnp, one dense masked softmax per layer (no lcm code)."""
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def norm(x, scale):
        return scale[None, None] * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps)

    inv_freq = cfg.rope_base ** -(jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    angles = positions[..., None].astype(jnp.float32) * inv_freq[None, None]  # [B, T, hd/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]

    def rope(x):  # half-split layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    seq = tokens.shape[1]
    causal = jnp.arange(seq)[:, None] >= jnp.arange(seq)[None]
    visible = causal[None] & (segments[:, :, None] == segments[:, None, :])
    x = params["embed"][...][tokens]
    for layer in params["layers"].values():
        a = layer["attn"]
        y = norm(x, layer["input_norm"]["scale"][...])
        q = jnp.einsum("btd,dhk->bthk", y, a["q_proj"][...]) + a["q_bias"][...][None, None]
        kk = jnp.einsum("btd,dhk->bthk", y, a["k_proj"][...]) + a["k_bias"][...][None, None]
        v = jnp.einsum("btd,dhk->bthk", y, a["v_proj"][...]) + a["v_bias"][...][None, None]
        q, kk = rope(q), rope(kk)
        kk, v = jnp.repeat(kk, h // k, axis=2), jnp.repeat(v, h // k, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(hd)
        probs = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        x = x + jnp.einsum("bthk,hkd->btd", attn, a["o_proj"][...])
        m = layer["mlp"]
        y = norm(x, layer["post_attention_norm"]["scale"][...])
        x = x + (jax.nn.silu(y @ m["gate_proj"][...]) * (y @ m["up_proj"][...])) @ m["down_proj"][...]
    x = norm(x, params["final_norm"]["scale"][...])
    del d
    return x @ params["lm_head"][...]


def _loss(logits: jax.Array, tokens: jax.Array, segments: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy inside each document (no target across a document boundary)."""
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    same = (segments[:, 1:] == segments[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * same) / jnp.sum(same)


def _ours(graphdef, params, tokens, positions, segments, remat=False):
    logits, state = nnx.merge(graphdef, params)(tokens, positions, segment_ids=segments, remat=remat)
    assert state is None
    return logits


@pytest.mark.parametrize("implementation,remat", [("xla", False), ("auto", True)])
def test_loss_and_gradients_equal_a_dense_reference(implementation: str, remat: bool) -> None:
    cfg = dataclasses.replace(TINY, attention_implementation=implementation)
    graphdef, params = nnx.split(random_model(cfg, seed=1))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, SEGMENTS.shape), jnp.int32)
    positions, segments = jnp.asarray(_positions_restarting(SEGMENTS)), jnp.asarray(SEGMENTS)

    def ours(params):
        return _loss(_ours(graphdef, params, tokens, positions, segments, remat), tokens, segments)

    def reference(params):
        return _loss(_dense_forward(params, cfg, tokens, positions, segments), tokens, segments)

    loss, grads = jax.jit(jax.value_and_grad(ours))(params)
    want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(params)
    # float32, the same math in another order (tiled online softmax vs a dense softmax, the FlashAttention-2
    # backward vs autodiff): loss to ~1e-6, gradients (entries up to ~1) to a few 1e-6; 1e-4 leaves headroom
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got_leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(got_leaves) == len(want_leaves) == 39  # 3 layers x 12 arrays + embed, final norm, LM head
    for got, want in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_one_document_never_changes_another() -> None:
    """Editing every token of the middle document leaves every logit of the other documents exactly as it was."""
    graphdef, params = nnx.split(random_model(TINY, seed=3))
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, TINY.vocab_size, SEGMENTS.shape).astype(np.int32)
    edited = tokens.copy()
    middle = SEGMENTS == 1
    edited[middle] = (tokens[middle] + 1 + rng.integers(0, TINY.vocab_size - 1, middle.sum())) % TINY.vocab_size
    positions = jnp.asarray(np.broadcast_to(np.arange(SEGMENTS.shape[1]), SEGMENTS.shape))  # running on
    forward = jax.jit(_ours, static_argnums=0)
    before = np.asarray(forward(graphdef, params, jnp.asarray(tokens), positions, jnp.asarray(SEGMENTS)))
    after = np.asarray(forward(graphdef, params, jnp.asarray(edited), positions, jnp.asarray(SEGMENTS)))
    np.testing.assert_array_equal(before[~middle], after[~middle])
    assert np.abs(before[middle] - after[middle]).max() > 1e-2


def _backward_temp_bytes(num_layers: int, seq: int, through_cache: bool) -> int:
    """Temporary bytes of the compiled gradient of a loss over a ``seq``-token row, by the training forward or
    (``through_cache``) by the inference forward writing into a fresh per-layer cache."""
    cfg = dataclasses.replace(TINY, num_layers=num_layers, attention_implementation="xla", attention_q_block=64)
    cfg = dataclasses.replace(cfg, attention_kv_block=64)
    model = random_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((1, seq), jnp.int32)
    positions = jnp.arange(seq, dtype=jnp.int32)[None]

    def loss(params):
        m = nnx.merge(graphdef, params)
        cache = m.init_cache(1, seq) if through_cache else None
        return jnp.sum(m(tokens, positions, cache)[0][:, -1])

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_backward_memory_grows_with_layers_not_layers_times_the_stack() -> None:
    """Fit temp(L) = a + b L + c L^2 through 2, 4 and 8 layers (XLA's memory analysis of the compiled gradient,
    512-token rows). When the cache was one stacked ``[L, B, K, S, D]`` array, every layer's backward through it
    allocated a float32 dK and dV of the whole stack: c was about one layer's slice of both (measured ~128 KiB
    against 64 KiB for B K S D x 4 bytes x 2; BENCHMARKS.md). The training forward holds one layer's dK/dV at a
    time, and so does the inference forward now that each layer owns its buffer: c is zero to a few hundred bytes
    on both paths."""

    def quadratic(temp: list[int]) -> float:
        return ((temp[2] - temp[1]) - 2 * (temp[1] - temp[0])) / 24

    slice_bytes = 1 * TINY.num_kv_heads * 512 * TINY.head_dim * 4 * 2
    for through_cache in (False, True):
        temp = [_backward_temp_bytes(n, 512, through_cache) for n in (2, 4, 8)]
        assert temp[0] < temp[1] < temp[2], temp  # it does grow with layers (the fit is not of a constant)
        assert abs(quadratic(temp)) < 0.05 * slice_bytes, (through_cache, temp)


def test_scanned_layers_equal_the_unrolled_loop() -> None:
    """``scan=True`` (one block traced over stacked parameters) gives the unrolled loop's logits and gradients."""
    graphdef, params = nnx.split(random_model(TINY, seed=7))
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, TINY.vocab_size, SEGMENTS.shape), jnp.int32)
    positions, segments = jnp.asarray(_positions_restarting(SEGMENTS)), jnp.asarray(SEGMENTS)

    def loss(params, scan):
        logits, _ = nnx.merge(graphdef, params)(tokens, positions, segment_ids=segments, scan=scan)
        return _loss(logits, tokens, segments)

    results = [jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, scan) for scan in (False, True)]
    # the same float32 ops, compiled as a loop body instead of inline: round-off only
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
