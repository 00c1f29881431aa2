"""The LLaMA decoder family (LLaMA 1-3, Mistral, Qwen2, SmolLM2) as tree-shaped Flax NNX modules.

Touvron et al. 2023 (arXiv 2302.13971): pre-norm RMSNorm, SwiGLU MLP, rotary positions; GQA (Ainslie et al.
2023). Mistral adds a sliding window, Qwen2 biases on the q/k/v projections. Numerics follow transformers'
``LlamaForCausalLM`` (RMSNorm in float32, then cast; RoPE half-split layout; attention softmax in float32).

The model is a pure function of ``(params, tokens, positions, cache) -> (logits, cache)``:
``graphdef, params = nnx.split(model)`` and :func:`forward` give it explicitly. The KV cache
(:class:`lcm.cache.kv.KVCache`, one :class:`~lcm.cache.kv.LayerCache` per block, each of its own capacity) is an
argument and a return value, never hidden state; with no cache the same blocks are the training forward (one layer
function, :func:`lcm.models.decoder_layer.decoder_layer`, serves both). Parameters carry
logical axis names (``vocab, embed, heads, kv_heads, head_dim, mlp``) that ``lcm.parallel`` maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lcm.cache.hooks import LayerHooks
from lcm.cache.kv import KVCache, LayerCache, init_cache
from lcm.models import decoder
from lcm.models.decoder import map_params as map_params  # re-exported: lcm.models.llama.map_params
from lcm.models.decoder import param_count as param_count
from lcm.models.decoder_layer import LayerInputs, LayerSettings, decoder_layer
from lcm.ops import masks, rotary
from lcm.ops import rope as rope_ops
from lcm.ops.position_schemes import PositionScheme

# named architectures: what a config needs beyond runtime settings
PRESETS: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): config.json of the release
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        rms_norm_eps=1e-5,
        rope_base=100000.0,
        max_position_embeddings=8192,
        tie_embeddings=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(decoder.DecoderConfig):
    """Architecture of one decoder; validated on construction. The architecture has no defaults: it comes from a
    named preset (:meth:`preset`, :data:`PRESETS`) or a checkpoint (``lcm.io``). Runtime settings have defaults."""

    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    vocab_size: int  # rows of the embedding table
    hidden_size: int  # model width d_model
    intermediate_size: int  # SwiGLU hidden width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA); must divide num_heads
    rms_norm_eps: float  # RMSNorm epsilon
    rope_base: float  # RoPE base b (rope_theta)
    max_position_embeddings: int  # trained context length L0
    tie_embeddings: bool  # LM head shares the embedding matrix
    head_dim: int = 0  # per-head width; 0 means hidden_size // num_heads
    rope_variant: str = "default"  # a name in lcm.ops.rope.ROPE_VARIANTS
    rope_params: tuple[tuple[str, Any], ...] = ()  # the variant's parameters, as sorted (name, value) pairs
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
    o_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False  # biases in the MLP
    sliding_window: int | None = None  # Mistral's attention window in tokens; None = full causal
    dtype: str = "float32"  # compute dtype (activations, the KV cache): float32 | bfloat16
    param_dtype: str = "float32"  # parameters as stored: float32 | bfloat16 (cast to `dtype` where used)
    attention_q_block: int = 256  # query rows per attention tile (chunked XLA attention)
    attention_kv_block: int = 512  # keys per attention tile; fully masked tiles are skipped (BENCHMARKS.md)
    # keys per tile for single-token decode steps: few query rows, so bigger tiles amortise the loop (BENCHMARKS.md)
    attention_decode_kv_block: int = 2048
    # lcm.kernels.attention.api names tried in order: "auto" (= "cpu,xla": the CPU kernel where it applies) or "xla"
    attention_implementation: str = "auto"
    # inference runs the layers as one lax.scan over their stacked parameters and states (one layer compiled) where
    # every layer's state has the same shapes; False: the unrolled loop, faster on CPU (BENCHMARKS.md, layer scan)
    scan_layers: bool = False
    # a training-free extrapolation scheme inside attention (lcm.ops.position_schemes: SelfExtend, DCA, ReRoPE), with
    # the plain RoPE frequencies; None: RoPE as the variant says. Its defaults that depend on L0 are filled in here
    position_scheme: PositionScheme | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.check_common()
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be positive or None")
        if self.position_scheme is not None:
            if not isinstance(self.position_scheme, PositionScheme):
                raise ValueError(f"position_scheme must be a PositionScheme, got {self.position_scheme!r}")
            if self.rope_variant != "default" or self.sliding_window is not None:
                raise ValueError(
                    f"position scheme {self.position_scheme.name!r} runs on plain RoPE and full attention; this config "
                    f"has rope_variant={self.rope_variant!r}, sliding_window={self.sliding_window}"
                )
            object.__setattr__(self, "position_scheme", self.position_scheme.resolved(self.max_position_embeddings))

    def with_position_scheme(self, scheme: PositionScheme | None) -> LlamaConfig:
        """The same model under a training-free extrapolation scheme (plain RoPE frequencies), or without one."""
        return dataclasses.replace(self, position_scheme=scheme, **self.rope_fields("default", None, "all"))

    def with_rope(self, variant: str, params: dict[str, Any] | None = None, layers: str = "all") -> LlamaConfig:
        """The same model with another RoPE variant (``original_max_position_embeddings`` defaults to L0), on every
        layer: all of them are global, so ``layers`` may be ``global`` or ``all``."""
        return dataclasses.replace(self, **self.rope_fields(variant, params, layers), position_scheme=None)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs | None):
        self.scale = decoder.param(rngs, (dim,), ("embed",), dtype, None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * x32.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None):
        d, h, k, hd, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_param_dtype
        self.q_proj = decoder.param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dt, d)
        self.k_proj = decoder.param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), dt, d)
        self.v_proj = decoder.param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), dt, d)
        self.o_proj = decoder.param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dt, h * hd)
        if cfg.qkv_bias:
            self.q_bias = decoder.param(rngs, (h, hd), ("heads", "head_dim"), dt, 0)
            self.k_bias = decoder.param(rngs, (k, hd), ("kv_heads", "head_dim"), dt, 0)
            self.v_bias = decoder.param(rngs, (k, hd), ("kv_heads", "head_dim"), dt, 0)
        if cfg.o_bias:
            self.o_bias = decoder.param(rngs, (d,), ("embed",), dt, 0)
        self.qkv_bias, self.has_o_bias = cfg.qkv_bias, cfg.o_bias

    def project_qkv(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Pre-RoPE ``q [B,T,H,hd]``, ``k, v [B,T,K,hd]`` (Locret's retaining heads read these too)."""
        dt = x_BxTxD.dtype  # the compute dtype: parameters stored in another are cast where used
        q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.q_proj[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.k_proj[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.v_proj[...].astype(dt))
        if self.qkv_bias:
            biases = (self.q_bias[...].astype(dt), self.k_bias[...].astype(dt), self.v_bias[...].astype(dt))
            q, k, v = q + biases[0][None, None], k + biases[1][None, None], v + biases[2][None, None]
        return q, k, v

    def output(self, attn_BxTxHxK: jax.Array) -> jax.Array:
        dt = attn_BxTxHxK.dtype
        out = jnp.einsum("bthk,hkd->btd", attn_BxTxHxK, self.o_proj[...].astype(dt))
        return out + self.o_bias[...].astype(dt)[None, None] if self.has_o_bias else out


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None):
        d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
        self.gate_proj = decoder.param(rngs, (d, f), ("embed", "mlp"), dt, d)
        self.up_proj = decoder.param(rngs, (d, f), ("embed", "mlp"), dt, d)
        self.down_proj = decoder.param(rngs, (f, d), ("mlp", "embed"), dt, f)
        if cfg.mlp_bias:
            self.gate_bias = decoder.param(rngs, (f,), ("mlp",), dt, 0)
            self.up_bias = decoder.param(rngs, (f,), ("mlp",), dt, 0)
            self.down_bias = decoder.param(rngs, (d,), ("embed",), dt, 0)
        self.mlp_bias = cfg.mlp_bias

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = x @ self.gate_proj[...].astype(dt)
        up = x @ self.up_proj[...].astype(dt)
        if self.mlp_bias:
            gate, up = gate + self.gate_bias[...].astype(dt)[None, None], up + self.up_bias[...].astype(dt)[None, None]
        out = (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dt)
        return out + self.down_bias[...].astype(dt)[None, None] if self.mlp_bias else out


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype, rngs)
        self.attn = Attention(cfg, rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype, rngs)
        self.mlp = MLP(cfg, rngs)

    def attention_input(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.input_norm(x)

    def add_attention(self, x: Float[Array, "B T D"], attn: Float[Array, "B T H K"]) -> Float[Array, "B T D"]:
        return x + self.attn.output(attn)

    def add_mlp(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return x + self.mlp(self.post_attention_norm(x))

    def __call__(
        self, x: Float[Array, "B T D"], state: LayerCache | None, inputs: LayerInputs, settings: LayerSettings
    ) -> tuple[Float[Array, "B T D"], LayerCache | None]:
        """``(x, state) -> (x, state)`` (:func:`lcm.models.decoder_layer.decoder_layer`); ``state=None`` is the
        training layer: fresh keys and values attended under ``inputs.mask``, differentiable."""
        return decoder_layer(settings, *nnx.split(self), x, state, inputs)


class Llama(nnx.Module):
    """Decoder-only LM. ``model(tokens, positions, cache) -> (logits, cache)``; ``rngs=None`` builds shapes only
    (:func:`abstract_model`)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None):
        self.config = cfg
        dt = cfg.jnp_param_dtype
        self.embed = decoder.param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, 1)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, rngs)
        if not cfg.tie_embeddings:
            shape, axes = (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab")
            self.lm_head = decoder.param(rngs, shape, axes, dt, cfg.hidden_size)

    def init_cache(self, batch: int, capacity: int | Sequence[int], keys_pre_rope: bool = False) -> KVCache:
        """An empty cache of ``capacity`` slots in every layer, or one capacity per layer."""
        cfg = self.config
        return init_cache(cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype, keys_pre_rope)

    def window_layers(self) -> tuple[int, ...]:
        """The layers whose state keeps only a window of entries: none (Mistral's window is a mask over a full
        buffer)."""
        return ()

    def rope_tables(self, seq_len: jax.Array | int) -> tuple[jax.Array, jax.Array | float]:
        cfg = self.config
        return rope_ops.rope_frequencies(
            cfg.rope_variant, cfg.head_dim, cfg.rope_base, dict(cfg.rope_params), seq_len=seq_len
        )

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
        """Run the decoder on ``T`` new tokens written into the cache after its ``length`` filled slots.

        ``num_valid`` (default ``T``) counts the real tokens when the chunk is right-padded to a static shape:
        the cache length advances by it, and padded slots are overwritten by the next call. ``rope_seq_len``
        is the length that length-dependent RoPE variants (dynamic NTK, LongRoPE) scale for; by default the
        largest real position + 1, what transformers uses. ``observers`` marks the queries a KV policy's layer
        hooks (``cache.hooks``, :mod:`lcm.cache.hooks`) record from: whose attention probabilities are added to each
        layer's ``scores``, for a policy that ranks by them; a chunk with observers is also one whose new entries a
        trained head scores (Locret). The hooks also say what a step attends to (TokenSelect: a selection).
        """
        cfg = self.config
        batch, seq = decoder.check_call(cfg.num_layers, tokens, positions, cache)
        num_valid = jnp.asarray(seq if num_valid is None else num_valid, jnp.int32)
        positions = positions.astype(jnp.int32)
        if rope_seq_len is None:
            rope_seq_len = decoder.default_rope_length(positions, num_valid)
        inv_freq, attention_factor = self.rope_tables(rope_seq_len)
        x = self.embed[...][tokens].astype(cfg.jnp_dtype)
        settings = decoder.inference_settings(cfg, cache, seq)
        mask = masks.causal()
        if cfg.sliding_window is not None:
            mask &= masks.sliding_window(cfg.sliding_window)
        if cache.starts is not None:
            mask &= masks.left_padding(cache.starts)
        inputs = decoder.layer_inputs(
            positions,
            cache.layers[0],
            cache.keys_pre_rope,
            inv_freq,
            attention_factor,
            mask,
            num_valid,
            observers,
            cfg.position_scheme,
        )
        # one scan step per layer (parameters and states stacked per call) where every state has the same shapes
        period = 1 if cfg.scan_layers and decoder.equal_shapes(cache.layers) else None

        def call(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, state: Any, inputs: LayerInputs) -> Any:
            return decoder_layer(settings, graphdef, params, x, state, inputs)

        x, states = decoder.run_layers(call, self.layers, x, cache.layers, [inputs] * cfg.num_layers, period)
        return self.final_norm(x), dataclasses.replace(cache, layers=tuple(states))

    def train_hidden_states(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        segment_ids: Int[Array, "B T"] | None = None,
        *,
        remat: bool = False,
        scan: bool = False,
    ) -> Float[Array, "B T D"]:
        """The training forward's final hidden states ``[B, T, D]`` (:meth:`train_forward`, recording nothing)."""
        hidden, _ = self.train_forward(tokens, positions, segment_ids, remat=remat, scan=scan)
        return hidden

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
        """The training forward: no cache, fresh keys and values, differentiable; final hidden states ``[B, T, D]``
        and what ``hooks`` record in each layer (:meth:`lcm.cache.hooks.LayerHooks.record_forward`), stacked over
        the layers on a leading axis (None when they record nothing, or ``hooks`` is None).

        ``segment_ids`` packs documents into a row: a token attends only to earlier tokens of its own document
        (causal by index within the row, and by document); ``positions`` may run on across documents or restart in
        each (the data pipeline's choice). ``remat`` recomputes each block in the backward
        (``jax.checkpoint``) instead of keeping its activations. ``scan`` runs the blocks as one ``lax.scan`` over
        their stacked parameters (one block traced and compiled, whatever the depth; BENCHMARKS.md compares it with
        the unrolled loop). Length-dependent RoPE variants scale for the largest position + 1.
        """
        cfg = self.config
        batch, seq = tokens.shape
        chex.assert_shape(positions, (batch, seq))
        positions = positions.astype(jnp.int32)
        inv_freq, attention_factor = self.rope_tables(jnp.max(positions) + 1)
        rotation = rotary.rope_cos_sin(positions, inv_freq, attention_factor)
        mask = masks.causal()
        if segment_ids is not None:
            chex.assert_shape(segment_ids, (batch, seq))
            mask &= masks.documents(segment_ids, segment_ids)
        if cfg.sliding_window is not None:
            mask &= masks.sliding_window(cfg.sliding_window)
        settings = LayerSettings(
            attention=decoder.attention_settings(cfg, decode=False),
            hooks=hooks or LayerHooks(),
            positions=cfg.position_scheme,
        )
        num_valid = jnp.int32(seq)
        inputs = LayerInputs(positions, rotation, mask, inv_freq, attention_factor, num_valid)

        def block_call(
            graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, state: None, inputs: LayerInputs
        ) -> tuple[jax.Array, Any]:
            return decoder_layer(settings, graphdef, params, x, None, inputs)

        if remat:
            block_call = jax.checkpoint(block_call, static_argnums=(0,))
        x = self.embed[...][tokens].astype(cfg.jnp_dtype)
        count = cfg.num_layers
        x, records = decoder.run_layers(
            block_call, self.layers, x, [None] * count, [inputs] * count, 1 if scan else None
        )
        return self.final_norm(x), decoder.stack(records) if records[0] is not None else None

    def logits(self, hidden: Float[Array, "... D"]) -> Float[Array, "... V"]:
        """LM head; call it only where logits are needed (one position when generating)."""
        if self.config.tie_embeddings:
            embed = self.embed[...].astype(hidden.dtype)
            return jnp.einsum("...d,vd->...v", hidden, embed, preferred_element_type=jnp.float32)
        lm_head = self.lm_head[...].astype(hidden.dtype)
        return jnp.einsum("...d,dv->...v", hidden, lm_head, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: KVCache | None = None,
        **kwargs: Any,
    ) -> tuple[Float[Array, "B T V"], KVCache | None]:
        """``(logits, cache)``; with no cache the training forward (:meth:`train_hidden_states`, which takes
        ``segment_ids`` and ``remat``), returning ``(logits, None)``."""
        if cache is None:
            return self.logits(self.train_hidden_states(tokens, positions, **kwargs)), None
        hidden, cache = self.hidden_states(tokens, positions, cache, **kwargs)
        return self.logits(hidden), cache


def forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    cache: KVCache,
) -> tuple[Float[Array, "B T V"], KVCache]:
    """The model as a pure function: ``forward(*nnx.split(model), tokens, positions, cache)``."""
    return nnx.merge(graphdef, params)(tokens, positions, cache)


def abstract_model(cfg: LlamaConfig) -> Llama:
    """Shapes and sharding metadata only, no memory: the first step of a sharded or checkpoint init."""
    return Llama(cfg, rngs=None)


def with_config(model: Llama, cfg: LlamaConfig) -> Llama:
    """The same parameters under another config (e.g. another RoPE variant); shapes must agree."""
    graphdef, _ = nnx.split(abstract_model(cfg))
    return nnx.merge(graphdef, nnx.state(model))


def random_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A model with every parameter drawn in numpy (norm scales around 1, biases nonzero, matrices ~ 1/sqrt(fan_in)),
    so no term of the forward is trivial: for tests and benchmarks. Filling :func:`abstract_model` costs no
    compilation, where ``Llama(cfg, rngs=...)`` compiles a random kernel per parameter shape."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name, shape = path[-1], leaf.shape
        if name == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            value = 0.3 * rng.standard_normal(shape)
        elif name == "embed":
            value = rng.standard_normal(shape)
        else:  # q/k/v are [D, heads, head_dim]: fan-in D; every other matrix is [..., out] with fan-in the rest
            fan_in = shape[0] if name in ("q_proj", "k_proj", "v_proj") else np.prod(shape[:-1])
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return map_params(abstract_model(cfg), draw)
