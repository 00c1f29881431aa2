"""The one entry point of TokenSelect's attention step (select the entries, attend over them).

``implementation`` is a registered name or an ordered list of names tried in turn; a backend that cannot take the
call raises ``NotImplementedError`` and the next one is tried. ``"xla"`` is the plain-``jnp`` reference of
:mod:`lcm.ops.token_select` and is always registered; the paged Pallas kernel (METHODS §5: Q·K over (head,
128-token page) tiles, then attention over the gathered pages) registers here when it lands, behind the same
signature, so models never change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lcm.ops import token_select as reference

IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {"xla": reference.token_select_attention}


def token_select_attention(*args: Any, implementation: str | Sequence[str] = "xla", **kwargs: Any) -> Any:
    """:func:`lcm.ops.token_select.token_select_attention` by the first implementation that takes the call."""
    names = [implementation] if isinstance(implementation, str) else list(implementation)
    if not names:
        raise ValueError(f"implementation must name at least one of {sorted(IMPLEMENTATIONS)}")
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown token_select implementation {name!r}; choose from {sorted(IMPLEMENTATIONS)}")
    for name in names:
        try:
            return IMPLEMENTATIONS[name](*args, **kwargs)
        except NotImplementedError:
            continue
    raise NotImplementedError(f"no token_select implementation among {names} supports this call")
