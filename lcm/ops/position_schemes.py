"""Training-free extrapolation past the trained length L: position schemes inside attention (METHODS.md §12).

Each scheme keeps every relative position a query attends with inside the range the model was trained on. It splits
one causal attention into parts by the distance between a query and a key (complementary :func:`lcm.ops.masks.band`
masks over RoPE positions), rotates the queries and keys of each part to that part's positions, and merges the parts'
outputs exactly by their log-sum-exps (:func:`merge_parts`): one softmax over every visible key, never an ``S x S``
matrix (each part is a tiled attention call that visits only its band's tiles). Keys are therefore cached *before*
RoPE and rotated per part when read.

- ``selfextend`` (Jin et al., ICML 2024, datamllab/LongLM ``self_extend_patch``): neighbour window ``window`` (w),
  group size ``group`` (G). Distance < w: ordinary RoPE. Distance >= w: keys at ``p // G``, queries at
  ``p // G + w - w // G``, so grouped distances continue from the window. Longest supported length
  ``(L - w) * G + w``. Defaults G = 16, w = 1024: the README's empirical rule for an 8k model read to 32k,
  ``(1/2 ~ 2/3) L > w + (N - w) / G``, holds (1024 + 31744 / 16 = 3008 < 4096).
- ``dca`` (Dual Chunk Attention, An et al., ICML 2024, HKUNLP/ChunkLlama ``chunkllama_attn_replace.py``):
  ``chunk`` s (default 3L/4, as ``replace_with_chunkllama``) and ``window`` w (default L/16); chunks of
  ``c = s - w`` positions. Keys at ``p mod c``. Same chunk (intra): queries at ``p mod c``. The previous chunk
  (successive): queries at ``min(p mod c + c, s)``. Earlier chunks (inter): queries at ``s``. As in the official
  code, where METHODS.md's summary says the inter and successive queries saturate at ``L - 1``: the code's cos/sin
  cache clamps at ``chunk_size`` = s (so the largest relative position is s < L). No length limit.
- ``rerope`` (Su 2023, bojone/rerope): relative distances clipped at ``window`` w: ordinary RoPE below w; beyond,
  the query rotated to position w against an unrotated key (distance w). With ``leak`` k > 1 it is leaky ReRoPE:
  beyond w the distance is ``w + (d - w) / k`` (queries at ``p / k + w - w / k``, keys at ``p / k``), longest
  length ``(L - w) * k + w``. Default w = 512 (Su's 4k runs used w in 256-1536; the window is a local one).

A scheme is a frozen dataclass (hashable: a static argument of the jitted layer). It names its parts' bands, each
part's query positions and which of its key position maps the part reads (:meth:`PositionScheme.key_positions`:
the keys of a buffer are rotated once per map, not once per part). Positions are the model's RoPE positions
(``[B, T]`` for the queries, ``[B, S]`` for the buffer's slots); the same numbers decide the bands, so a compacted
cache (evicted entries) keeps the scheme's definition.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lcm.ops import rotary
from lcm.ops.masks import Band, Mask

Rotation = tuple[Float[Array, "B S R"], Float[Array, "B S R"]]
# attend(q [B,T,H,D], k [B,K,S,D], v [B,K,S,D], mask) -> (out [B,T,H,D], lse [B,T,H])
Attend = Callable[[jax.Array, jax.Array, jax.Array, Mask], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class PositionScheme:
    """The interface: ``bands()`` (one :class:`~lcm.ops.masks.Band` per part, complementary over distances >= 0),
    ``query_positions(part, p)``, ``key_positions(p)`` (the distinct key maps; ``None`` leaves keys unrotated) and
    ``key_map(part)`` (which of them the part reads), ``max_length(L)`` (the longest length a setting supports,
    None for no limit) and ``resolved(L)`` (the scheme with defaults that depend on L filled in)."""

    name: ClassVar[str] = ""
    params: ClassVar[Mapping[str, type]] = {}

    def bands(self) -> tuple[Band, ...]:
        raise NotImplementedError

    def query_positions(self, part: int, positions: Int[Array, "B T"]) -> jax.Array:
        raise NotImplementedError

    def key_positions(self, positions: Int[Array, "B S"]) -> tuple[jax.Array | None, ...]:
        raise NotImplementedError

    def key_map(self, part: int) -> int:
        raise NotImplementedError

    def max_length(self, trained: int) -> int | None:
        return None

    def resolved(self, trained: int) -> PositionScheme:
        del trained
        return self

    @property
    def spec(self) -> str:
        """``name:k=v,...``, what :func:`parse_position_scheme` reads back."""
        items = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}:{items}" if items else self.name


@dataclasses.dataclass(frozen=True)
class SelfExtend(PositionScheme):
    """SelfExtend: ordinary RoPE within ``window`` positions, floor-grouped positions beyond (module docstring)."""

    group: int = 16
    window: int = 1024
    name: ClassVar[str] = "selfextend"
    params: ClassVar[Mapping[str, type]] = {"group": int, "window": int}

    def __post_init__(self) -> None:
        _positive(self, "group", 1)
        _positive(self, "window", 1)

    def bands(self) -> tuple[Band, ...]:
        return (Band(0, self.window - 1), Band(self.window))

    def query_positions(self, part: int, positions: jax.Array) -> jax.Array:
        if part == 0:
            return positions
        return positions // self.group + (self.window - self.window // self.group)

    def key_positions(self, positions: jax.Array) -> tuple[jax.Array | None, ...]:
        return (positions, positions // self.group)

    def key_map(self, part: int) -> int:
        return part

    def max_length(self, trained: int) -> int | None:
        return (trained - self.window) * self.group + self.window


@dataclasses.dataclass(frozen=True)
class DualChunk(PositionScheme):
    """Dual Chunk Attention: intra-, successive- and inter-chunk position indices (module docstring)."""

    chunk: int = 0  # s; 0: 3/4 of the trained length
    window: int = 0  # w; 0: 1/16 of the trained length
    name: ClassVar[str] = "dca"
    params: ClassVar[Mapping[str, type]] = {"chunk": int, "window": int}

    def __post_init__(self) -> None:
        _positive(self, "chunk", 0)
        _positive(self, "window", 0)
        if self.chunk and self.window and self.window >= self.chunk - self.window:
            raise ValueError(
                f"dca: window={self.window} must be below chunk - window = {self.chunk - self.window} (the chunk "
                "length); the official defaults are chunk = 3L/4, window = L/16"
            )

    @property
    def length(self) -> int:
        """``c = s - w``, the positions per chunk."""
        if not (self.chunk and self.window):
            raise ValueError("dca: chunk and window are set from the trained length first (resolved(L))")
        return self.chunk - self.window

    def bands(self) -> tuple[Band, ...]:
        c = self.length
        return (Band(0, 0, c), Band(1, 1, c), Band(2, None, c))

    def query_positions(self, part: int, positions: jax.Array) -> jax.Array:
        within = positions % self.length
        if part == 0:
            return within
        if part == 1:
            return jnp.minimum(within + self.length, self.chunk)
        return jnp.full_like(positions, self.chunk)

    def key_positions(self, positions: jax.Array) -> tuple[jax.Array | None, ...]:
        return (positions % self.length,)

    def key_map(self, part: int) -> int:
        return 0

    def resolved(self, trained: int) -> PositionScheme:
        return DualChunk(chunk=self.chunk or trained * 3 // 4, window=self.window or trained // 16)


@dataclasses.dataclass(frozen=True)
class ReRoPE(PositionScheme):
    """ReRoPE: relative distances clipped at ``window``; with ``leak`` > 1, leaky ReRoPE (module docstring)."""

    window: int = 512
    leak: float = 0.0  # k; 0: plain ReRoPE (distances beyond the window are all w)
    name: ClassVar[str] = "rerope"
    params: ClassVar[Mapping[str, type]] = {"window": int, "leak": float}

    def __post_init__(self) -> None:
        _positive(self, "window", 1)
        if not (self.leak == 0 or (math.isfinite(self.leak) and self.leak > 1)):
            raise ValueError(f"rerope: leak={self.leak!r} must be 0 (plain ReRoPE) or a number > 1 (leaky ReRoPE)")

    def bands(self) -> tuple[Band, ...]:
        return (Band(0, self.window - 1), Band(self.window))

    def query_positions(self, part: int, positions: jax.Array) -> jax.Array:
        if part == 0:
            return positions
        if not self.leak:
            return jnp.full_like(positions, self.window)
        return positions.astype(jnp.float32) / self.leak + (self.window - self.window / self.leak)

    def key_positions(self, positions: jax.Array) -> tuple[jax.Array | None, ...]:
        return (positions, positions.astype(jnp.float32) / self.leak if self.leak else None)

    def key_map(self, part: int) -> int:
        return part

    def max_length(self, trained: int) -> int | None:
        return int((trained - self.window) * self.leak + self.window) if self.leak else None


POSITION_SCHEMES: dict[str, type[PositionScheme]] = {}


def register_position_scheme(cls: type[PositionScheme]) -> type[PositionScheme]:
    """Register a scheme class (a frozen dataclass of :class:`PositionScheme`) under ``cls.name``: configs and
    ``--rope NAME:k=v`` then accept it."""
    if not (isinstance(cls, type) and issubclass(cls, PositionScheme)) or not cls.name:
        raise TypeError(f"register_position_scheme takes a named PositionScheme subclass, got {cls!r}")
    if POSITION_SCHEMES.get(cls.name, cls) is not cls:
        raise ValueError(f"position scheme name {cls.name!r} is already registered")
    POSITION_SCHEMES[cls.name] = cls
    return cls


for _cls in (SelfExtend, DualChunk, ReRoPE):
    register_position_scheme(_cls)


def is_position_scheme(spec: str) -> bool:
    return spec.partition(":")[0].strip() in POSITION_SCHEMES


def parse_position_scheme(spec: str) -> PositionScheme:
    """``name[:k=v,...]``, e.g. ``selfextend:group=8,window=1024``; one-line ValueErrors for unknown names, unknown
    or repeated parameters and values of the wrong kind or range."""
    name, _, body = spec.partition(":")
    cls = POSITION_SCHEMES.get(name.strip())
    if cls is None:
        raise ValueError(f"unknown position scheme {name.strip()!r}; choose one of {sorted(POSITION_SCHEMES)}")
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, equals, text = (part.strip() for part in item.partition("="))
        if not equals or not key:
            raise ValueError(f"position scheme {spec!r}: expected key=value, got {item!r}")
        if key not in cls.params:
            raise ValueError(
                f"position scheme {cls.name!r} got unknown parameter {key!r}; it takes {sorted(cls.params)}"
            )
        if key in values:
            raise ValueError(f"position scheme {spec!r}: parameter {key!r} given twice")
        kind = cls.params[key]
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"position scheme {spec!r}: {key}={text!r} is not a number") from None
        if kind is int and not number.is_integer():
            raise ValueError(f"position scheme {spec!r}: {key}={text!r} must be an integer")
        values[key] = int(number) if kind is int else number
    return cls(**values)


def key_rotations(
    scheme: PositionScheme,
    positions: Int[Array, "B S"],
    inv_freq: Float[Array, " F"],
    attention_factor: float | jax.Array = 1.0,
) -> tuple[Rotation | None, ...]:
    """cos/sin of each of the scheme's key position maps over ``positions`` (None for an unrotated map): what every
    layer of one forward sharing these positions reuses."""
    return tuple(
        None if mapped is None else rotary.rope_cos_sin(mapped, inv_freq, attention_factor)
        for mapped in scheme.key_positions(positions)
    )


def rotate_keys(
    k_pre: Float[Array, "B K S D"], rotations: tuple[Rotation | None, ...]
) -> tuple[Float[Array, "B K S D"], ...]:
    """A heads-first key buffer rotated under each key position map (:func:`key_rotations`; None: as it is)."""
    return tuple(k_pre if table is None else rotary.rotate(k_pre, *table, heads_first=True) for table in rotations)


def scheme_attention(
    scheme: PositionScheme,
    attend: Attend,
    q_pre: Float[Array, "B T H D"],
    q_positions: Int[Array, "B T"],
    k_pre: Float[Array, "B K S D"],
    k_positions: Int[Array, "B S"],
    values: Float[Array, "B K S D"],
    mask: Mask,
    inv_freq: Float[Array, " F"],
    attention_factor: float | jax.Array = 1.0,
    rotated_keys: tuple[jax.Array, ...] | None = None,
) -> tuple[Float[Array, "B T H D"], Float[Array, "B T H"]]:
    """Attention of pre-RoPE queries over pre-RoPE keys under ``scheme``: one ``attend`` call per part, under
    ``mask & band`` with the part's rotations, merged by log-sum-exp. Returns the output and its log-sum-exp.
    ``rotated_keys``: ``k_pre`` already rotated under each key map (:func:`rotate_keys`), when the caller has them."""
    if rotated_keys is None:
        rotated_keys = rotate_keys(k_pre, key_rotations(scheme, k_positions, inv_freq, attention_factor))
    q_positions, k_positions = q_positions.astype(jnp.int32), k_positions.astype(jnp.int32)
    outs, lses = [], []
    for part, band in enumerate(scheme.bands()):
        cos_sin = rotary.rope_cos_sin(scheme.query_positions(part, q_positions), inv_freq, attention_factor)
        part_mask = mask & Mask(band=band, q_positions=q_positions, k_positions=k_positions)
        out, lse = attend(rotary.rotate(q_pre, *cos_sin), rotated_keys[scheme.key_map(part)], values, part_mask)
        outs.append(out)
        lses.append(lse)
    return merge_parts(outs, lses)


def merge_parts(
    outs: list[Float[Array, "B T H D"]], lses: list[Float[Array, "B T H"]]
) -> tuple[Float[Array, "B T H D"], Float[Array, "B T H"]]:
    """One softmax from parts over disjoint key sets: ``out = sum_p exp(lse_p - lse) out_p`` with
    ``lse = logsumexp_p lse_p`` (float32); a row no part sees is zero with log-sum-exp ``-inf``."""
    lse_P = jnp.stack([x.astype(jnp.float32) for x in lses])
    top = jnp.max(lse_P, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights_P = jnp.exp(lse_P - top[None])  # exp(-inf) = 0 for a part that sees nothing
    total = weights_P.sum(0)
    share_P = weights_P / jnp.where(total > 0, total, 1.0)[None]
    out = sum(share_P[p][..., None] * outs[p].astype(jnp.float32) for p in range(len(outs)))
    lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out.astype(outs[0].dtype), lse


def _positive(scheme: PositionScheme, name: str, least: int) -> None:
    value = getattr(scheme, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{scheme.name}: {name}={value!r} must be an integer >= {least}")
