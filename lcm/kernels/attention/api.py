"""The one typed entry point of attention: ``attention(q, k, v, *, mask, ...)``.

Shapes: queries ``q [B, T, H, D]``; keys and values heads-first, ``k, v [B, K, S, D]`` (the KV cache's layout,
``H`` a multiple of ``K``: GQA); the output is ``[B, T, H, D]`` in ``q``'s dtype, and with ``return_lse=True``
also each row's log-sum-exp ``[B, T, H]`` in float32 (``-inf`` for a row that sees no key). Visibility is the
:class:`lcm.ops.masks.Mask` (causal, offsets, windows, sinks, documents, padding, prefix, cross, block-sparse);
``normalizer`` is one of :data:`lcm.ops.attention.NORMALIZERS`.

``implementation`` is a registered name, a comma-separated string or a sequence of names tried in turn (``None``:
the platform's default). A backend that cannot take a call raises ``NotImplementedError`` saying why and the next
is tried; when none takes it, the error lists every backend's reason. ``"xla"`` is
:func:`lcm.ops.attention.chunked_attention`, always registered, the path every backend is tested against;
``"cpu"`` is the FFI kernel of :mod:`lcm.kernels.attention.cpu` (float32, causal masks with offsets, windows,
sinks and left padding). Pallas kernels for accelerators register here when they land, behind the same signature.

``config`` holds per-backend settings, each backend's own dataclass (:class:`XlaConfig`, :class:`CpuConfig`): one
config, or a sequence of them, each read by the backend it belongs to, so no backend sees another's keywords.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jaxtyping import Array, Float

from lcm.kernels.attention import cpu
from lcm.kernels.attention.config import CpuConfig, XlaConfig, pick
from lcm.kernels.dispatch import Dispatch
from lcm.ops.attention import check_call, chunked_attention
from lcm.ops.masks import Mask

__all__ = ["CpuConfig", "XlaConfig", "attention", "default_implementation", "resolve"]


def _xla(q, k, v, *, mask, scale, normalizer, return_lse, configs):
    tiles = pick(configs, XlaConfig)
    return chunked_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        normalizer=normalizer,
        return_lse=return_lse,
        q_block=tiles.q_block,
        kv_block=tiles.kv_block,
    )


DISPATCH = Dispatch("attention", {"xla": _xla, "cpu": cpu.cpu_flash_attention}, {"auto": ("cpu", "xla")})
IMPLEMENTATIONS = DISPATCH.implementations
# the default per platform: the CPU kernel where it applies on a CPU, XLA everywhere
DEFAULTS = {"cpu": ("cpu", "xla")}


def resolve(implementation: str | Sequence[str] | None) -> tuple[str, ...]:
    """Names to try, in order; ``None`` is :func:`default_implementation`."""
    return default_implementation() if implementation is None else DISPATCH.resolve(implementation)


def default_implementation(platform: str | None = None) -> tuple[str, ...]:
    """The implementations ``attention`` tries when none is named, on ``platform`` (default: JAX's backend)."""
    return DEFAULTS.get(platform or jax.default_backend(), ("xla",))


def attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B K S D"],
    v: Float[Array, "B K S D"],
    *,
    mask: Mask,
    scale: float | None = None,
    normalizer: str = "softmax",
    return_lse: bool = False,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
) -> Float[Array, "B T H D"] | tuple[Float[Array, "B T H D"], Float[Array, "B T H"]]:
    """Attention of ``q`` over ``k``, ``v`` under ``mask`` (the module docstring's shapes), by the first
    implementation that takes the call. ``scale`` defaults to ``D ** -0.5``."""
    check_call(q, k, v, mask, normalizer)
    configs = _configs(config)
    return DISPATCH(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        normalizer=normalizer,
        return_lse=return_lse,
        configs=configs,
        implementation=resolve(implementation),
    )


def _configs(config: Any) -> tuple[Any, ...]:
    if config is None:
        configs: tuple[Any, ...] = ()
    elif isinstance(config, list | tuple):
        configs = tuple(config)
    else:
        configs = (config,)
    for item in configs:
        if not isinstance(item, XlaConfig | CpuConfig):
            raise TypeError(f"attention config must be XlaConfig or CpuConfig instances, got {type(item).__name__}")
    kinds = [type(item) for item in configs]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"one config per backend, got {[k.__name__ for k in kinds]}")
    return configs
