"""The one entry point of TokenSelect's attention step (select the entries, attend over them).

``implementation`` is a registered name or an ordered list of names tried in turn; a backend that cannot take the
call raises ``NotImplementedError`` and the next one is tried (:class:`lcm.kernels.dispatch.Dispatch`). ``"xla"``
is the plain-``jnp`` reference of :mod:`lcm.ops.token_select` and is always registered (``"auto"`` is
``("xla",)`` until a kernel lands); the paged Pallas kernel (METHODS §5: Q·K over (head,
128-token page) tiles, then attention over the gathered pages) registers here when it lands, behind the same
signature, so models never change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lcm.kernels.dispatch import Dispatch
from lcm.ops import token_select as reference

DISPATCH = Dispatch("token_select", {"xla": reference.token_select_attention}, {"auto": ("xla",)})
IMPLEMENTATIONS = DISPATCH.implementations
resolve = DISPATCH.resolve


def token_select_attention(*args: Any, implementation: str | Sequence[str] = "auto", **kwargs: Any) -> Any:
    """:func:`lcm.ops.token_select.token_select_attention` by the first implementation that takes the call."""
    return DISPATCH(*args, implementation=implementation, **kwargs)
