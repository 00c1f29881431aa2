"""Tests for lcm.kernels.attention: every implementation, every Mask kind, forward and VJP, against the reference.

One parametrised base (STYLE.md rule 7): each registered implementation runs the same mask kinds — causal prefill
and chunks with an empty cache tail, sliding windows with and without sinks, packed documents, left padding, a
prefix-LM, bidirectional and cross attention, a bidirectional window, a block-sparse layout, a key offset (a ring
step's shard), decode steps, rows that see no key, a stacked ``[L, B, K, S, D]`` cache read at a layer — and must
match :func:`lcm.ops.attention.reference_attention`, whose own definition is checked here against numpy loops
written from the Mask docstring's rule. An implementation may decline a kind it does not implement (the CPU
kernel: anything but causal masks with offsets, windows, sinks and left padding), and then must say why; the
test asserts it declines exactly those kinds. Then the log-sum-exp, dispatch, per-backend configs and bad input.
"""

import dataclasses
import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.kernels.attention import api, cpu
from lcm.ops import masks
from lcm.ops.attention import reference_attention

# Both sides accumulate in float32; the kernel's exp is Cephes' polynomial (~1 ulp) and it sums in a different
# order (online softmax over 16-64-key blocks). Outputs are weighted means of N(0, 1) values: measured worst case
# ~1e-6; 1e-5 leaves 10x headroom. Gradients sum larger terms (|grad| up to ~30) in other orders: 1e-4 relative.
F32_TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}


@functools.cache
def _cpu_available() -> bool:
    return cpu.available()


def _require(implementation: str) -> None:
    if implementation == "cpu" and not _cpu_available():
        if os.environ.get("CI"):
            pytest.fail("the CPU attention kernel could not be built in CI")
        pytest.skip("the CPU attention kernel is not available here (no compiler or no AVX2)")


