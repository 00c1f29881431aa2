"""Rotary position embeddings (RoPE) and the frequency-scaling family used to extend context.

Notation (METHODS.md §1): head dim d, base b, inverse frequencies θ_j = b^(−2j/d) for j < d/2, scale
factor s (``factor``), pretraining length L₀ (``original_max_position_embeddings``).

Every variant is a ``RopeVariant`` in ``ROPE_VARIANTS``; calling one returns ``(inv_freq[d/2] float32,
attention_factor)``, and :mod:`lcm.ops.rotary` rotates queries or keys with them:

- ``default``: RoPE, Su et al. 2021 (RoFormer, arXiv 2104.09864), θ_j = b^(−2j/d).
- ``linear``: position interpolation (PI), Chen et al. 2023 (arXiv 2306.15595): θ′ = θ / s.
- ``ntk``: static NTK-aware scaling, bloc97 2023 (r/LocalLLaMA post): b′ = b · s^(d/(d−2)).
- ``dynamic``: dynamic NTK (emozilla 2023, as in transformers): b′ = b · (s·L/L₀ − (s−1))^(d/(d−2)) for the
  current length L > L₀, plain RoPE otherwise.
- ``yarn``: YaRN, Peng et al. 2023 (arXiv 2309.00071): the "NTK-by-parts" ramp between interpolated and
  original frequencies over dimensions whose wavelength fits β_fast…β_slow rotations in L₀, plus the
  attention factor 0.1·ln(s) + 1 on cos/sin (so logits are scaled by its square).
- ``llama3``: Llama 3.1 (Dubey et al. 2024, arXiv 2407.21783): low frequencies divided by s, high ones kept,
  a smooth blend between wavelengths L₀/high_freq_factor and L₀/low_freq_factor.
- ``longrope``: LongRoPE, Ding et al. 2024 (arXiv 2402.13753): searched per-dimension rescale factors, the
  short set for L ≤ L₀ and the long set above; attention factor √(1 + ln s / ln L₀).
- ``giraffe_power`` / ``giraffe_truncated``: Pal et al. 2023 (Giraffe, arXiv 2308.10882), power basis
  θ′_j = θ_j · (1 − 2j/d)^k and truncated basis (θ kept above b_c = 2π/T, set to ρ between a and b_c,
  zeroed below a). As in the official code (abacusai/Long-Context ``python/models/interpolate.py``) the
  linear ``factor`` is applied first.

Where transformers implements a variant (default, linear, dynamic, yarn, longrope, llama3) we follow
``transformers.modeling_rope_utils`` (v5, ``ROPE_INIT_FUNCTIONS``) to float32 precision, parameter names
included: the exponents 2j/d are rounded to float32 as transformers does, the rest is computed in float64
and rounded once. Deviations, all because there is no model config here:

- ``dynamic`` takes L₀ from the parameter ``original_max_position_embeddings`` where transformers reads
  ``config.max_position_embeddings``. transformers also keeps the frequencies of the longest sequence seen
  since its last reset (``dynamic_rope_update``); ours are a pure function of the current ``seq_len``.
- ``yarn`` requires ``factor``, and ``longrope`` ``factor`` or ``attention_factor``: transformers infers a
  missing one from ``config.max_position_embeddings / original_max_position_embeddings``.
- ``llama3`` defaults its four parameters to Llama 3.1's (8, 1, 4, 8192); transformers requires them.
- ``partial_rotary_factor`` is not a parameter: pass the rotary dim as ``head_dim``; ``rotary.apply_rope`` rotates
  the first ``2 * len(inv_freq)`` features and passes the rest through, as transformers' partial-rotary
  models do.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

SeqLen = int | jax.Array | None
# A builder gets complete, validated parameters and returns float64 numpy or float32 jnp frequencies.
Builder = Callable[[int, float, Mapping[str, Any], SeqLen], tuple[np.ndarray | jax.Array, float]]


@dataclasses.dataclass(frozen=True)
class _Param:
    """Type and allowed range of one rope parameter; a name means the same thing in every variant."""

    kind: type  # float, int, bool, or tuple (of positive floats, one per frequency)
    is_allowed: Callable[[Any], bool]
    allowed: str  # `is_allowed` in words, for error messages


_PARAMS: dict[str, _Param] = {
    "factor": _Param(float, lambda v: v >= 1.0, ">= 1"),
    "original_max_position_embeddings": _Param(int, lambda v: v >= 2, "an integer >= 2"),
    "attention_factor": _Param(float, lambda v: v > 0.0, "> 0"),
    "beta_fast": _Param(float, lambda v: v > 0.0, "> 0"),
    "beta_slow": _Param(float, lambda v: v > 0.0, "> 0"),
    "mscale": _Param(float, lambda v: v >= 0.0, ">= 0"),
    "mscale_all_dim": _Param(float, lambda v: v >= 0.0, ">= 0"),
    "truncate": _Param(bool, lambda v: True, "true or false"),
    "low_freq_factor": _Param(float, lambda v: v > 0.0, "> 0"),
    "high_freq_factor": _Param(float, lambda v: v > 0.0, "> 0"),
    "short_factor": _Param(tuple, lambda v: all(x > 0.0 for x in v), "a list of numbers > 0"),
    "long_factor": _Param(tuple, lambda v: all(x > 0.0 for x in v), "a list of numbers > 0"),
    "power": _Param(float, lambda v: v >= 0.0, ">= 0"),
    "period": _Param(float, lambda v: v > 0.0, "> 0 (tokens)"),
    "a": _Param(float, lambda v: v >= 0.0, ">= 0"),
    "rho": _Param(float, lambda v: v >= 0.0, ">= 0"),
}


@dataclasses.dataclass(frozen=True)
class RopeVariant:
    """A registered RoPE variant: its frequency builder and the parameters it takes.

    Calling it validates ``params``, fills the defaults and returns ``(inv_freq float32, attention_factor)``.
    """

    name: str
    build: Builder
    required: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # optional params; None = derived
    check: Callable[[int, Mapping[str, Any]], str | None] | None = None  # cross-parameter rule -> error text

    def complete(self, head_dim: int, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Returns validated, typed parameters with defaults filled in; raises a one-line ValueError."""
        if not _is_number(head_dim) or not float(head_dim).is_integer() or head_dim < 2 or head_dim % 2:
            raise ValueError(f"rope head_dim must be an even integer >= 2, got {head_dim!r}")
        complete = dict(self.defaults) | _typed_params(self, params or {})
        missing = [name for name in self.required if name not in complete]
        if missing:
            raise ValueError(
                f"rope variant {self.name!r} needs parameter(s) {missing}; it takes {self.allowed_params()}"
            )
        problem = self.check(int(head_dim), complete) if self.check else None
        if problem:
            raise ValueError(f"rope variant {self.name!r}: {problem}")
        return complete

    def allowed_params(self) -> list[str]:
        return sorted((*self.required, *self.defaults))

    def __call__(
        self, head_dim: int, base: float, params: Mapping[str, Any] | None = None, seq_len: SeqLen = None
    ) -> tuple[Float[Array, " F"], float]:
        if not (isinstance(base, int | float | np.number) and math.isfinite(base) and base > 1.0):
            raise ValueError(f"rope base must be a finite number > 1, got {base!r}")
        params = self.complete(head_dim, params)
        inv_freq, attention_factor = self.build(int(head_dim), float(base), params, seq_len)
        return jnp.asarray(inv_freq, dtype=jnp.float32), float(attention_factor)


