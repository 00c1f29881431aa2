"""Device meshes and the rules that map lcm's logical axis names onto them.

Parameters and caches name their axes logically (``batch``, ``length``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``vocab``; see :mod:`lcm.models.llama`); this module is the one place that turns those names
into mesh axes (``data``, ``fsdp``, ``tensor``, ``context``), so nothing in ``ops/``, ``models/`` or ``cache/``
names a mesh axis (shared/ARCHITECTURE.md).

    mesh = make_mesh(data=2, tensor=4)
    model = sharded_random_model(cfg, mesh)            # initialised under jit, each device holding its shard only
    cache = shard_cache(model.init_cache(2, 4096), mesh)
    logits, cache = forward(*nnx.split(model), tokens, positions, cache)   # under jax.jit: SPMD over the mesh

A logical name the rules do not list, or whose mesh axes do not divide the dimension, is replicated: a model with
3 KV heads on a 2-way ``tensor`` axis keeps its K/V projections whole instead of failing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcm.cache.kv import SLOT_FIELDS, KVCache, LayerCache
from lcm.models.llama import Llama, LlamaConfig, abstract_model

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical name -> mesh axes; the usual data + FSDP + tensor (Megatron) layout, context parallelism over the sequence
DEFAULT_RULES: Mapping[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": ("context",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}

# a layer's state's axes: keys and values [B, K, S, D], positions [B, S], per-entry statistics [B, K, S]


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, context: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor, context)`` mesh over ``devices`` (default: all), whose sizes must multiply to
    their number."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "context": context}
    bad = {name: size for name, size in sizes.items() if not isinstance(size, int) or size <= 0}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers, got {bad}")
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, got {len(devices)}")
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), MESH_AXES)


def logical_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES
) -> PartitionSpec:
    """The mesh ``PartitionSpec`` of an array with logical ``axes``: each name mapped by ``rules``; a name that is
    not in the rules, whose mesh axes do not divide its dimension, or whose mesh axes an earlier dimension took, is
    replicated (``None``)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[tuple[str, ...] | None] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)  # a size-1 (or absent) axis shards nothing
        if not mesh_axes or size % math.prod(mesh.shape[a] for a in mesh_axes):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
    return PartitionSpec(*spec)


def param_shardings(
    model: Llama | nnx.State, mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES
) -> nnx.State:
    """A ``NamedSharding`` per parameter of ``model`` (a module, abstract or real, or its ``nnx.Param`` state),
    from the logical axes each parameter carries (``out_sharding`` metadata)."""
    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)

    def sharding(param: nnx.Variable) -> NamedSharding:
        axes = param.get_metadata().get("out_sharding") or (None,) * len(param.shape)
        return NamedSharding(mesh, logical_spec(axes, param.shape, mesh, rules))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_random_model(
    cfg: LlamaConfig, mesh: Mesh, seed: int = 0, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES
) -> Llama:
    """``Llama(cfg, rngs=nnx.Rngs(seed))`` initialised by one jitted program whose outputs are laid out by
    :func:`param_shardings`: abstract first, so no device ever holds an unsharded copy (ARCHITECTURE.md)."""
    graphdef, abstract = nnx.split(abstract_model(cfg))
    shardings = param_shardings(abstract, mesh, rules)
    init = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings)
    return nnx.merge(graphdef, init())


def shard_params(model: Llama, mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> Llama:
    """``model`` with its parameters moved onto ``mesh`` by :func:`param_shardings` (a loaded checkpoint)."""
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, rules)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def shard_cache(cache: KVCache, mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> KVCache:
    """``cache`` placed on ``mesh``: in every layer, batch rows over the data axes, KV heads over ``tensor``,
    slots over ``context`` (where they divide); filled lengths replicated."""

    def put(value: jax.Array, axes: Sequence[str]) -> jax.Array:
        return jax.device_put(value, NamedSharding(mesh, logical_spec(axes, value.shape, mesh, rules)))

    def place(layer: LayerCache) -> LayerCache:
        placed = {
            name: put(getattr(layer, name), axes)
            for name, axes in SLOT_FIELDS.items()
            if isinstance(getattr(layer, name), jax.Array)
        }
        placed["length"] = jax.device_put(layer.length, NamedSharding(mesh, PartitionSpec()))
        return dataclasses.replace(layer, **placed)

    starts = None if cache.starts is None else put(cache.starts, ("batch",))
    return dataclasses.replace(cache, layers=tuple(place(layer) for layer in cache.layers), starts=starts)
