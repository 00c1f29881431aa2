"""Tests for lcm.ops.position_schemes.

Each scheme's attention against a float64 numpy reference of its own definition, written here from the papers'
formulas (not from the module): for every visible (query, key) pair, the positions the query and the key are rotated
to, as explicit matrices, then a plain softmax. Random small shapes, prefill chunks (queries at an offset into a
buffer with an empty tail) and decode steps, positions with gaps (a compacted cache), GQA; through the reference
attention and the tiled XLA path. Where a scheme is the identity (every distance inside its window or chunk) it
equals plain RoPE attention to float32 round-off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.kernels.attention import api
from lcm.ops import masks, rotary
from lcm.ops import position_schemes as ps
from lcm.ops.attention import reference_attention

BASE = 10_000.0
# float32 rotations and scores against float64: outputs (weighted means of N(0, 1) values) to a few 1e-6
TOL = {"atol": 2e-5, "rtol": 2e-5}


def _inv_freq(dim: int) -> np.ndarray:
    return 1.0 / BASE ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _rotate64(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """HF half-split RoPE in float64: ``x [..., n, D]`` rotated to ``positions [n]`` (NaN: left unrotated)."""
    angles = np.nan_to_num(positions)[:, None] * _inv_freq(x.shape[-1])[None]
    angles = np.concatenate([angles, angles], -1)
    half = x.shape[-1] // 2
    rotated = x * np.cos(angles) + np.concatenate([-x[..., half:], x[..., :half]], -1) * np.sin(angles)
    return np.where(np.isnan(positions)[:, None], x, rotated)


def _selfextend(i: int, j: int, group: int, window: int) -> tuple[float, float | None]:
    if i - j < window:
        return i, j
    return i // group + window - window // group, j // group


def _dca(i: int, j: int, chunk: int, window: int) -> tuple[float, float | None]:
    c = chunk - window
    if i // c == j // c:
        return i % c, j % c
    if i // c == j // c + 1:
        return min(i % c + c, chunk), j % c
    return chunk, j % c


def _rerope(i: int, j: int, window: int, leak: float) -> tuple[float, float | None]:
    if i - j < window:
        return i, j
    if not leak:
        return window, None  # the relative distance is clipped at the window
    return i / leak + window - window / leak, j / leak


def _reference64(q, k, v, q_pos, k_pos, kv_length, positions_of):
    """float64: query t (position q_pos[b, t]) over keys j < kv_length with k_pos[b, j] <= q_pos[b, t], each pair
    rotated to the positions ``positions_of(i, j)`` gives it (a key position None: unrotated)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros(q.shape)
    for b in range(batch):
        for t in range(q_len):
            i = int(q_pos[b, t])
            keys = np.array([j for j in range(kv_length) if int(k_pos[b, j]) <= i])
            pairs = [positions_of(i, int(k_pos[b, j])) for j in keys]
            qp = np.array([p for p, _ in pairs], np.float64)
            kp = np.array([np.nan if p is None else p for _, p in pairs], np.float64)
            for h in range(heads):
                rotated_q = _rotate64(np.broadcast_to(q[b, t, h], (len(keys), dim)), qp)
                rotated_k = _rotate64(k[b, h // group, keys], kp)
                scores = (rotated_q * rotated_k).sum(-1) / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = (weights / weights.sum()) @ v[b, h // group, keys]
    return out


def _inputs(seed: int, batch: int, q_len: int, capacity: int, heads: int, kv_heads: int, dim: int):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, capacity, dim)).astype(np.float32)
    return q, k, v


SCHEMES = {
    "selfextend": (ps.SelfExtend(group=3, window=16), lambda i, j: _selfextend(i, j, 3, 16)),
    "dca": (ps.DualChunk(chunk=24, window=6), lambda i, j: _dca(i, j, 24, 6)),
    "rerope": (ps.ReRoPE(window=10), lambda i, j: _rerope(i, j, 10, 0.0)),
    "leaky_rerope": (ps.ReRoPE(window=10, leak=4.0), lambda i, j: _rerope(i, j, 10, 4.0)),
}
# (batch, T, capacity, filled, heads, kv_heads, dim, query offset, gaps): prefill from 0, a chunk at an offset into
# a buffer with an empty tail, a decode step, and a compacted cache whose positions have gaps
CASES = {
    "prefill": (1, 70, 70, 70, 4, 2, 16, 0, False),
    "chunk": (2, 24, 96, 81, 6, 2, 16, 57, False),
    "decode": (2, 1, 96, 77, 4, 1, 32, 76, False),
    "compacted_decode": (1, 1, 64, 50, 4, 2, 16, 49, True),
}


def _call(scheme, case, implementation):
    batch, q_len, capacity, filled, heads, kv_heads, dim, offset, gaps = case
    q, k, v = _inputs(hash((q_len, capacity)) % 1000, batch, q_len, capacity, heads, kv_heads, dim)
    slots = np.arange(capacity)
    k_pos = np.tile(slots, (batch, 1))
    if gaps:  # kept entries of a longer prompt: increasing positions with gaps
        k_pos = np.sort(np.random.default_rng(5).choice(200, size=(batch, capacity), replace=False), 1)
    k_pos = k_pos.astype(np.int32)
    q_pos = k_pos[:, offset : offset + q_len]
    mask = masks.causal() & masks.offsets(offset, filled)

    def attend(q_, k_, v_, mask_):
        if implementation == "reference":
            return reference_attention(q_, k_, v_, mask=mask_, return_lse=True)
        configs = api.XlaConfig(q_block=8, kv_block=16)
        return api.attention(q_, k_, v_, mask=mask_, implementation="xla", config=configs, return_lse=True)

    inv_freq = jnp.asarray(_inv_freq(dim), jnp.float32)
    out, _ = jax.jit(functools.partial(ps.scheme_attention, scheme, attend))(
        jnp.asarray(q),
        jnp.asarray(q_pos),
        jnp.asarray(k),
        jnp.asarray(k_pos),
        jnp.asarray(v),
        mask,
        inv_freq,
    )
    return out, (q, k, v, q_pos, k_pos, filled)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_scheme_matches_its_float64_definition(name: str, case: str) -> None:
    scheme, positions_of = SCHEMES[name]
    for implementation in ("reference", "xla"):
        out, (q, k, v, q_pos, k_pos, filled) = _call(scheme, CASES[case], implementation)
        want = _reference64(q, k, v, q_pos, k_pos, filled, positions_of)
        np.testing.assert_allclose(np.asarray(out), want, **TOL, err_msg=f"{name} {case} {implementation}")


@pytest.mark.parametrize(
    "scheme",
    [ps.SelfExtend(group=4, window=64), ps.DualChunk(chunk=80, window=8), ps.ReRoPE(window=64, leak=2.0)],
    ids=["selfextend", "dca", "leaky_rerope"],
)
def test_identity_below_the_window_equals_plain_rope(scheme) -> None:
    """Every distance inside the window (chunk): the scheme is plain RoPE attention, to float32 round-off."""
    q, k, v = _inputs(7, 2, 40, 64, 4, 2, 16)
    positions = np.tile(np.arange(64, dtype=np.int32), (2, 1))
    mask = masks.causal() & masks.offsets(20, 60)
    inv_freq = jnp.asarray(_inv_freq(16), jnp.float32)

    def attend(q_, k_, v_, mask_):
        return api.attention(q_, k_, v_, mask=mask_, implementation="xla", return_lse=True)

    out, _ = ps.scheme_attention(
        scheme,
        attend,
        jnp.asarray(q),
        jnp.asarray(positions[:, 20:60]),
        jnp.asarray(k),
        jnp.asarray(positions),
        jnp.asarray(v),
        mask,
        inv_freq,
    )
    cos_q, sin_q = rotary.rope_cos_sin(jnp.asarray(positions[:, 20:60]), inv_freq)
    cos_k, sin_k = rotary.rope_cos_sin(jnp.asarray(positions), inv_freq)
    plain = reference_attention(
        rotary.rotate(jnp.asarray(q), cos_q, sin_q),
        rotary.rotate(jnp.asarray(k), cos_k, sin_k, heads_first=True),
        jnp.asarray(v),
        mask=mask,
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=2e-6, rtol=2e-6)


def test_merge_parts_is_one_softmax_and_handles_empty_rows() -> None:
    """Two parts over disjoint keys merge to the softmax over their union; a row neither part sees is zero."""
    q, k, v = _inputs(3, 1, 5, 12, 2, 1, 8)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    whole = masks.causal() & masks.offsets(7, 12)
    near = reference_attention(q, k, v, mask=whole & masks.band(0, 2), return_lse=True)
    far = reference_attention(q, k, v, mask=whole & masks.band(3), return_lse=True)
    out, lse = ps.merge_parts([near[0], far[0]], [near[1], far[1]])
    want, want_lse = reference_attention(q, k, v, mask=whole, return_lse=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=1e-5)
    nothing = jnp.full_like(near[1], -jnp.inf)
    out, lse = ps.merge_parts([jnp.zeros_like(near[0])] * 2, [nothing, nothing])
    assert not np.asarray(out).any() and np.isneginf(np.asarray(lse)).all()


def test_parse_and_limits() -> None:
    assert ps.parse_position_scheme("selfextend:group=8,window=1024") == ps.SelfExtend(8, 1024)
    assert ps.parse_position_scheme("rerope:window=256,leak=16") == ps.ReRoPE(256, 16.0)
    assert ps.parse_position_scheme("dca").resolved(8192) == ps.DualChunk(6144, 512)  # ChunkLlama's 3L/4 and L/16
    assert ps.SelfExtend(8, 1024).max_length(8192) == (8192 - 1024) * 8 + 1024
    assert ps.ReRoPE(512, 16.0).max_length(8192) == (8192 - 512) * 16 + 512
    assert ps.ReRoPE(512).max_length(8192) is None and ps.DualChunk(6144, 512).max_length(8192) is None
    assert ps.parse_position_scheme(ps.SelfExtend(8, 1024).spec) == ps.SelfExtend(8, 1024)
    bad = {
        "selfextend:group=0": "group=0 must be an integer >= 1",
        "selfextend:group=2.5": "must be an integer",
        "selfextend:size=3": "unknown parameter 'size'",
        "selfextend:group=2,group=4": "given twice",
        "rerope:leak=1": "must be 0 (plain ReRoPE) or a number > 1",
        "dca:chunk=100,window=60": "must be below chunk - window",
        "selfextend:group": "expected key=value",
        "nope": "unknown position scheme 'nope'",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ps.parse_position_scheme(spec)


def test_readme_example_runs() -> None:
    """The README's position-scheme block, executed as written, equals the float64 SelfExtend definition."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("# past the trained length without training", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(block, scope)
    positions = np.arange(256)[None]
    want = _reference64(
        np.ones((1, 16, 4, 64)),
        np.ones((1, 2, 256, 64)),
        np.asarray(scope["v"]),
        positions[:, 200:216],
        positions,
        216,
        lambda i, j: _selfextend(i, j, 4, 32),
    )
    assert scope["lse"].shape == (1, 16, 4)
    np.testing.assert_allclose(np.asarray(scope["out"]), want, **TOL)
