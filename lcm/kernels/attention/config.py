"""Per-backend settings of :func:`lcm.kernels.attention.api.attention`: one frozen dataclass per backend.

Each backend reads only its own config (``pick``), so tile sizes of one kernel never pass through another's
keywords. Defaults are the tuned values recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """Tiles of the XLA path (:func:`lcm.ops.attention.chunked_attention`), forward and backward."""

    q_block: int = 256  # query rows per tile
    kv_block: int = 256  # keys per tile; empty tiles are skipped, full ones build no mask

    def __post_init__(self) -> None:
        if self.q_block < 1 or self.kv_block < 1:
            raise ValueError(f"XlaConfig tiles must be >= 1, got q_block={self.q_block} kv_block={self.kv_block}")


@dataclasses.dataclass(frozen=True)
class CpuConfig:
    """Tiles of the CPU kernel (``cpu_flash.cc``); its backward runs the XLA path with the :class:`XlaConfig`."""

    q_block: int = 64  # queries per task: with 3 grouped heads a 192 x 64 score tile (BENCHMARKS.md)
    kv_block: int = 64  # keys per inner step; a multiple of 16 (the micro-kernel's width)
    long_q_block: int = 128  # queries per task in a call that sees `long_keys` keys or more
    long_keys: int = 8192  # 0: never use long tiles (BENCHMARKS.md: 16% faster over a 16k prefill, a tie at 8k)
    min_split_keys: int = 256  # decode (split-K): the fewest keys per split; 0: never split

    def __post_init__(self) -> None:
        if self.kv_block <= 0 or self.kv_block % 16 or min(self.q_block, self.long_q_block) <= 0:
            raise ValueError(
                f"CpuConfig kv_block={self.kv_block} must be a multiple of 16, q_block={self.q_block} and "
                f"long_q_block={self.long_q_block} >= 1"
            )
        if self.min_split_keys < 0 or self.long_keys < 0:
            raise ValueError(
                f"CpuConfig min_split_keys={self.min_split_keys} and long_keys={self.long_keys} must be >= 0"
            )


def pick(configs: tuple[Any, ...], kind: type[T]) -> T:
    """The config of type ``kind`` among ``configs``, else its defaults."""
    return next((c for c in configs if isinstance(c, kind)), None) or kind()
