"""One decoder layer, jitted once and shared by every layer of a model and by every model family.

The family's Block says what its layer is made of (:class:`lcm.models.llama.Block`,
:class:`lcm.models.gemma3.Block`): ``attention_input(x)`` (the pre-attention norm), ``attn.project_qkv(h)``
(pre-RoPE queries, keys, values, with whatever the family does to them: biases, QK-norm, query scaling),
``add_attention(x, attn)`` and ``add_mlp(x)`` (how the attention's and the MLP's outputs join the residual stream).

The same layer serves the training forward (no state: fresh keys and values of the new tokens, differentiable) and
inference (its own :class:`~lcm.cache.kv.LayerCache`: it writes the new keys and values into its buffer, attends to
what its KV policy's hooks say — the whole buffer, or a selection — and lets the hooks record the statistics the
policy ranks entries by in its state).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lcm.cache.hooks import LayerHooks, LayerView
from lcm.cache.kv import LayerCache
from lcm.kernels.attention import api as attention_api
from lcm.kernels.attention.config import CpuConfig, XlaConfig
from lcm.ops import position_schemes, rotary
from lcm.ops.masks import Mask
from lcm.ops.position_schemes import PositionScheme

Rotation = tuple[Float[Array, "B T R"], Float[Array, "B T R"]]


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """How a layer calls :func:`lcm.kernels.attention.api.attention` (static): implementations and their configs."""

    implementation: tuple[str, ...] = ("xla",)  # lcm.kernels.attention.api names, tried in order
    config: tuple[XlaConfig | CpuConfig, ...] = ()  # per-backend tiles (lcm.kernels.attention.config)


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """The static part of a decoder layer call (hashable: a ``jax.jit`` static argument)."""

    keys_pre_rope: bool = False
    attention: AttentionSettings = AttentionSettings()
    hooks: LayerHooks = LayerHooks()  # what the KV policy records in the layer and what a step attends to
    # a training-free extrapolation scheme (lcm.ops.position_schemes): attention as parts over distance bands, each
    # rotated to its own positions and merged by log-sum-exp; needs keys stored pre-RoPE. None: plain RoPE
    positions: PositionScheme | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What every layer of one forward shares, computed once by the model (a pytree of arrays).

    ``mask`` is the forward's visibility by index — causal, the sliding window, documents, left padding — to
    which a layer with state adds where the new tokens sit in its buffer (:func:`lcm.ops.masks.offsets`).
    ``rotation`` is the cos/sin of the new tokens' positions (:func:`lcm.ops.rotary.rope_cos_sin`). For keys
    stored pre-RoPE, ``slot_positions``/``slot_rotation`` are one layer's slot positions after this chunk and
    their cos/sin: a layer whose positions equal them rotates its keys with that table instead of computing its own
    (cos/sin cost ~5 ms per layer over 8k slots on 2 cores, 30x a decode step's budget). Under a position scheme
    (``LayerSettings.positions``) ``slot_rotation`` holds one table per key position map of the scheme
    (:func:`lcm.ops.position_schemes.key_rotations`).
    """

    positions: Int[Array, "B T"]
    rotation: Rotation
    mask: Mask
    inv_freq: Float[Array, " F"]
    attention_factor: Float[Array, ""] | float
    num_valid: Int[Array, ""]  # real tokens of a right-padded chunk: the layer's length advances by it
    slot_positions: Int[Array, "B S"] | None = None
    slot_rotation: Rotation | tuple[Rotation | None, ...] | None = None
    observers: Bool[Array, "B T"] | None = None  # queries whose attention probabilities add to the scores


def _attend(settings: LayerSettings, q: jax.Array, keys: jax.Array, values: jax.Array, mask: Mask) -> jax.Array:
    return attention_api.attention(
        q, keys, values, mask=mask, implementation=settings.attention.implementation, config=settings.attention.config
    )


