"""The one entry point of attention over a KV cache: ``attention(q, k, v, ..., implementation=...)``.

``implementation`` is a registered name or an ordered list of names tried in turn; a backend that cannot take the
call raises ``NotImplementedError`` and the next one is tried. ``"xla"`` is
:func:`lcm.ops.attention.chunked_attention`, always registered and the reference every backend is tested
against; ``"cpu"`` is the FFI kernel of :mod:`lcm.kernels.attention.cpu` (float32 prefill and decode on a CPU,
left padding included). ``"auto"`` is ``("cpu", "xla")``: the kernel where it applies, XLA everywhere else
(accelerators, document masks, bfloat16). Pallas kernels for accelerators register here when they land, behind
the same signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lcm.kernels.attention import cpu
from lcm.kernels.dispatch import Dispatch
from lcm.ops.attention import chunked_attention

_CPU_ONLY = ("cpu_q_block", "cpu_kv_block", "cpu_min_split_keys", "cpu_long_q_block", "cpu_long_keys")


def _xla(*args: Any, **kwargs: Any) -> Any:
    """chunked_attention, ignoring the CPU kernel's tile sizes."""
    return chunked_attention(*args, **{k: v for k, v in kwargs.items() if k not in _CPU_ONLY})


DISPATCH = Dispatch("attention", {"xla": _xla, "cpu": cpu.cpu_flash_attention}, {"auto": ("cpu", "xla")})
IMPLEMENTATIONS = DISPATCH.implementations
resolve = DISPATCH.resolve


def register_custom_calls() -> None:
    """Register every backend's custom calls that this process can run. Tracing a call registers its kernel;
    an executable loaded from disk without tracing (``lcm.io.compile_cache.persistent_jit``) needs this first."""
    cpu.available()


def attention(*args: Any, implementation: str | Sequence[str] = "auto", **kwargs: Any) -> Any:
    """:func:`lcm.ops.attention.chunked_attention`'s call, by the first implementation that takes it."""
    return DISPATCH(*args, implementation=implementation, **kwargs)
