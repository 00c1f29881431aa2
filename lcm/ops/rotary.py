"""Applying rotary position embeddings: cos/sin tables, the rotation, and Giraffe's randomised positions.

The frequencies come from :func:`lcm.ops.rope.rope_frequencies` (any variant of the RoPE family); this module turns
``(positions, inv_freq, attention_factor)`` into rotated queries or keys in the Hugging Face half-split layout
(``x·cos + rotate_half(x)·sin`` on the first ``2F`` features), so a checkpoint's attention is reproduced exactly.
A model computes the tables once per forward (:func:`rope_cos_sin`) and rotates with them in every layer
(:func:`rotate`); :func:`apply_rope` does both for a single call.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, Real


def rope_cos_sin(
    positions: Real[Array, "B T"],
    inv_freq: Float[Array, " F"],
    attention_factor: float | jax.Array = 1.0,
) -> tuple[Float[Array, "B T R"], Float[Array, "B T R"]]:
    """cos and sin of ``positions · inv_freq`` (``R = 2F``, both halves), in float32, times ``attention_factor``,
    as transformers' ``LlamaRotaryEmbedding`` returns them. :class:`lcm.models.llama.Llama` computes them once
    per forward for all its layers' :func:`rotate` (see ``llama._materialised`` for why that needs care)."""
    if inv_freq.ndim != 1:
        raise ValueError(f"rope_cos_sin: inv_freq must be 1-D, got shape {inv_freq.shape}")
    angles_BxTxF = positions.astype(jnp.float32)[:, :, None] * inv_freq.astype(jnp.float32)[None, None, :]
    angles_BxTxR = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)
    return jnp.cos(angles_BxTxR) * attention_factor, jnp.sin(angles_BxTxR) * attention_factor


def rotate(
    x: Float[Array, "B T H D"],
    cos_BxTxR: Float[Array, "B T R"],
    sin_BxTxR: Float[Array, "B T R"],
    heads_first: bool = False,
) -> Float[Array, "B T H D"]:
    """``x·cos + rotate_half(x)·sin`` on the first ``R`` features (HF half-split layout), in float32, cast back
    to ``x.dtype``; features past ``R`` pass through (partial rotary). cos/sin from :func:`rope_cos_sin`.
    ``heads_first``: ``x`` is ``[B, H, T, D]``, the cache's layout (rotated where it lies, no transposed copy)."""
    batch, length, head_dim = x.shape[0], x.shape[2 if heads_first else 1], x.shape[3]
    rotary_dim = cos_BxTxR.shape[-1]
    if cos_BxTxR.shape != (batch, length, rotary_dim) or sin_BxTxR.shape != cos_BxTxR.shape:
        raise ValueError(
            f"rotate: cos/sin must have shape (B, T, R) with (B, T) = {(batch, length)}, "
            f"got {cos_BxTxR.shape} and {sin_BxTxR.shape}"
        )
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"rotate: the rotary dim R = {rotary_dim} must be even and at most D = {head_dim}")
    x_BxTxHxR = x[..., :rotary_dim].astype(jnp.float32)
    half = rotary_dim // 2
    rotated_BxTxHxR = jnp.concatenate([-x_BxTxHxR[..., half:], x_BxTxHxR[..., :half]], axis=-1)
    heads_axis = 1 if heads_first else 2  # cos/sin broadcast over the heads (the names below say B T H)
    cos, sin = jnp.expand_dims(cos_BxTxR, heads_axis), jnp.expand_dims(sin_BxTxR, heads_axis)
    out_BxTxHxR = (x_BxTxHxR * cos + rotated_BxTxHxR * sin).astype(x.dtype)
    if rotary_dim == head_dim:
        return out_BxTxHxR
    return jnp.concatenate([out_BxTxHxR, x[..., rotary_dim:]], axis=-1)


def apply_rope(
    x: Float[Array, "B T H D"],
    positions: Real[Array, "B T"],
    inv_freq: Float[Array, " F"],
    attention_factor: float | jax.Array = 1.0,
) -> Float[Array, "B T H D"]:
    """Rotates ``x`` in the HF half-split layout: ``x·cos + rotate_half(x)·sin`` on the first ``2F`` features.

    cos/sin of ``positions · inv_freq`` are computed in float32 and multiplied by ``attention_factor``, as in
    transformers' ``LlamaRotaryEmbedding``; unlike it, the product is taken in float32 too (transformers
    casts cos/sin to ``x.dtype`` first) and only the result is cast back to ``x.dtype``. Positions may be
    fractional (interpolated or randomised). Features past ``2F`` pass through (partial rotary).
    """
    batch, length, _, head_dim = x.shape
    if positions.shape != (batch, length):
        raise ValueError(f"apply_rope: positions must have shape (B, T) = {(batch, length)}, got {positions.shape}")
    if inv_freq.ndim != 1 or 2 * inv_freq.shape[-1] > head_dim:
        raise ValueError(
            f"apply_rope: inv_freq must be 1-D with at most D/2 = {head_dim // 2} entries, got shape {inv_freq.shape}"
        )
    return rotate(x, *rope_cos_sin(positions, inv_freq, attention_factor))


def random_positions(key: PRNGKeyArray, length: int, max_position: float) -> Float[Array, " T"]:
    """Giraffe's randomised training positions (Pal et al. 2023, arXiv 2308.10882).

    p_0 = 0 and p_i = u_0 + … + u_{i−1} with gaps u ~ U(0, 2], then all scaled by
    max_position / max(p_last, max_position), so p_last ≤ max_position and positions are only ever shrunk.
    The official code (abacusai/Long-Context) starts at u_0 and caps at the sequence length; we start at 0 so
    the first token keeps its usual position (``max_position = length − 1`` then gives the same range). We
    draw from (0, 2] instead of [0, 2) so positions increase strictly in exact arithmetic; in float32 two
    neighbours can still round to the same value when a gap is below half the float spacing (~5e-4 at 8k),
    so only p_{i+1} ≥ p_i is guaranteed. For a batch, ``jax.vmap`` over keys.
    """
    if length < 1 or not max_position > 0:
        raise ValueError(f"random_positions needs length >= 1 and max_position > 0, got {length}, {max_position}")
    gaps = 2.0 * (1.0 - jax.random.uniform(key, (length - 1,), dtype=jnp.float32))
    positions = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(gaps)])
    scale = max_position / jnp.maximum(positions[-1], max_position)
    return jnp.minimum(positions * scale, max_position)  # the product can round one ulp above max_position