def _typed_params(variant: RopeVariant, params: Mapping[str, Any]) -> dict[str, Any]:
    """Checks names and values of user-given params and converts them to their declared kind."""
    typed = {}
    for name, value in params.items():
        if name not in variant.required and name not in variant.defaults:
            raise ValueError(
                f"rope variant {variant.name!r} got unknown parameter {name!r}; it takes {variant.allowed_params()}"
            )
        # HF configs carry explicit nulls for optional keys; None means "derive it" where that is the default.
        is_derived = value is None and name in variant.defaults and variant.defaults[name] is None
        typed[name] = None if is_derived else _typed_value(name, value)
    return typed


def _is_number(value: Any) -> bool:
    is_bool = isinstance(value, bool | np.bool_)
    return isinstance(value, int | float | np.integer | np.floating) and not is_bool


def _typed_value(name: str, value: Any) -> Any:
    spec = _PARAMS[name]
    bad = ValueError(f"rope parameter {name!r} must be {spec.allowed}, got {value!r}")
    if spec.kind is bool:
        if not isinstance(value, bool | np.bool_):
            raise bad
        return bool(value)
    if spec.kind is tuple:
        if not isinstance(value, list | tuple | np.ndarray) or not all(_is_number(x) for x in value):
            raise bad
        typed = tuple(float(x) for x in value)
        finite = all(math.isfinite(x) for x in typed)
    else:
        if not _is_number(value) or (spec.kind is int and not float(value).is_integer()):
            raise bad
        typed = spec.kind(value)
        finite = math.isfinite(typed)
    if not finite or not spec.is_allowed(typed):
        raise bad
    return typed


