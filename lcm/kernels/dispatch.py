"""Named implementations of one operation, tried in order: how ``lcm.kernels`` puts kernels behind one signature.

Each op's ``api.py`` owns a :class:`Dispatch`: a registry of implementations (``"xla"``, the plain-JAX reference
every kernel is tested against, is always one of them) and aliases such as ``"auto"``. A caller names one
implementation, a comma-separated list or a sequence of names; each is tried in turn, and one that cannot take
the call (another backend, dtype or mask) raises ``NotImplementedError`` saying why, so the next is tried; when
none takes it, the error lists every reason. A kernel that
lands later registers a name here and models never change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The implementations of the op ``op`` (``{name: function}``) and its aliases (``{alias: names}``)."""

    op: str
    implementations: dict[str, Callable[..., Any]]
    aliases: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def resolve(self, implementation: str | Sequence[str]) -> tuple[str, ...]:
        """Names to try, in order, from an alias, one name, a comma-separated string or a sequence of names;
        a one-line ``ValueError`` naming the bad name and the choices otherwise."""
        if isinstance(implementation, str):
            implementation = [name.strip() for name in implementation.split(",")]
        names: list[str] = []
        for name in implementation:
            names.extend(self.aliases.get(name, (name,)))
        choices = sorted(self.implementations) + sorted(self.aliases)
        if not names:
            raise ValueError(f"{self.op} implementation must name at least one of {choices}")
        for name in names:
            if name not in self.implementations:
                raise ValueError(f"unknown {self.op} implementation {name!r}; choose from {choices}")
        return tuple(names)

    def __call__(self, *args: Any, implementation: str | Sequence[str], **kwargs: Any) -> Any:
        """The call, by the first implementation among ``implementation`` that takes it; when none does, one
        ``NotImplementedError`` listing each implementation's reason."""
        names = self.resolve(implementation)
        reasons = []
        for name in names:
            try:
                return self.implementations[name](*args, **kwargs)
            except NotImplementedError as declined:
                reasons.append(f"{name}: {declined}" if str(declined) else name)
        raise NotImplementedError(
            f"no {self.op} implementation among {list(names)} takes this call ({'; '.join(reasons)})"
        )
