"""What every decoder model of lcm shares: its parameters' creation, the inputs one forward computes once for its
layers, and the checks on a call's arguments.

A model module (:mod:`lcm.models.llama`, :mod:`lcm.models.gemma3`) defines its Block (norms, projections, MLP and
how they join the residual stream) and which :class:`~lcm.models.decoder_layer.LayerInputs` each layer gets (its
mask and its RoPE table); the layer function, :func:`lcm.models.decoder_layer.decoder_layer`, is one for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lcm.cache.hooks import LayerHooks
from lcm.cache.kv import KVCache, LayerCache
from lcm.kernels.attention import api as attention_api
from lcm.kernels.attention.config import XlaConfig
from lcm.models.decoder_layer import AttentionSettings, LayerInputs, LayerSettings
from lcm.ops import position_schemes, rotary
from lcm.ops import rope as rope_ops
from lcm.ops.masks import Mask
from lcm.ops.position_schemes import PositionScheme

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


_POSITIVE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "attention_q_block",
    "attention_kv_block",
    "attention_decode_kv_block",
)
# RoPE variants that scale relative to the trained context L0; `rope_fields` fills it in from the config
USES_ORIGINAL_LENGTH = frozenset({"dynamic", "yarn", "llama3", "longrope"})


class DecoderConfig:
    """What every decoder config (a frozen dataclass) shares: named presets, the checks of its common fields, its
    dtypes, and the fields of another RoPE variant. A family's config adds its own fields, presets and checks."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # the family's named architectures

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Any:
        """A named architecture (:attr:`presets`), with any field overridden."""
        if name not in cls.presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(cls.presets)}")
        return cls(**(cls.presets[name] | overrides))

    def check_common(self, *positive: str) -> None:
        """One-line ValueErrors for the fields every family has (and ``positive`` ones of its own); freezes
        ``rope_params`` into sorted pairs and validates them for the head dimension."""
        for name in (*_POSITIVE, *positive):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        check_dtypes(self)
        check_attention_implementation(self.attention_implementation)
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.rope_params).items()}
        object.__setattr__(self, "rope_params", tuple(sorted(frozen.items())))
        rope_ops.validate_rope_params(self.rope_variant, dict(self.rope_params), self.head_dim)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        """The compute dtype (activations, the KV cache)."""
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        """The parameters' dtype as stored (cast to the compute dtype where used)."""
        return DTYPES[self.param_dtype]

    def rope_fields(self, variant: str, params: dict[str, Any] | None, layers: str) -> dict[str, Any]:
        """``rope_variant``/``rope_params`` of another variant (``original_max_position_embeddings`` defaults to
        L0); ``layers`` is checked to be ``global`` or ``all``."""
        if layers not in ("global", "all"):
            raise ValueError(f"layers={layers!r}; choose one of ['global', 'all']")
        params = dict(params or {})
        if variant in USES_ORIGINAL_LENGTH:
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return {"rope_variant": variant, "rope_params": tuple(sorted(params.items()))}


def check_dtypes(cfg: Any) -> None:
    """A config's ``dtype`` and ``param_dtype`` are ones lcm computes in (one-line ValueError otherwise)."""
    for name in ("dtype", "param_dtype"):
        value = getattr(cfg, name)
        if value == "float16":
            raise ValueError(
                f"{name}='float16' is not supported: activations of these models overflow its range (max 65504) "
                "and softmax statistics lose precision; use bfloat16 (float32's range) or float32"
            )
        if value not in DTYPES:
            raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(DTYPES)}")


