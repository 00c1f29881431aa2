"""The one entry point of attention over a KV cache: ``attention(q, k, v, ..., implementation=...)``.

``implementation`` is a registered name or an ordered list of names tried in turn; a backend that cannot take the
call raises ``NotImplementedError`` and the next one is tried. ``"xla"`` is
:func:`lcm.ops.attention.chunked_attention`, always registered and the reference every backend is tested
against; ``"cpu"`` is the FFI kernel of :mod:`lcm.kernels.attention.cpu` (float32 prefill on a CPU). ``"auto"``
is ``("cpu", "xla")``: the kernel where it applies, XLA everywhere else (accelerators, decode steps, document
masks, bfloat16). Pallas kernels for accelerators register here when they land, behind the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lcm.kernels.attention import cpu
from lcm.ops.attention import chunked_attention

_CPU_ONLY = ("cpu_q_block", "cpu_kv_block")


def _xla(*args: Any, **kwargs: Any) -> Any:
    """chunked_attention, ignoring the CPU kernel's tile sizes."""
    return chunked_attention(*args, **{k: v for k, v in kwargs.items() if k not in _CPU_ONLY})


IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {"xla": _xla, "cpu": cpu.cpu_flash_attention}
ALIASES: dict[str, tuple[str, ...]] = {"auto": ("cpu", "xla")}


def resolve(implementation: str | Sequence[str]) -> tuple[str, ...]:
    """Names to try, in order: ``"auto"``, one name, a comma-separated string or a sequence of names."""
    if isinstance(implementation, str):
        implementation = [name.strip() for name in implementation.split(",")]
    names: list[str] = []
    for name in implementation:
        names.extend(ALIASES.get(name, (name,)))
    if not names:
        raise ValueError(f"implementation must name at least one of {sorted(IMPLEMENTATIONS)} or 'auto'")
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention implementation {name!r}; choose from {sorted(IMPLEMENTATIONS) + ['auto']}"
            )
    return tuple(names)


def attention(*args: Any, implementation: str | Sequence[str] = "auto", **kwargs: Any) -> Any:
    """:func:`lcm.ops.attention.chunked_attention`'s call, by the first implementation that takes it."""
    names = resolve(implementation)
    for name in names:
        try:
            return IMPLEMENTATIONS[name](*args, **kwargs)
        except NotImplementedError:
            continue
    raise NotImplementedError(f"no attention implementation among {list(names)} supports this call")