def _attend_scheme(
    settings: LayerSettings,
    q_pre: jax.Array,
    q_positions: jax.Array,
    keys_pre: jax.Array,
    key_positions: jax.Array,
    values: jax.Array,
    mask: Mask,
    inputs: LayerInputs,
    rotated_keys: Any = None,
) -> jax.Array:
    """Attention under the layer's position scheme: its parts through the same typed attention call, with lse."""

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, part_mask: Mask) -> tuple[jax.Array, jax.Array]:
        return attention_api.attention(
            q,
            k,
            v,
            mask=part_mask,
            return_lse=True,
            implementation=settings.attention.implementation,
            config=settings.attention.config,
        )

    out, _ = position_schemes.scheme_attention(
        settings.positions,
        attend,
        q_pre,
        q_positions,
        keys_pre,
        key_positions,
        values,
        mask,
        inputs.inv_freq,
        inputs.attention_factor,
        rotated_keys,
    )
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def decoder_layer(
    settings: LayerSettings,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    x: Float[Array, "B T D"],
    state: LayerCache | None,
    inputs: LayerInputs,
) -> tuple[Float[Array, "B T D"], LayerCache | Any]:
    """One pre-norm decoder layer over ``T`` new tokens: ``(x, state) -> (x, state)``.

    With ``state=None`` it is the training layer: the tokens attend to each other's fresh keys and values under
    ``inputs.mask``, and the second output is what ``settings.hooks.record_forward`` returns (None by default).
    With a state the new keys and values go into slots ``state.length…`` of its buffer and the queries attend to
    everything filled. Jitted on its own: the layers of a model share one trace and one lowered
    function inside the model's program (XLA inlines the calls), so tracing and lowering the model costs one layer,
    not 30 — what a second run, whose XLA compilation comes from the disk cache, still pays.

    The KV policy acts through ``settings.hooks`` (:class:`lcm.cache.hooks.LayerHooks`): what a step attends to
    (everything filled, or a selection of it) and what the layer records in its state (attention mass, a retaining
    head's scores); the layer never tests which policy it serves.
    """
    block = nnx.merge(graphdef, params)
    q_pre, k_pre, v = block.attn.project_qkv(block.attention_input(x))
    q = rotary.rotate(q_pre, *inputs.rotation)
    scheme = settings.positions
    if state is None:  # the training layer: no buffer; what the hooks record is returned in the state's place
        keys, values = rotary.rotate(k_pre, *inputs.rotation).swapaxes(1, 2), v.swapaxes(1, 2)
        if scheme is None:
            attn = _attend(settings, q, keys, values, inputs.mask)
        else:
            attn = _attend_scheme(
                settings, q_pre, inputs.positions, k_pre.swapaxes(1, 2), inputs.positions, values, inputs.mask, inputs
            )
        record = settings.hooks.record_forward(
            LayerView(
                q=q,
                q_pre=q_pre,
                k_pre=k_pre,
                v=v,
                keys=keys,
                stored_keys=keys,
                values=values,
                mask=inputs.mask,
                start=jnp.zeros((), jnp.int32),
                num_valid=inputs.num_valid,
                observers=None,
                inv_freq=inputs.inv_freq,
                attention_factor=inputs.attention_factor,
                module=block,
                keys_pre_rope=False,
            )
        )
        return block.add_mlp(block.add_attention(x, attn)), record

    start = state.length
    if scheme is not None and not settings.keys_pre_rope:
        raise ValueError(
            f"position scheme {scheme.name!r} rotates each key per part: the cache must store keys before RoPE "
            "(init_cache(..., keys_pre_rope=True); the Engine does this)"
        )
    k = k_pre if settings.keys_pre_rope else rotary.rotate(k_pre, *inputs.rotation)
    # the chunk goes into the buffer (after its filled slots; a window keeps its latest entries) and the mask onto it
    written, mask = state.write(k, v, inputs.positions, inputs.mask)
    keys, values, positions = written.keys, written.values, written.positions

    def rotated_keys() -> jax.Array:
        """The buffer's keys as attention reads them: rotated from the slot positions when stored pre-RoPE, with
        the forward's shared table when this layer's positions are the ones it was computed for."""
        if not settings.keys_pre_rope:
            return keys

        def own() -> jax.Array:
            return rotary.rotate(
                keys, *rotary.rope_cos_sin(positions, inputs.inv_freq, inputs.attention_factor), heads_first=True
            )

        if inputs.slot_positions is None or inputs.slot_positions.shape != positions.shape:
            return own()
        return jax.lax.cond(
            jnp.array_equal(positions, inputs.slot_positions),
            lambda: rotary.rotate(keys, *inputs.slot_rotation, heads_first=True),
            own,
        )

    hooks = settings.hooks if state.takes_policy else LayerHooks()  # a window state is bounded on its own
    # attention and a hook that reads the keys (the attention mass) share one rotation
    read_keys = rotated_keys() if hooks.reads_keys and inputs.observers is not None else None

    def scheme_keys() -> tuple[jax.Array, ...]:
        """The buffer's keys rotated under each of the scheme's key maps, with the forward's shared tables where
        this layer's positions are theirs (the rotation inside the branch: a branch returning the tables would copy
        them per layer)."""

        def own() -> tuple[jax.Array, ...]:
            tables = position_schemes.key_rotations(scheme, positions, inputs.inv_freq, inputs.attention_factor)
            return position_schemes.rotate_keys(keys, tables)

        if inputs.slot_positions is None or inputs.slot_positions.shape != positions.shape:
            return own()
        return jax.lax.cond(
            jnp.array_equal(positions, inputs.slot_positions),
            lambda: position_schemes.rotate_keys(keys, inputs.slot_rotation),
            own,
        )

    def attend_all() -> jax.Array:
        if scheme is not None:
            return _attend_scheme(
                settings, q_pre, inputs.positions, keys, positions, values, mask, inputs, scheme_keys()
            )
        return _attend(settings, q, rotated_keys() if read_keys is None else read_keys, values, mask)

    view = LayerView(
        q=q,
        q_pre=q_pre,
        k_pre=k_pre,
        v=v,
        keys=read_keys,
        stored_keys=keys,
        values=values,
        mask=mask,
        start=start,
        num_valid=inputs.num_valid,
        observers=inputs.observers,
        inv_freq=inputs.inv_freq,
        attention_factor=inputs.attention_factor,
        module=block,
        keys_pre_rope=settings.keys_pre_rope,
    )
    state = dataclasses.replace(written, length=start + inputs.num_valid)
    attn, state = hooks.attend(view, state, attend_all)
    state = hooks.record(view, state)
    return block.add_mlp(block.add_attention(x, attn)), state.settled(inputs.num_valid)
