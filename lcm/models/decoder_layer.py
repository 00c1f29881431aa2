"""One pre-norm decoder layer of the LLaMA family, jitted once and shared by every layer of a model.

The layer is where the KV policies meet attention: it writes the new keys and values into the stacked cache, reads
the whole layer (full attention, any mask) or TokenSelect's selection of it, and feeds the statistics policies rank
entries by (attention mass for H2O/SnapKV/InfiniPot, retaining-head scores for Locret) back into the cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lcm.cache.kv import write_layer
from lcm.kernels.attention import api as attention_api
from lcm.kernels.attention.config import CpuConfig, XlaConfig
from lcm.kernels.token_select import api as token_select_api
from lcm.ops import masks, rotary
from lcm.ops.kv_scores import attention_mass
from lcm.ops.token_select import SelectionCache, TokenSelectRule


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """How a layer calls :func:`lcm.kernels.attention.api.attention` (static): implementations and their configs."""

    implementation: tuple[str, ...] = ("xla",)  # lcm.kernels.attention.api names, tried in order
    config: tuple[XlaConfig | CpuConfig, ...] = ()  # per-backend tiles (lcm.kernels.attention.config)


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """The static part of a decoder layer call (hashable: a ``jax.jit`` static argument)."""

    window: int | None
    keys_pre_rope: bool
    attention: AttentionSettings = AttentionSettings()
    select: TokenSelectRule | None = None  # TokenSelect: attend to the selected entries once the cache is larger
    retain: bool = False  # Locret: write each block's retaining-head scores of the new entries into the scores


def _after(x: jax.Array, dependency: jax.Array) -> jax.Array:
    """``x``, unchanged, made to depend on ``dependency`` (``x + 0 * sum(dependency)``; finite ``dependency``).

    XLA writes the stacked cache in place only where it can order every read of the layer before the next
    layer's write. The attention mass reads the layer's keys but feeds only the scores, not the hidden state the
    next layer writes from, so nothing ordered the two: XLA copied the whole ``[L, B, K, S, D]`` keys once per
    layer in every prefill chunk of H2O and SnapKV. ``optimization_barrier`` does not order them on CPU (its
    pipeline expands barriers before copy insertion); a data dependency does, and ``0 * finite`` is an exact zero
    that XLA does not fold away for floats.
    """
    return x + jnp.zeros((), x.dtype) * jnp.sum(dependency).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def decoder_layer(
    settings: LayerSettings,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    x: Float[Array, "B T D"],
    keys: Float[Array, "L B K S hd"],
    values: Float[Array, "L B K S hd"],
    layer: Int[Array, ""],
    start: Int[Array, ""],
    rotation: tuple[Float[Array, "B T R"], Float[Array, "B T R"]],
    cache_rotation: tuple[Float[Array, "B S R"], Float[Array, "B S R"]] | None,
    inv_freq: Float[Array, " F"],
    attention_factor: float | jax.Array,
    q_segments: Int[Array, "B T"] | None = None,
    k_segments: Int[Array, "B S"] | None = None,
    kv_start: Int[Array, " B"] | None = None,
    scores: Float[Array, "L B K S"] | None = None,
    observers: Bool[Array, "B T"] | None = None,
    num_valid: Int[Array, ""] | None = None,
    selection: SelectionCache | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, SelectionCache | None]:
    """One pre-norm decoder layer over ``T`` new tokens, writing its keys and values into the stacked cache.

    Jitted on its own, with the layer index a traced argument: the 30 layers of a model share one trace and one
    lowered function inside the model's program (XLA inlines the calls), so tracing and lowering the model costs
    one layer, not 30 — what a second run, whose XLA compilation comes from the disk cache, still pays.

    With ``settings.select`` (TokenSelect) the layer attends to the whole cache while it holds at most
    ``select.budget`` entries and to TokenSelect's selection beyond (a ``lax.cond``: one branch runs), updating
    its slice of the stacked ``selection`` cache; ``num_valid`` counts the chunk's real tokens. With
    ``settings.retain`` (Locret) the block's retaining head scores the new entries into ``scores``.

    ``kv_start [B]`` marks left-padded rows (:func:`lcm.ops.masks.left_padding`): the prompt of row ``b``
    starts at slot ``kv_start[b]``, and no prompt token attends to the padding before it.

    ``rotation`` is the cos/sin of the new tokens' positions (:func:`lcm.ops.rotary.rope_cos_sin`) and
    ``cache_rotation`` that of every cache slot's position (only when keys are stored pre-RoPE): the model
    computes both once per forward for all its layers.
    """
    block = nnx.merge(graphdef, params)
    q_pre, k_pre, v = block.attn.project_qkv(block.input_norm(x))
    q = rotary.rotate(q_pre, *rotation)
    k = k_pre if settings.keys_pre_rope else rotary.rotate(k_pre, *rotation)
    keys, values = write_layer(keys, values, layer, start, k, v)

    observed = scores is not None and observers is not None  # a policy ranks entries by attention mass

    def readable() -> tuple[jax.Array, jax.Array, jax.Array | int]:
        """The stacked cache and the layer to read: attention reads layer ``layer`` where it lies (slicing it out
        copies it), unless the layer is read twice (attention and the mass a policy ranks by) or its keys are
        stored pre-RoPE (a policy may renumber): then a copy of the layer, its keys rotated."""
        if not (settings.keys_pre_rope or observed):
            return keys, values, layer
        layer_keys = keys[layer]
        if settings.keys_pre_rope:
            layer_keys = rotary.rotate(layer_keys, *cache_rotation, heads_first=True)
        # The barrier keeps XLA from fusing these reads with the next layer's in-place write into the stacked
        # cache, and the copy gives the cache one reader: otherwise the write is no longer in place and XLA
        # copies the whole [L, B, K, S, D] keys or values once per layer (30 copies of the cache per step; a
        # decode step at 1.5k pre-RoPE entries took 7x its time).
        layer_keys, layer_values = jax.lax.optimization_barrier((layer_keys, values[layer]))
        return layer_keys[None], layer_values[None], 0

    read_once = readable() if observed else None  # attention and the mass read one copy

    # causal over cache slots: the chunk sits at slots start..; the cache is filled up to its end
    mask = masks.causal() & masks.offsets(q_offset=start, kv_length=start + x.shape[1])
    if settings.window is not None:
        mask &= masks.sliding_window(settings.window)
    if kv_start is not None:
        mask &= masks.left_padding(kv_start)
    if q_segments is not None or k_segments is not None:
        mask &= masks.documents(q_segments, k_segments)

    def full_attention() -> jax.Array:
        layer_keys, layer_values, read_layer = read_once or readable()
        return attention_api.attention(
            q,
            layer_keys,
            layer_values,
            mask=mask,
            implementation=settings.attention.implementation,
            config=settings.attention.config,
            layer=read_layer,
        )

    rule = settings.select
    if rule is None or rule.budget >= keys.shape[3]:  # a cache no larger than the budget is always attended fully
        attn = full_attention()
    else:
        filled = start + (x.shape[1] if num_valid is None else num_valid)
        layer_selection = jax.tree.map(lambda s: s[layer], selection)

        def selected() -> tuple[jax.Array, SelectionCache]:
            out, new_selection, _ = token_select_api.token_select_attention(
                q_pre,
                keys[layer],
                values[layer],
                filled,
                layer_selection,
                inv_freq=inv_freq,
                attention_factor=attention_factor,
                n_init=rule.n_init,
                k=rule.k,
                n_local=rule.n_local,
                # the selection cache serves decode steps only: 512-query means of prefill chunks are alike
                # (cosine >= 0.9) whatever they attend to, and reusing them kept stale selections (lcm.ops.token_select)
                threshold=rule.threshold if x.shape[1] == 1 else jnp.inf,
                num_valid=num_valid,
            )
            return out.astype(q.dtype), new_selection

        attn, layer_selection = jax.lax.cond(
            filled <= rule.budget, lambda: (full_attention(), layer_selection), selected
        )
        selection = jax.tree.map(
            lambda s, new: jax.lax.dynamic_update_index_in_dim(s, new, layer, axis=0), selection, layer_selection
        )
    if observed:  # a KV policy ranks entries by the attention they receive
        # the extra consumer of q and the keys changes XLA's fusion of this layer: outputs then differ from the
        # full cache's by float32 round-off (~1e-7), which optimisation barriers did not remove
        layer_keys, _, _ = read_once
        mass = attention_mass(q, layer_keys[0], observers, mask=mask)
        scores = scores.at[layer].add(mass)
        attn = _after(attn, mass)
    if scores is not None and settings.retain:  # Locret: the layer's retaining head scores each new entry
        predicted_BxTxK = block.retaining(q_pre, k_pre, v).astype(jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        scores = jax.lax.dynamic_update_slice(
            scores, predicted_BxTxK.swapaxes(1, 2)[None], (jnp.asarray(layer, jnp.int32), zero, zero, start)
        )
    x = x + block.attn.output(attn)
    x = x + block.mlp(block.post_attention_norm(x))
    return x, keys, values, scores, selection