def check_attention_implementation(name: str) -> None:
    if attention_api.resolve(name)[-1] != "xla":
        raise ValueError(
            f"attention_implementation={name!r} must end with 'xla', the path that "
            "takes every call (decode steps, document masks, bfloat16); e.g. 'cpu,xla' or 'auto'"
        )


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: jnp.dtype,
    fan_in: int | None,
    fill: float = 1.0,
) -> nnx.Param:
    """``fill`` (norm scales, ``fan_in=None``: ones, or zeros for a ``1 + w`` norm), zeros (biases, ``fan_in=0``) or
    N(0, 1/fan_in). ``rngs=None`` gives a ``jax.ShapeDtypeStruct``, shapes only, for an abstract model: what
    ``nnx.eval_shape`` would give, without tracing anything (tracing 211 ``nnx.Rngs`` draws cost 1.6 s, and the
    constant fills 0.1-0.2 s, in every process that loads a checkpoint)."""
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, dtype), out_sharding=axes, eager_sharding=False)
    if fan_in is None:
        value = jnp.full(shape, fill, dtype)
    elif fan_in == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in**-0.5).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def attention_settings(cfg: Any, decode: bool) -> AttentionSettings:
    """The attention implementations and tiles of a config: single-token decode steps take wider key tiles."""
    kv_block = cfg.attention_decode_kv_block if decode else cfg.attention_kv_block
    implementation = attention_api.resolve(cfg.attention_implementation)
    return AttentionSettings(implementation, (XlaConfig(cfg.attention_q_block, kv_block),))


def inference_settings(cfg: Any, cache: KVCache, seq: int) -> LayerSettings:
    """The static part of an inference forward's layer calls: how keys are stored, the attention settings (wider key
    tiles for a one-token step), the KV policy's hooks and the config's position scheme."""
    return LayerSettings(
        keys_pre_rope=cache.keys_pre_rope,
        attention=attention_settings(cfg, decode=seq == 1),
        hooks=LayerHooks() if cache.hooks is None else cache.hooks,
        positions=getattr(cfg, "position_scheme", None),
    )


def check_call(
    num_layers: int, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: KVCache
) -> tuple[int, int]:
    """``(batch, T)`` of an inference call, after checking the cache fits it (one-line ValueErrors)."""
    batch, seq = tokens.shape
    chex.assert_shape(positions, (batch, seq))
    chex.assert_type([tokens, positions], [int, int])
    if len(cache.layers) != num_layers:
        raise ValueError(f"the cache holds {len(cache.layers)} layers, the model {num_layers}")
    if cache.batch != batch:
        raise ValueError(f"cache batch {cache.batch} != tokens batch {batch}")
    if seq > min(cache.capacities):
        raise ValueError(f"{seq} new tokens exceed the cache capacity {min(cache.capacities)}")
    if cache.starts is not None:  # left-padded rows: attention sees padding and prompt as two documents
        chex.assert_shape(cache.starts, (batch,))
    return batch, seq


def default_rope_length(positions: Int[Array, "B T"], num_valid: Int[Array, ""]) -> Int[Array, ""]:
    """The length length-dependent RoPE variants scale for: the largest real position + 1 (transformers')."""
    real = jnp.arange(positions.shape[1]) < num_valid
    return jnp.max(jnp.where(real[None], positions, 0)) + 1


def layer_inputs(
    positions: Int[Array, "B T"],
    reference: LayerCache,
    keys_pre_rope: bool,
    inv_freq: Float[Array, " F"],
    attention_factor: Float[Array, ""] | float,
    mask: Mask,
    num_valid: Int[Array, ""],
    observers: Bool[Array, "B T"] | None,
    scheme: PositionScheme | None = None,
) -> LayerInputs:
    """What the layers sharing one RoPE table and mask get in an inference forward: cos/sin of the chunk's
    positions and (keys stored pre-RoPE) of ``reference``'s slot positions after this chunk, which every layer
    numbering its slots alike reuses; computed once, not per layer (:func:`materialised`). Under a position
    ``scheme`` the slot tables are the scheme's, one per key position map."""

    def slot_tables(slots: jax.Array) -> Any:
        if scheme is None:
            return rotary.rope_cos_sin(slots, inv_freq, attention_factor)
        return position_schemes.key_rotations(scheme, slots, inv_freq, attention_factor)

    slot_positions = None
    if keys_pre_rope:
        slot_positions = jax.lax.dynamic_update_slice(reference.positions, positions, (jnp.int32(0), reference.length))
    rotation, slot_rotation = materialised(
        reference.length,
        lambda: (
            rotary.rope_cos_sin(positions, inv_freq, attention_factor),
            None if slot_positions is None else slot_tables(slot_positions),
        ),
    )
    return LayerInputs(
        positions=positions,
        rotation=rotation,
        mask=mask,
        inv_freq=inv_freq,
        attention_factor=attention_factor,
        num_valid=num_valid,
        slot_positions=slot_positions,
        slot_rotation=slot_rotation,
        observers=observers,
    )