# --- frequency builders -------------------------------------------------------------------------------


def _exponents(head_dim: int) -> np.ndarray:
    """2j/d for j < d/2, rounded to float32 as transformers does (alone, moves θ by ≤ 8e-7 at b = 5e5)."""
    return (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)).astype(np.float64)


def _default(head_dim: int, base: float) -> np.ndarray:
    return 1.0 / base ** _exponents(head_dim)


def _build_default(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    return _default(head_dim, base), 1.0


def _build_linear(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    return _default(head_dim, base) / params["factor"], 1.0


def _build_ntk(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    return _default(head_dim, base * params["factor"] ** (head_dim / (head_dim - 2))), 1.0


def _build_dynamic(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    inv_freq = _default(head_dim, base)
    if seq_len is None:  # transformers: seq_len defaults to the original length, i.e. no scaling
        return inv_freq, 1.0
    original, factor = params["original_max_position_embeddings"], params["factor"]
    # b′^(−e) = b^(−e) · α^(−e·d/(d−2)) with α = s·L/L₀ − (s−1) = 1 + s·(L − L₀)/L₀: this form keeps α
    # accurate in float32 (seq_len may be traced) and gives exactly the default frequencies for L ≤ L₀.
    excess = jnp.maximum(jnp.asarray(seq_len) - original, 0).astype(jnp.float32)
    alpha = 1.0 + factor * excess / original
    ratio = alpha ** jnp.asarray(-_exponents(head_dim) * head_dim / (head_dim - 2), jnp.float32)
    return jnp.asarray(inv_freq, jnp.float32) * ratio, 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _build_yarn(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    factor, original = params["factor"], params["original_max_position_embeddings"]
    attention_factor = params["attention_factor"]
    mscale, mscale_all_dim = params["mscale"], params["mscale_all_dim"]
    if attention_factor is None:  # transformers: mscale only counts when mscale_all_dim is set too (DeepSeek)
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        """The (fractional) dimension whose wavelength fits ``num_rotations`` turns in L₀."""
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params["beta_fast"]), correction_dim(params["beta_slow"])
    if params["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    # The upper clamp is d − 1, not d/2 − 1, in transformers and the official YaRN code; kept for parity.
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    # The ramp and its complement are rounded to float32 as in transformers: 1 − ramp loses digits where the
    # weight is small, and without the same rounding that shows as ~1e-6 differences at factor 16.
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1.0) - ramp).astype(np.float64)
    pos_freqs = base ** _exponents(head_dim)
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv_freq = interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, attention_factor


def _build_llama3(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    factor, original = params["factor"], params["original_max_position_embeddings"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    inv_freq = _default(head_dim, base)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled), 1.0


def _build_longrope(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    original, factor = params["original_max_position_embeddings"], params["factor"]
    attention_factor = params["attention_factor"]
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    pos_freqs = base ** _exponents(head_dim)
    short = 1.0 / (np.asarray(params["short_factor"]) * pos_freqs)
    if seq_len is None:
        return short, attention_factor
    long = 1.0 / (np.asarray(params["long_factor"]) * pos_freqs)
    is_long = jnp.asarray(seq_len) > original
    inv_freq = jnp.where(is_long, jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32))
    return inv_freq, attention_factor


def _build_giraffe_power(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    half = head_dim // 2
    power_basis = (1.0 - np.arange(half) / half) ** params["power"]
    return _default(head_dim, base) / params["factor"] * power_basis, 1.0


def _build_giraffe_truncated(head_dim: int, base: float, params: Mapping[str, Any], seq_len: SeqLen) -> tuple:
    inv_freq = _default(head_dim, base) / params["factor"]
    cutoff = 2 * math.pi / params["period"]
    a = cutoff / 8 if params["a"] is None else params["a"]
    rho = cutoff / 16 if params["rho"] is None else params["rho"]
    return np.where(inv_freq >= cutoff, inv_freq, np.where(inv_freq >= a, rho, 0.0)), 1.0


# --- cross-parameter rules ----------------------------------------------------------------------------


def _check_ntk(head_dim: int, params: Mapping[str, Any]) -> str | None:
    return None if head_dim > 2 else f"needs head_dim > 2 for the exponent d/(d-2), got {head_dim}"


def _check_yarn(head_dim: int, params: Mapping[str, Any]) -> str | None:
    if params["beta_fast"] < params["beta_slow"]:
        return f"beta_fast must be >= beta_slow, got {params['beta_fast']} < {params['beta_slow']}"
    return None


def _check_llama3(head_dim: int, params: Mapping[str, Any]) -> str | None:
    if params["high_freq_factor"] <= params["low_freq_factor"]:
        return (
            f"high_freq_factor must be > low_freq_factor, got {params['high_freq_factor']} "
            f"<= {params['low_freq_factor']}"
        )
    return None


def _check_longrope(head_dim: int, params: Mapping[str, Any]) -> str | None:
    for name in ("short_factor", "long_factor"):
        if len(params[name]) != head_dim // 2:
            return f"{name} must have head_dim // 2 = {head_dim // 2} entries, got {len(params[name])}"
    if params["factor"] is None and params["attention_factor"] is None:
        return (
            "needs factor (max_position_embeddings / original_max_position_embeddings, which transformers "
            "infers from the model config) or attention_factor"
        )
    return None


_YARN_DEFAULTS = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": True,
    "attention_factor": None,
    "mscale": None,
    "mscale_all_dim": None,
}

ROPE_VARIANTS: dict[str, RopeVariant] = {
    variant.name: variant
    for variant in (
        RopeVariant("default", _build_default),
        RopeVariant("linear", _build_linear, required=("factor",)),
        RopeVariant("ntk", _build_ntk, required=("factor",), check=_check_ntk),
        RopeVariant(
            "dynamic",
            _build_dynamic,
            required=("factor", "original_max_position_embeddings"),
            check=_check_ntk,
        ),
        RopeVariant(
            "yarn",
            _build_yarn,
            required=("factor", "original_max_position_embeddings"),
            defaults=_YARN_DEFAULTS,
            check=_check_yarn,
        ),
        RopeVariant(
            "llama3",
            _build_llama3,
            defaults={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            check=_check_llama3,
        ),
        RopeVariant(
            "longrope",
            _build_longrope,
            required=("short_factor", "long_factor", "original_max_position_embeddings"),
            defaults={"factor": None, "attention_factor": None},
            check=_check_longrope,
        ),
        RopeVariant("giraffe_power", _build_giraffe_power, defaults={"power": 0.5, "factor": 1.0}),
        RopeVariant(
            "giraffe_truncated",
            _build_giraffe_truncated,
            required=("period",),
            defaults={"factor": 1.0, "a": None, "rho": None},
        ),
    )
}


def register_rope_variant(variant: RopeVariant) -> RopeVariant:
    """Register a RoPE variant from any module: ``variant.name`` becomes a name that model configs, ``--rope
    NAME:k=v`` and the eval grid accept. Its parameters must be among the named ones (:data:`PARAMETERS`), each
    meaning the same in every variant; registering another variant under a taken name is an error."""
    if not isinstance(variant, RopeVariant):
        raise TypeError(f"register_rope_variant takes a RopeVariant, got {type(variant).__name__}")
    if not variant.name or ":" in variant.name or "," in variant.name:
        raise ValueError(f"rope variant name {variant.name!r} must be non-empty text without ':' or ','")
    unknown = sorted(set(variant.allowed_params()) - set(_PARAMS))
    if unknown:
        raise ValueError(
            f"rope variant {variant.name!r}: unknown parameter(s) {unknown}; choose from {sorted(_PARAMS)}"
        )
    taken = ROPE_VARIANTS.get(variant.name)
    if taken is not None and taken != variant:
        raise ValueError(f"rope variant name {variant.name!r} is already registered")
    ROPE_VARIANTS[variant.name] = variant
    return variant


PARAMETERS = _PARAMS  # the parameter names every variant shares, with their types and allowed ranges


def _variant(name: str) -> RopeVariant:
    if name not in ROPE_VARIANTS:
        raise ValueError(f"unknown rope variant {name!r}; choose one of {sorted(ROPE_VARIANTS)}")
    return ROPE_VARIANTS[name]


def rope_frequencies(
    variant: str,
    head_dim: int,
    base: float,
    params: Mapping[str, Any] | None = None,
    seq_len: SeqLen = None,
) -> tuple[Float[Array, " F"], float]:
    """Inverse frequencies ``inv_freq[head_dim // 2]`` (float32) and the cos/sin ``attention_factor``.

    ``seq_len`` is the current total length (max position + 1); only ``dynamic`` and ``longrope`` read it,
    and it may be a traced scalar inside ``jit``. ``None`` means "within the original length".
    """
    return _variant(variant)(head_dim, base, params, seq_len)


def validate_rope_params(variant: str, params: Mapping[str, Any] | None, head_dim: int) -> None:
    """Raises a one-line ValueError naming what is wrong and what is allowed; returns None if all is well."""
    _variant(variant).complete(head_dim, params)


def parse_rope_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parses ``"name:key=value,key=value"``, e.g. ``"yarn:factor=2,original_max_position_embeddings=8192"``.

    Values take their parameter's type (``factor=2`` gives 2.0, ``truncate=false`` gives False); lists are
    written with ``/``: ``short_factor=1.0/1.05/1.1`` gives a tuple of floats. Names and values are checked
    here; required parameters and head-dim dependent rules are checked by ``validate_rope_params``.
    """
    name, _, body = spec.partition(":")
    variant = _variant(name.strip())
    raw: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, equals, text = (part.strip() for part in item.partition("="))
        if not equals or not key:
            raise ValueError(f"rope spec {spec!r}: expected key=value, got {item!r}")
        if key in raw:
            raise ValueError(f"rope spec {spec!r}: parameter {key!r} given twice")
        if key not in _PARAMS:  # let _typed_params report it with the variant's allowed names
            raw[key] = text
            continue
        raw[key] = _parse_value(spec, key, text)
    return variant.name, _typed_params(variant, raw)


def _parse_value(spec: str, key: str, text: str) -> Any:
    kind = _PARAMS[key].kind
    try:
        if kind is bool:
            booleans = {"true": True, "1": True, "false": False, "0": False}
            return booleans[text.lower()]
        if kind is tuple:
            return tuple(float(x) for x in text.split("/"))
        return float(text)  # _typed_value turns integral floats into int where the kind is int
    except (KeyError, ValueError):
        raise ValueError(f"rope spec {spec!r}: cannot read {key}={text!r} as {_PARAMS[key].allowed}") from None
