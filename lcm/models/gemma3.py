"""Gemma 3 text decoders (Gemma Team 2025, "Gemma 3 Technical Report", arXiv 2503.19786) as Flax NNX modules.

A hybrid of local and global attention layers: five sliding-window layers to each global one (the pattern 6 that
transformers and llama.cpp use when a checkpoint does not list its layer kinds), the local layers attending to the
last ``sliding_window`` tokens with RoPE base 10k, the global layers to everything with base 1M. Otherwise, against
the LLaMA family (:mod:`lcm.models.llama`):

- RMSNorm scales by ``1 + w`` (the weights are stored as ``w``, zero = identity), in float32, cast after;
- a norm before *and after* both the attention and the MLP (``x + post_norm(f(pre_norm(x)))``);
- QK-norm: the queries and keys are RMS-normalised per head (``1 + w`` again), before RoPE;
- queries scaled by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5`` (equal for the 270M, 1B, 4B
  and 12B models; where they differ the ratio is folded into the queries, so the attention call keeps its default
  scale and a policy's attention statistics see the scores the model uses);
- GeGLU MLP with the tanh-approximated GELU; embeddings multiplied by ``sqrt(hidden_size)`` (in the parameters'
  dtype, as transformers does); the LM head is the embedding matrix.

Numerics follow transformers' ``Gemma3ForCausalLM``. A RoPE variant (:meth:`Gemma3Config.with_rope`) applies to the
global layers, as Gemma's own long-context recipe scales the global base only; local layers keep theirs.

Every layer is the shared :func:`lcm.models.decoder_layer.decoder_layer`; a local layer gets its own
:class:`~lcm.models.decoder_layer.LayerInputs` (the window mask, the local RoPE table), a global layer the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lcm.cache.hooks import LayerHooks
from lcm.cache.kv import KVCache, init_cache, init_window_layer
from lcm.models import decoder
from lcm.models.decoder_layer import LayerInputs, LayerSettings, decoder_layer
from lcm.ops import masks, rotary
from lcm.ops import rope as rope_ops

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' names for the two layer kinds


def pattern_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Every ``pattern``-th layer global, the others local (transformers' ``sliding_window_pattern``)."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


PRESETS: dict[str, dict[str, Any]] = {
    # google/gemma-3-270m: config.json of the release
    "gemma3-270m": dict(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_base=1_000_000.0,
        local_rope_base=10_000.0,
        sliding_window=512,
        layer_types=pattern_layer_types(18),
        query_pre_attn_scalar=256.0,
        max_position_embeddings=32768,
    ),
}


@dataclasses.dataclass(frozen=True)
class Gemma3Config(decoder.DecoderConfig):
    """Architecture of one Gemma 3 text decoder; validated on construction, no architecture defaults (a named
    preset, :meth:`preset`, or a checkpoint). Runtime settings have defaults, as :class:`LlamaConfig`'s."""

    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # GeGLU hidden width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_base: float  # global layers' RoPE base
    local_rope_base: float  # sliding-window layers' RoPE base
    sliding_window: int  # a local layer's query sees the keys with q - k < sliding_window (itself included)
    layer_types: tuple[str, ...]  # per layer: "sliding_attention" | "full_attention"
    query_pre_attn_scalar: float  # queries are scaled by its -1/2 power
    max_position_embeddings: int  # trained context length L0
    rope_variant: str = "default"  # a name in lcm.ops.rope.ROPE_VARIANTS, for the global layers
    rope_params: tuple[tuple[str, Any], ...] = ()
    rope_local_layers: bool = False  # the variant on the sliding-window layers too (their own base); False: Gemma's
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_q_block: int = 256
    attention_kv_block: int = 512
    attention_decode_kv_block: int = 2048
    attention_implementation: str = "auto"
    # inference runs the layers as one lax.scan over groups of a period of layer_types (5 local + 1 global: one
    # step), where each position's states have equal shapes across groups; False: the unrolled loop
    scan_layers: bool = False

    def __post_init__(self) -> None:
        self.check_common("head_dim", "sliding_window")
        if self.query_pre_attn_scalar <= 0:
            raise ValueError(f"query_pre_attn_scalar={self.query_pre_attn_scalar} must be positive")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {SLIDING, FULL}:
            raise ValueError(
                f"layer_types must give one of {(SLIDING, FULL)} per layer ({self.num_layers}), got {self.layer_types}"
            )

    @property
    def period(self) -> int:
        """The shortest repeating group of ``layer_types`` that tiles the layers (6 for Gemma 3's 5:1 pattern)."""
        kinds, count = self.layer_types, self.num_layers
        return next(p for p in range(1, count + 1) if count % p == 0 and kinds == kinds[:p] * (count // p))

    def with_rope(self, variant: str, params: dict[str, Any] | None = None, layers: str = "global") -> Gemma3Config:
        """The same model with another RoPE variant (``original_max_position_embeddings`` defaults to L0) on its
        global layers (``layers="global"``, Gemma's own long-context recipe: the local layers keep their default
        RoPE) or on every layer (``"all"``, each kind scaling its own base)."""
        fields = self.rope_fields(variant, params, layers)
        return dataclasses.replace(self, **fields, rope_local_layers=layers == "all")


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)`` in float32, cast to the input's dtype after (transformers'
    ``Gemma3RMSNorm``); ``scale`` is stored as Gemma stores it, zero being the identity."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs | None, axis: str = "embed"):
        self.scale = decoder.param(rngs, (dim,), (axis,), dtype, None, fill=0.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = 1.0 + self.scale[...].astype(jnp.float32)
        return (x32 * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs | None):
        d, h, k, hd, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_param_dtype
        self.q_proj = decoder.param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dt, d)
        self.k_proj = decoder.param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), dt, d)
        self.v_proj = decoder.param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), dt, d)
        self.o_proj = decoder.param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dt, h * hd)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dt, rngs, axis="head_dim")
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dt, rngs, axis="head_dim")
        # the attention call scales by head_dim ** -0.5; Gemma by query_pre_attn_scalar ** -0.5
        self.query_factor = float((cfg.head_dim / cfg.query_pre_attn_scalar) ** 0.5)

    def project_qkv(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Pre-RoPE ``q [B,T,H,hd]`` (normed, scaled), ``k [B,T,K,hd]`` (normed), ``v [B,T,K,hd]``."""
        dt = x_BxTxD.dtype
        q = self.q_norm(jnp.einsum("btd,dhk->bthk", x_BxTxD, self.q_proj[...].astype(dt)))
        k = self.k_norm(jnp.einsum("btd,dhk->bthk", x_BxTxD, self.k_proj[...].astype(dt)))
        v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.v_proj[...].astype(dt))
        if self.query_factor != 1.0:
            q = q * jnp.asarray(self.query_factor, dt)
        return q, k, v

    def output(self, attn_BxTxHxK: jax.Array) -> jax.Array:
        dt = attn_BxTxHxK.dtype
        return jnp.einsum("bthk,hkd->btd", attn_BxTxHxK, self.o_proj[...].astype(dt))


class MLP(nnx.Module):
    """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs | None):
        d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
        self.gate_proj = decoder.param(rngs, (d, f), ("embed", "mlp"), dt, d)
        self.up_proj = decoder.param(rngs, (d, f), ("embed", "mlp"), dt, d)
        self.down_proj = decoder.param(rngs, (f, d), ("mlp", "embed"), dt, f)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = jax.nn.gelu(x @ self.gate_proj[...].astype(dt), approximate=True)
        return (gate * (x @ self.up_proj[...].astype(dt))) @ self.down_proj[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs | None):
        d, eps, dt = cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype
        self.input_norm = RMSNorm(d, eps, dt, rngs)
        self.attn = Attention(cfg, rngs)
        self.post_attention_norm = RMSNorm(d, eps, dt, rngs)
        self.pre_mlp_norm = RMSNorm(d, eps, dt, rngs)
        self.mlp = MLP(cfg, rngs)
        self.post_mlp_norm = RMSNorm(d, eps, dt, rngs)

    def attention_input(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.input_norm(x)

    def add_attention(self, x: Float[Array, "B T D"], attn: Float[Array, "B T H K"]) -> Float[Array, "B T D"]:
        return x + self.post_attention_norm(self.attn.output(attn))

    def add_mlp(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


class Gemma3(nnx.Module):
    """Gemma 3 text decoder. ``model(tokens, positions, cache) -> (logits, cache)``, as :class:`Llama`."""

    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs | None):
        self.config = cfg
        dt = cfg.jnp_param_dtype
        self.embed = decoder.param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, 1)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, rngs)

    def init_cache(self, batch: int, capacity: int | Sequence[int], keys_pre_rope: bool = False) -> KVCache:
        """An empty cache for ``capacity`` entries in every global layer (or one capacity per layer); the
        sliding-window layers hold only their window, for any number of entries (:class:`~lcm.cache.kv.WindowCache`).
        """
        cfg = self.config
        cache = init_cache(
            cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype, keys_pre_rope
        )
        layers = list(cache.layers)
        for i in self.window_layers():
            layers[i] = init_window_layer(batch, cfg.sliding_window, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype)
        return dataclasses.replace(cache, layers=tuple(layers))

    def window_layers(self) -> tuple[int, ...]:
        """The layers whose state keeps only their window of entries (the sliding-window ones)."""
        return tuple(i for i, kind in enumerate(self.config.layer_types) if kind == SLIDING)

    def rope_tables(self, seq_len: jax.Array | int) -> tuple[jax.Array, jax.Array | float]:
        """The global layers' inverse frequencies and attention factor (the RoPE variant acts on these)."""
        cfg = self.config
        return rope_ops.rope_frequencies(
            cfg.rope_variant, cfg.head_dim, cfg.rope_base, dict(cfg.rope_params), seq_len=seq_len
        )

    def local_rope_tables(self, seq_len: jax.Array | int) -> tuple[jax.Array, jax.Array | float]:
        """The sliding-window layers' tables: their base, default RoPE unless the variant was asked for them too."""
        cfg = self.config
        if cfg.rope_local_layers:
            params = dict(cfg.rope_params)
            return rope_ops.rope_frequencies(
                cfg.rope_variant, cfg.head_dim, cfg.local_rope_base, params, seq_len=seq_len
            )
        return rope_ops.rope_frequencies("default", cfg.head_dim, cfg.local_rope_base, {}, seq_len=seq_len)

    def _embed(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        cfg = self.config
        embed = self.embed[...]
        return (embed[tokens] * jnp.asarray(cfg.hidden_size**0.5, embed.dtype)).astype(cfg.jnp_dtype)

    def _kinds(self) -> tuple[tuple[str, ...], dict[str, int]]:
        """Each layer's kind, and the first layer of each kind."""
        kinds = self.config.layer_types
        return kinds, {kind: kinds.index(kind) for kind in set(kinds)}

    def hidden_states(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: KVCache,
        *,
        num_valid: Int[Array, ""] | int | None = None,
        rope_seq_len: Int[Array, ""] | int | None = None,
        observers: Bool[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T D"], KVCache]:
        """The decoder on ``T`` new tokens written into the cache (:meth:`lcm.models.llama.Llama.hidden_states`
        says what each argument means)."""
        cfg = self.config
        _, seq = decoder.check_call(cfg.num_layers, tokens, positions, cache)
        num_valid = jnp.asarray(seq if num_valid is None else num_valid, jnp.int32)
        positions = positions.astype(jnp.int32)
        if rope_seq_len is None:
            rope_seq_len = decoder.default_rope_length(positions, num_valid)
        x = self._embed(tokens)
        settings = decoder.inference_settings(cfg, cache, seq)
        mask = masks.causal()
        if cache.starts is not None:
            mask &= masks.left_padding(cache.starts)
        kinds, first = self._kinds()
        tables = {FULL: self.rope_tables(rope_seq_len), SLIDING: self.local_rope_tables(rope_seq_len)}
        window = {FULL: mask, SLIDING: mask & masks.sliding_window(cfg.sliding_window)}
        inputs = {
            kind: decoder.layer_inputs(
                positions, cache.layers[i], cache.keys_pre_rope, *tables[kind], window[kind], num_valid, observers
            )
            for kind, i in first.items()
        }
        period = cfg.period if cfg.scan_layers else None
        if period is not None:  # each position's states are stacked over the groups: equal shapes only
            count = cfg.num_layers
            if not all(decoder.equal_shapes(cache.layers[j:count:period]) for j in range(period)):
                period = None

        def call(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, state: Any, inputs: LayerInputs) -> Any:
            return decoder_layer(settings, graphdef, params, x, state, inputs)

        per_layer = [inputs[kind] for kind in kinds]
        x, states = decoder.run_layers(call, self.layers, x, cache.layers, per_layer, period)
        return self.final_norm(x), dataclasses.replace(cache, layers=tuple(states))

    def train_forward(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        segment_ids: Int[Array, "B T"] | None = None,
        *,
        hooks: LayerHooks | None = None,
        remat: bool = False,
        scan: bool = False,
    ) -> tuple[Float[Array, "B T D"], Any]:
        """The training forward (:meth:`lcm.models.llama.Llama.train_forward`); ``scan`` runs the layers as one
        ``lax.scan`` over groups of :attr:`Gemma3Config.period` layers (five local and a global one: one step)."""
        cfg = self.config
        batch, seq = tokens.shape
        positions = positions.astype(jnp.int32)
        rope_len = jnp.max(positions) + 1
        mask = masks.causal()
        if segment_ids is not None:
            mask &= masks.documents(segment_ids, segment_ids)
        inputs = {}
        for kind, (inv_freq, factor), kind_mask in (
            (FULL, self.rope_tables(rope_len), mask),
            (SLIDING, self.local_rope_tables(rope_len), mask & masks.sliding_window(cfg.sliding_window)),
        ):
            rotation = rotary.rope_cos_sin(positions, inv_freq, factor)
            inputs[kind] = LayerInputs(positions, rotation, kind_mask, inv_freq, factor, jnp.int32(seq))
        settings = LayerSettings(attention=decoder.attention_settings(cfg, decode=False), hooks=hooks or LayerHooks())

        def block_call(
            graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, state: None, inputs: LayerInputs
        ) -> tuple[jax.Array, Any]:
            return decoder_layer(settings, graphdef, params, x, None, inputs)

        if remat:
            block_call = jax.checkpoint(block_call, static_argnums=(0,))
        x = self._embed(tokens)
        per_layer = [inputs[kind] for kind in cfg.layer_types]
        states = [None] * cfg.num_layers
        x, records = decoder.run_layers(block_call, self.layers, x, states, per_layer, cfg.period if scan else None)
        return self.final_norm(x), decoder.stack(records) if records[0] is not None else None

    def train_hidden_states(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        segment_ids: Int[Array, "B T"] | None = None,
        *,
        remat: bool = False,
        scan: bool = False,
    ) -> Float[Array, "B T D"]:
        return self.train_forward(tokens, positions, segment_ids, remat=remat, scan=scan)[0]

    def logits(self, hidden: Float[Array, "... D"]) -> Float[Array, "... V"]:
        embed = self.embed[...].astype(hidden.dtype)
        return jnp.einsum("...d,vd->...v", hidden, embed, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: KVCache | None = None,
        **kwargs: Any,
    ) -> tuple[Float[Array, "B T V"], KVCache | None]:
        if cache is None:
            return self.logits(self.train_hidden_states(tokens, positions, **kwargs)), None
        hidden, cache = self.hidden_states(tokens, positions, cache, **kwargs)
        return self.logits(hidden), cache


def abstract_model(cfg: Gemma3Config) -> Gemma3:
    return Gemma3(cfg, rngs=None)


def random_model(cfg: Gemma3Config, seed: int = 0) -> Gemma3:
    """A model with every parameter drawn in numpy: norm weights ``w`` around 0 (scales ``1 + w`` around 1),
    matrices ~ ``1/sqrt(fan_in)``, the embedding ~ ``1/sqrt(hidden)`` (it is multiplied by ``sqrt(hidden)``)."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name, shape = path[-1], leaf.shape
        if name == "scale":
            value = 0.2 * rng.standard_normal(shape)
        elif name == "embed":
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
        else:
            fan_in = shape[0] if name in ("q_proj", "k_proj", "v_proj") else np.prod(shape[:-1])
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return decoder.map_params(abstract_model(cfg), draw)