def run_layers(
    call: Callable[[nnx.GraphDef, nnx.State, jax.Array, Any, LayerInputs], tuple[jax.Array, Any]],
    blocks: Sequence[nnx.Module],
    x: jax.Array,
    states: Sequence[Any],
    inputs: Sequence[LayerInputs],
    period: int | None = None,
) -> tuple[jax.Array, list[Any]]:
    """``x`` through ``blocks`` in order, ``call(graphdef, params, x, state, inputs) -> (x, out)`` per layer with its
    state (or None) and inputs; returns ``x`` and each layer's ``out``.

    With ``period`` the layers run as one ``lax.scan`` over groups of ``period`` consecutive layers (a hybrid's
    repeating group, e.g. five local layers and a global one, is one scan step; ``period=1`` scans single layers):
    layer ``g * period + j`` is position ``j`` of group ``g``, and the parameters and states of each position are
    stacked over the groups, so they must have equal shapes there, and ``inputs`` must repeat with the period. One
    group is traced and compiled whatever the depth."""
    if period is None:
        outs = []
        for block, state, layer_inputs_ in zip(blocks, states, inputs, strict=True):
            x, out = call(*nnx.split(block), x, state, layer_inputs_)
            outs.append(out)
        return x, outs
    count = len(blocks)
    if period <= 0 or count % period:
        raise ValueError(f"cannot scan {count} layers in groups of {period}")
    groups = count // period
    graphdef = nnx.split(blocks[0])[0]
    at = [[g * period + j for g in range(groups)] for j in range(period)]  # the layers at each position
    params = [stack([nnx.split(blocks[i])[1] for i in layers]) for layers in at]
    stacked = [None if states[layers[0]] is None else stack([states[i] for i in layers]) for layers in at]

    def group(x: jax.Array, xs: tuple[list[nnx.State], list[Any]]) -> tuple[jax.Array, tuple[Any, ...]]:
        outs = []
        for j, (params_j, state_j) in enumerate(zip(*xs, strict=True)):
            x, out = call(graphdef, params_j, x, state_j, inputs[j])
            outs.append(out)
        return x, tuple(outs)

    x, outs = jax.lax.scan(group, x, (params, stacked))
    per_layer: list[Any] = [None] * count
    for j, layers in enumerate(at):
        for g, i in enumerate(layers):
            per_layer[i] = None if outs[j] is None else jax.tree.map(lambda a, g=g: a[g], outs[j])
    return x, per_layer


def materialised(operand: jax.Array, compute: Callable[[], Any]) -> Any:
    """``compute()``, computed once into buffers. XLA's CPU fusion otherwise recomputes cheap-looking producers
    inside every consumer: the RoPE sin/cos went into each layer's rotation (60 copies per forward, scalar libm
    calls, ~3% of a 2k prefill; with pre-RoPE keys 30 copies over the whole cache per chunk), and an
    optimisation barrier does not stop it (the CPU pipeline expands barriers before fusion). The branches of a
    ``lax.cond`` are computations of their own whose outputs are buffers; both branches are ``compute``, so the
    result does not depend on the predicate, a value XLA cannot fold (the cache length)."""
    return jax.lax.cond(operand > 0, compute, compute)


def equal_shapes(trees: Sequence[Any]) -> bool:
    """Whether pytrees have one structure and equal shapes and dtypes (they can be stacked)."""
    return len({str(jax.tree.map(lambda a: (a.shape, a.dtype), tree)) for tree in trees}) == 1


def stack(trees: Sequence[Any]) -> Any:
    """Pytrees of equal structure and shapes, stacked on a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def map_params(model: nnx.Module, fn: Callable[[tuple[str, ...], Any], jax.Array]) -> Any:
    """A copy of ``model`` with each parameter replaced by ``fn(path, old)`` (path as strings)."""
    graphdef, state = nnx.split(model)

    def replace(path: tuple[Any, ...], leaf: Any) -> Any:
        names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        return fn(names[:-1] if names[-1] == "value" else names, leaf)

    state = jax.tree_util.tree_map_with_path(replace, state)
    return nnx.merge(graphdef, state)


def param_count(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