def _qkv(seed: int, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int, dim: int, dtype: Any = jnp.float32):
    """``q [B, T, H, D]`` and heads-first ``k, v [B, K, S, D]``."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, q_len, heads, dim), (batch, kv_heads, kv_len, dim), (batch, kv_heads, kv_len, dim)]
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


STARTS = np.array([0, 13, 37], np.int32)  # left padding: where each row's prompt starts
PACKED = np.repeat(np.arange(4), [20, 30, 25, 21])[None].repeat(2, 0).astype(np.int32)  # documents over 96 slots
PACKED[1] = np.repeat(np.arange(3), [40, 40, 16])
SPARSE = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]], bool)  # 3 x 4 blocks of 16 x 24
# a compacted cache: 96 slots holding increasing positions with gaps (evicted entries), two rows
KEPT = np.sort(np.random.default_rng(3).choice(300, size=(2, 96), replace=False), axis=1).astype(np.int32)


def _mask_kinds() -> dict[str, tuple[tuple[int, ...], masks.Mask]]:
    """name: ((B, T, S, H, K, D, cpu_q_block, cpu_kv_block), mask)."""
    causal = masks.causal()
    return {
        "causal_prefill": ((2, 40, 40, 4, 4, 16, 64, 64), causal),
        "causal_chunk_empty_tail": ((1, 96, 300, 9, 3, 64, 64, 64), causal & masks.offsets(150, 246)),
        "causal_partial_tiles_gqa4": ((1, 37, 75, 8, 2, 128, 8, 16), causal & masks.offsets(20, 57)),
        "window": ((1, 33, 90, 6, 2, 32, 7, 16), causal & masks.offsets(40, 73) & masks.sliding_window(11)),
        "window_sinks_gap": (
            (2, 21, 96, 3, 1, 16, 4, 16),
            causal & masks.offsets(60, 81) & masks.sliding_window(9, sinks=5),
        ),
        "rows_with_no_visible_key": (
            (1, 16, 48, 2, 1, 16, 4, 16),
            causal & masks.offsets(30, 20) & masks.sliding_window(4),
        ),
        "left_padding": (
            (3, 40, 96, 6, 2, 16, 64, 16),
            causal & masks.offsets(30, 70) & masks.left_padding(jnp.asarray(STARTS)),
        ),
        "documents": (
            (2, 56, 96, 4, 2, 16, 64, 16),
            causal & masks.offsets(40, 96) & masks.documents(jnp.asarray(PACKED[:, 40:]), jnp.asarray(PACKED)),
        ),
        "prefix_lm": ((2, 40, 40, 4, 2, 16, 64, 16), causal & masks.prefix_lm(jnp.asarray([12, 25], jnp.int32))),
        "bidirectional": ((2, 30, 30, 4, 2, 16, 64, 16), masks.bidirectional()),
        "cross": ((2, 7, 50, 4, 2, 16, 64, 16), masks.bidirectional() & masks.offsets(kv_length=44)),
        "bidirectional_window": ((1, 40, 40, 2, 1, 16, 64, 16), masks.sliding_window(6)),
        "block_sparse": ((1, 40, 90, 4, 2, 16, 64, 16), masks.block_sparse(SPARSE, 16, 24)),
        "key_offset": ((1, 24, 32, 4, 2, 16, 64, 16), causal & masks.offsets(q_offset=40, k_offset=24)),
        "decode_split_keys": ((1, 1, 700, 3, 1, 64, 64, 16), causal & masks.offsets(650, 651)),
        "decode_window_sinks": (
            (1, 1, 900, 4, 1, 16, 64, 16),
            causal & masks.offsets(800, 801) & masks.sliding_window(100, 4),
        ),
        "decode_batch2": ((2, 1, 600, 9, 3, 64, 64, 64), causal & masks.offsets(500, 501)),
        # the parts of training-free extrapolation schemes (lcm.ops.position_schemes)
        "band_near": ((1, 40, 96, 4, 2, 16, 64, 16), causal & masks.offsets(40, 80) & masks.band(0, 9)),
        "band_far": ((2, 40, 96, 4, 2, 16, 64, 16), causal & masks.offsets(56, 96) & masks.band(10)),
        "band_chunks": ((1, 48, 96, 4, 2, 16, 64, 16), causal & masks.offsets(48, 96) & masks.band(1, 1, chunk=13)),
        "band_positions": (
            (2, 24, 96, 4, 2, 16, 64, 16),
            causal
            & masks.offsets(72, 90)
            & masks.band(2, chunk=20, q_positions=jnp.asarray(KEPT[:, 72:]), k_positions=jnp.asarray(KEPT)),
        ),
        "decode_band_positions": (
            (2, 1, 96, 4, 2, 16, 64, 16),
            causal
            & masks.offsets(95, 96)
            & masks.band(0, 39, q_positions=jnp.asarray(KEPT[:, 95:]), k_positions=jnp.asarray(KEPT)),
        ),
    }


KINDS = _mask_kinds()
# what the CPU kernel implements: causal masks with offsets, windows, sinks and left padding
CPU_DECLINES = {
    "documents",
    "prefix_lm",
    "bidirectional",
    "cross",
    "bidirectional_window",
    "block_sparse",
    "key_offset",
    "band_near",
    "band_far",
    "band_chunks",
    "band_positions",
    "decode_band_positions",
}


def _numpy_mask(mask: masks.Mask, batch: int, q_len: int, kv_len: int) -> np.ndarray:
    """``[B, T, S]`` from the Mask docstring's rule, one entry at a time, sharing no code with lcm.ops.masks."""
    value = lambda x, b: None if x is None else (int(np.asarray(x)) if np.ndim(x) == 0 else int(np.asarray(x)[b]))
    out = np.zeros((batch, q_len, kv_len), bool)
    for b in range(batch):
        for t in range(q_len):
            q = value(mask.q_offset, b) + t
            for j in range(kv_len):
                k = value(mask.k_offset, b) + j
                d = q - k
                ok = j < (kv_len if mask.kv_length is None else value(mask.kv_length, b))
                near = d >= 0 if mask.causal else True
                if mask.window is not None:
                    in_window = d < mask.window if mask.causal else abs(d) < mask.window
                    near = near and (in_window or k < mask.sinks)
                prefix = value(mask.prefix, b)
                ok = ok and (near or (prefix is not None and k < prefix))
                if mask.q_segments is not None:
                    ok = ok and np.asarray(mask.q_segments)[b, t] == np.asarray(mask.k_segments)[b, j]
                if mask.kv_start is not None:
                    start = int(np.asarray(mask.kv_start)[b])
                    ok = ok and (q >= start) == (k >= start)
                if mask.sparse is not None:
                    ok = ok and mask.sparse.layout[t // mask.sparse.q_block][j // mask.sparse.kv_block]
                if mask.band is not None:
                    p_q, p_k = q, k
                    if mask.q_positions is not None:
                        p_q, p_k = int(np.asarray(mask.q_positions)[b, t]), int(np.asarray(mask.k_positions)[b, j])
                    c = mask.band.chunk
                    high = 10**9 if mask.band.high is None else mask.band.high
                    ok = ok and mask.band.low <= p_q // c - p_k // c <= high
                out[b, t, j] = ok
    return out


def _numpy_attention(q, k, v, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 loops: output ``[B, T, H, D]`` and log-sum-exp ``[B, T, H]`` (-inf where nothing is visible)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    group = heads // k.shape[1]
    out, lse = np.zeros(q.shape), np.full((batch, q_len, heads), -np.inf)
    for b in range(batch):
        for h in range(heads):
            for t in range(q_len):
                keys = np.flatnonzero(visible[b, t])
                if not keys.size:
                    continue
                scores = np.array([q[b, t, h] @ k[b, h // group, j] for j in keys]) / np.sqrt(dim)
                top = scores.max()
                weights = np.exp(scores - top)
                lse[b, t, h] = top + np.log(weights.sum())
                out[b, t, h] = (weights / weights.sum()) @ v[b, h // group, keys]
    return out, lse


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_reference_matches_numpy_loops(kind: str) -> None:
    """The reference's mask, output and log-sum-exp equal float64 loops over the rule as the docstring states it."""
    (batch, t, s, h, kh, d, _, _), mask = KINDS[kind]
    q, k, v = _qkv(1, batch, t, s, h, kh, d)
    visible = _numpy_mask(mask, batch, t, s)
    np.testing.assert_array_equal(np.broadcast_to(mask.dense(t, s), visible.shape), visible, err_msg=kind)
    out, lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    want_out, want_lse = _numpy_attention(q, k, v, visible)
    # float32 einsum + softmax against float64: a few float32 ulp of values |x| < 4 (log-sum-exp |x| < 10)
    np.testing.assert_allclose(out, want_out, **F32_TOL, err_msg=kind)
    np.testing.assert_allclose(lse, want_lse, **F32_TOL, err_msg=kind)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_block_layout_is_exact_or_safe(kind: str) -> None:
    """EMPTY only where the dense mask has no visible entry (any row), FULL only where every entry is visible;
    for the slot terms (no documents, padding or block-sparse layout) EMPTY exactly where nothing is visible."""
    (batch, t, s, *_), mask = KINDS[kind]
    dense = _numpy_mask(mask, batch, t, s)
    for q_block, kv_block in ((16, 16), (7, 24), (t, s)):
        layout = np.asarray(mask.block_layout(t, s, q_block, kv_block))
        for i in range(layout.shape[0]):
            for j in range(layout.shape[1]):
                tile = dense[:, i * q_block : (i + 1) * q_block, j * kv_block : (j + 1) * kv_block]
                if layout[i, j] == masks.EMPTY:
                    assert not tile.any(), (kind, i, j)
                if layout[i, j] == masks.FULL:
                    assert tile.all(), (kind, i, j)
                if (
                    mask.q_segments is None
                    and mask.kv_start is None
                    and mask.sparse is None
                    and mask.q_positions is None
                ):
                    assert (layout[i, j] != masks.EMPTY) == tile.any(), (kind, i, j)


def _call(implementation: str, kind: str, q, k, v, **kwargs):
    (*_, cpu_q, cpu_kv), mask = KINDS[kind]
    configs = (api.XlaConfig(q_block=8, kv_block=16), api.CpuConfig(q_block=cpu_q, kv_block=cpu_kv))
    return api.attention(q, k, v, mask=mask, implementation=implementation, config=configs, **kwargs)


@pytest.mark.parametrize("implementation", sorted(api.IMPLEMENTATIONS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_implementation_matches_reference(implementation: str, kind: str) -> None:
    _require(implementation)
    (batch, t, s, h, kh, d, _, _), mask = KINDS[kind]
    q, k, v = _qkv(0, batch, t, s, h, kh, d)
    if implementation == "cpu" and kind in CPU_DECLINES:
        with pytest.raises(NotImplementedError, match=r"takes this call \(cpu: .+\)"):
            _call(implementation, kind, q, k, v)
        return
    got = _call(implementation, kind, q, k, v)
    np.testing.assert_allclose(
        got, reference_attention(q, k, v, mask=mask), **F32_TOL, err_msg=f"{implementation} {kind}"
    )


@functools.cache
def _with_grads(implementation: str, kind: str):
    """Jitted ``(out, dq, dk, dv)`` of ``sum(d_out * attention(q, k, v))``; "reference" is plain autodiff."""
    mask = KINDS[kind][1]

    def run(q, k, v, d_out):
        def attend(q, k, v):
            if implementation == "reference":
                return reference_attention(q, k, v, mask=mask)
            return _call(implementation, kind, q, k, v)

        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run)


# every kind but the decode steps (a backward through one query adds nothing), and only what a backend takes
GRAD_CASES = [
    (implementation, kind)
    for implementation in sorted(api.IMPLEMENTATIONS)
    # decode steps are inference only; of the bands, the one over explicit positions (the others are its special cases)
    for kind in sorted(
        set(KINDS)
        - {"decode_split_keys", "decode_window_sinks", "decode_batch2", "decode_band_positions"}
        - {"band_near", "band_far", "band_chunks"}
    )
    if not (implementation == "cpu" and kind in CPU_DECLINES)
]


@pytest.mark.parametrize("implementation,kind", GRAD_CASES)
def test_implementation_gradients_match_reference(implementation: str, kind: str) -> None:
    _require(implementation)
    (batch, t, s, h, kh, d, _, _), _ = KINDS[kind]
    q, k, v = _qkv(0, batch, t, s, h, kh, d)
    d_out = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    got = _with_grads(implementation, kind)(q, k, v, d_out)
    want = _with_grads("reference", kind)(q, k, v, d_out)
    np.testing.assert_allclose(got[0], want[0], **F32_TOL, err_msg=f"{implementation} {kind} output")
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL, err_msg=f"{implementation} {kind} {name}")


@pytest.mark.parametrize("kind", ["window_sinks_gap", "documents", "rows_with_no_visible_key", "cross"])
def test_log_sum_exp_and_its_gradient(kind: str) -> None:
    """``return_lse``: the XLA path's log-sum-exp equals the reference's (-inf for rows that see nothing), and a
    loss through both outputs has the reference's gradients (the lse cotangent enters the backward)."""
    (batch, t, s, h, kh, d, _, _), mask = KINDS[kind]
    q, k, v = _qkv(2, batch, t, s, h, kh, d)
    rng = np.random.default_rng(3)
    d_out, d_lse = jnp.asarray(rng.standard_normal(q.shape), jnp.float32), jnp.asarray(rng.standard_normal(q.shape[:3]))

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * d_lse)

    ours = lambda q, k, v: _call("xla", kind, q, k, v, return_lse=True)
    ref = lambda q, k, v: reference_attention(q, k, v, mask=mask, return_lse=True)
    got_out, got_lse = jax.jit(ours)(q, k, v)
    want_out, want_lse = ref(q, k, v)
    np.testing.assert_allclose(got_out, want_out, **F32_TOL)
    np.testing.assert_array_equal(np.isinf(got_lse), np.isinf(want_lse))
    np.testing.assert_allclose(got_lse, want_lse, **F32_TOL)
    got = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL, err_msg=f"{kind} {name}")


def test_auto_falls_through_where_the_kernel_declines() -> None:
    """Documents and bfloat16: "cpu" alone declines with its reason, "auto" and the default give the XLA result."""
    _require("cpu")
    q, k, v = _qkv(4, 1, 24, 40, 4, 2, 16)
    documents = masks.documents(jnp.ones((1, 24), jnp.int32), jnp.ones((1, 40), jnp.int32))
    declined = {
        "no q_segments in the mask": ((q, k, v), masks.causal() & masks.offsets(10) & documents),
        "float32 only": (tuple(x.astype(jnp.bfloat16) for x in (q, k, v)), masks.causal() & masks.offsets(10)),
    }
    for reason, (args, mask) in declined.items():
        with pytest.raises(NotImplementedError, match=re.escape(reason)):
            api.attention(*args, mask=mask, implementation="cpu")
        want = api.attention(*args, mask=mask, implementation="xla")
        for implementation in ("auto", None):
            got = api.attention(*args, mask=mask, implementation=implementation)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=reason)


def test_when_every_backend_declines_the_error_lists_each_reason() -> None:
    q, k, v = _qkv(4, 1, 8, 8, 2, 1, 16)
    with pytest.raises(NotImplementedError, match=r"among \['cpu'\] takes this call \(cpu: .*log-sum-exp"):
        api.attention(q, k, v, mask=masks.causal(), return_lse=True, implementation="cpu")


def test_default_implementation_by_platform() -> None:
    assert api.default_implementation("cpu") == ("cpu", "xla")
    assert api.default_implementation("gpu") == ("xla",)
    assert api.default_implementation("tpu") == ("xla",)
    assert api.resolve(None) == api.default_implementation()


def test_resolve_names_and_errors() -> None:
    assert api.resolve("auto") == ("cpu", "xla")
    assert api.resolve("xla") == ("xla",)
    assert api.resolve("cpu, xla") == ("cpu", "xla")
    assert api.resolve(["xla"]) == ("xla",)
    with pytest.raises(ValueError, match=r"unknown attention implementation 'pallas'; choose from"):
        api.resolve("pallas")
    with pytest.raises(ValueError, match="must name at least one"):
        api.resolve([])


def test_configs_are_per_backend_and_validated() -> None:
    with pytest.raises(ValueError, match="CpuConfig kv_block=24 must be a multiple of 16"):
        api.CpuConfig(kv_block=24)
    with pytest.raises(ValueError, match="CpuConfig min_split_keys=0 and long_keys=-1 must be >= 0"):
        api.CpuConfig(long_keys=-1, min_split_keys=0)
    with pytest.raises(ValueError, match="XlaConfig tiles must be >= 1"):
        api.XlaConfig(q_block=0)
    q, k, v = _qkv(5, 1, 16, 16, 2, 1, 16)
    with pytest.raises(TypeError, match="attention config must be XlaConfig or CpuConfig instances, got dict"):
        api.attention(q, k, v, mask=masks.causal(), config={"q_block": 8})
    with pytest.raises(ValueError, match="one config per backend"):
        api.attention(q, k, v, mask=masks.causal(), config=(api.XlaConfig(), api.XlaConfig(q_block=8)))
    # tiles change no result: the XLA path with 4 x 16 tiles equals its defaults
    mask = masks.causal() & masks.offsets(0, 16)
    small = api.attention(q, k, v, mask=mask, implementation="xla", config=api.XlaConfig(4, 16))
    np.testing.assert_allclose(small, api.attention(q, k, v, mask=mask, implementation="xla"), **F32_TOL)


def test_bad_masks_and_calls_are_one_line_errors() -> None:
    q, k, v = _qkv(5, 2, 6, 10, 4, 2, 16)
    cases = {
        "window=0 must be a positive number of slots": lambda: masks.sliding_window(0),
        "both masks set window": lambda: masks.sliding_window(4) & masks.sliding_window(8),
        "sees none of the keys at slots 30..": lambda: api.attention(
            q, k, v, mask=masks.causal() & masks.offsets(q_offset=2, k_offset=30)
        ),
        "q_offset=-3 must be >= 0": lambda: api.attention(q, k, v, mask=masks.causal() & masks.offsets(-3)),
        "unknown attention normalizer 'softplus'; choose one of ['softmax']": lambda: api.attention(
            q, k, v, mask=masks.causal(), normalizer="softplus"
        ),
        "prefix must be an integer scalar or [B] = [2]": lambda: api.attention(
            q, k, v, mask=masks.causal() & masks.prefix_lm(jnp.zeros((3,), jnp.int32))
        ),
        "the block-sparse layout has 1x1 blocks": lambda: api.attention(q, k, v, mask=masks.block_sparse([[1]], 4, 4)),
        "kv_start must be integer [B] = [2]": lambda: api.attention(
            q, k, v, mask=masks.causal() & masks.left_padding(jnp.zeros((2,), jnp.float32))
        ),
        "pass kv_start (left padding) or q_segments/k_segments": lambda: api.attention(
            q,
            k,
            v,
            mask=masks.left_padding(jnp.zeros((2,), jnp.int32))
            & masks.documents(jnp.zeros((2, 6), jnp.int32), jnp.zeros((2, 10), jnp.int32)),
        ),
        "num_heads=4 is not a multiple of num_kv_heads=3": lambda: api.attention(
            q, *(jnp.zeros((2, 3, 10, 16)),) * 2, mask=masks.causal()
        ),
    }
    for message, call in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    with pytest.raises(TypeError, match="mask must be an lcm.ops.masks.Mask"):
        api.attention(q, k, v, mask=None)


def test_masks_are_pytrees_with_a_static_structure() -> None:
    """Arrays are leaves (a new offset reuses the compiled program); the kinds are the static structure."""
    mask = masks.causal() & masks.sliding_window(8, sinks=2) & masks.offsets(3, 9)
    leaves, treedef = jax.tree.flatten(mask)
    # unset arrays (k_offset 0 here) stay out of the leaves: a mask passed through jit keeps them unset
    assert leaves == [3, 9] and jax.tree.unflatten(treedef, leaves).structure == mask.structure
    traces = []

    @jax.jit
    def run(mask):
        traces.append(1)
        return mask.dense(4, 12)

    for start in range(3):
        run(masks.causal() & masks.offsets(jnp.int32(start), jnp.int32(start + 4)))
    assert len(traces) == 1
    hash(mask.structure)

    @jax.jit
    def placed(mask, start):  # a layer adds where its chunk sits to the forward's mask, inside the program
        return (mask & masks.offsets(q_offset=start, kv_length=start + 4)).dense(4, 12)

    forward = masks.causal() & masks.sliding_window(3)
    want = (forward & masks.offsets(q_offset=5, kv_length=9)).dense(4, 12)
    np.testing.assert_array_equal(placed(forward, jnp.int32(5)), want)
    with pytest.raises(ValueError, match="both masks set q_offset"):
        jax.jit(lambda m: m & masks.offsets(q_offset=1))(masks.offsets(q_offset=jnp.int32(2)))


def test_long_query_tiles_past_the_key_threshold() -> None:
    """A SmolLM2-shaped late prefill chunk (256 queries after 700 keys): 128-query tiles once a call sees
    ``long_keys`` keys give the reference's result, and so does a threshold the call stays below."""
    _require("cpu")
    q, k, v = _qkv(3, 1, 256, 1024, 9, 3, 64)
    mask = masks.causal() & masks.offsets(700, 956)
    want = reference_attention(q, k, v, mask=mask)
    for long_keys in (956, 957, 0):  # at the threshold, just below it, never
        config = api.CpuConfig(long_q_block=128, long_keys=long_keys)
        got = api.attention(q, k, v, mask=mask, config=config, implementation="cpu")
        np.testing.assert_allclose(got, want, **F32_TOL, err_msg=f"long_keys={long_keys}")


def test_model_logits_equal_across_implementations() -> None:
    """A random SmolLM2-shaped model (2 layers): the same token NLLs (chunked prefill) and greedy tokens."""
    _require("cpu")
    from lcm.generate import Engine
    from lcm.models.llama import LlamaConfig, random_model

    tokens = np.random.default_rng(6).integers(0, 512, (1, 100)).astype(np.int32)
    nlls, generated = {}, {}
    for implementation in ("xla", "cpu,xla"):
        cfg = dataclasses.replace(
            LlamaConfig.preset("smollm2-135m", vocab_size=512, num_layers=2), attention_implementation=implementation
        )
        engine = Engine(random_model(cfg, seed=0), chunk_size=32)
        nlls[implementation] = engine.token_nlls(tokens)
        generated[implementation] = engine.generate(tokens, max_new_tokens=8)
    # two layers of float32 with different summation orders: NLLs (~6 nats) agree to ~1e-6 relative
    np.testing.assert_allclose(nlls["cpu,xla"], nlls["xla"], atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(generated["cpu,xla"], generated["xla"])


def test_bad_implementation_name_in_config() -> None:
    from lcm.models.llama import LlamaConfig

    with pytest.raises(ValueError, match="unknown attention implementation 'gpu'"):
        LlamaConfig.preset("smollm2-135m", attention_implementation="gpu")
    with pytest.raises(ValueError, match="attention_implementation='cpu' must end with 'xla'"):
        LlamaConfig.preset("smollm2-135m", attention_implementation="cpu")


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 70), st.sampled_from([(2, 1), (6, 2), (4, 4)])),
    cache=st.tuples(st.integers(0, 60), st.integers(1, 140)),
    window=st.tuples(st.one_of(st.none(), st.integers(1, 50)), st.integers(0, 12)),
    tiles=st.tuples(st.integers(1, 70), st.sampled_from([16, 32, 48]), st.sampled_from([0, 16, 40])),
    padding=st.one_of(st.none(), st.lists(st.floats(0, 1), min_size=2, max_size=2)),
    long_tiles=st.tuples(st.integers(1, 70), st.sampled_from([0, 1, 40, 100])),
)
def test_cpu_kernel_matches_reference_hypothesis(shape, cache, window, tiles, padding, long_tiles) -> None:
    """Forward only, any query count, offset, filled length, window, sinks, tile sizes, split-K size, left
    padding (each row's prompt starting anywhere in the cache) and long query tiles past any number of keys."""
    _require("cpu")
    (batch, t, (h, kh)), (q_offset, extra), (size, sinks), (q_block, kv_block, split) = shape, cache, window, tiles
    s = q_offset + t + extra // 2
    kv_length = min(q_offset + t, s) if extra % 2 else s  # the chunk's end, or the whole buffer
    q, k, v = _qkv(7, batch, t, s, h, kh, 16)
    mask = masks.causal() & masks.offsets(q_offset, kv_length)
    if size is not None:
        mask &= masks.sliding_window(size, sinks)
    if padding is not None:
        mask &= masks.left_padding(jnp.asarray([int(f * s) for f in padding[:batch]], jnp.int32))
    config = api.CpuConfig(q_block, kv_block, long_tiles[0], long_tiles[1], split)
    got = api.attention(q, k, v, mask=mask, config=config, implementation="cpu")
    np.testing.assert_allclose(got, reference_attention(q, k, v, mask=mask), **F32_TOL)


def test_readme_attention_example_runs() -> None:
    """The README's attention example, executed as written, gives the reference's output."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("# attention over any mask", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(block, scope)
    want = reference_attention(scope["q"], scope["k"], scope["v"], mask=scope["mask"])
    np.testing.assert_allclose(scope["out"], want, **F32_TOL)
    assert scope["lse"].shape == (1, 16, 4)
    # the diagonal tiles are causal (partial); the off-diagonal ones pair different documents (empty)
    np.testing.assert_array_equal(scope["tiles"], [[masks.PARTIAL, masks.EMPTY], [masks.EMPTY, masks.PARTIAL]])
