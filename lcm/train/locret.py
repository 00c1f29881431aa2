"""Training Locret's retaining heads with the backbone frozen (Huang et al. 2024, arXiv 2410.01805; METHODS.md §9).

A sample of ``prompt_tokens`` tokens of text and ``answer_tokens`` answer tokens goes once through the frozen model
(:func:`lcm.train.locret_labels.layerwise_pass`: the model's training forward with a recording hook). That pass
yields, per layer, the **features** (pre-RoPE ``q, k, v`` of the prompt tokens: what the heads read at inference)
and the **labels**: the causal importance score (CIS) of every prompt token and KV head, ``S[k, g] = max over the answer
tokens p and the query heads h of group g of q_p·k_k / sqrt(D)`` (:func:`lcm.train.locret_labels.
causal_importance`). The heads (:class:`lcm.models.retaining.RetainingHeads`) are fitted by AdamW to
``SmoothL1(S̃, S) + alpha · Σ_layers MSE(S̃_k, S̃_k+1)`` (:func:`retaining_loss`).

What we took from the official code (huangyuxiang03/Locret; line numbers there):

- Labels (``locret/train/data_gen.py:117-141``): the prompt is prefilled (``:121-124``), then the answer runs with
  ``output_attentions`` through the plain attention (``:125``), which returns the **pre-softmax** logits
  ``q·k/sqrt(D)`` (``modeling_llama.py:377-382``) computed **after RoPE**: ``apply_rotary_pos_emb`` rotates the
  answer's queries at their positions and the cached keys at theirs (``:371``, positions ``0…T-1``, ``:956-957``).
  So our labels use the rotated ``q`` and ``k`` at their true positions (the model's RoPE, ``attention_factor``
  included), while the heads read the *unrotated* projections. Max over the query heads of a GQA group
  (``reshape(…, K, group, …).max(dim=2)``, ``:134``), then over the answer tokens, for prompt keys only (``:136``).
- Features: training runs the model over the prompt alone (``data_gen.py:140`` keeps ``input_ids[:prefix_len]``,
  ``train.py:76``); by causality the prompt's ``q, k, v`` are the same with the answer after it, so one forward
  over prompt + answer gives features and labels.
- Loss (``train.py:195-217``): ``SmoothL1Loss`` (``beta = 1``) averaged over layers, heads and positions; the
  smoothness term ``MSELoss(s[:, :-1], s[:, 1:])`` is *summed over layers* (``:209``) and weighted 0.0025 (``:217``).
- Optimiser (``train.py:46-62, 151-160, 219``): AdamW, lr 5e-4, betas (0.9, 0.95), torch's default weight decay
  0.01, gradients clipped by value at 0.5 before the update, linear warmup then linear decay to 0
  (``get_linear_schedule_with_warmup``, warmup 2000 of 3000 steps: ``warmup_fraction = 2/3``), batch 1.
- Metric: the overlap of the predicted and the true top-10% per layer and KV head (``train.py:189-207``, printed
  as ``acc``); we report it on held-out samples (recall at a 10% budget) for the trained and the untrained heads,
  for the trained heads with Locret's stabilisers (the newest 15% of the budget always kept, as the policy does
  before the last chunk), and for random scores (0.1 expected) and the most recent 10%. The heads read no
  position (pre-RoPE features), while the labels decay with distance under RoPE: recency is what the
  stabilisers and the ``n_loc`` tail supply at inference.

Choices and deviations, and why:

- **Data** (:mod:`lcm.train.locret_data`). The official heads train on 3000 LongAlpaca instruction samples
  (answers written about a long context); we have no such data offline, so samples come from long local text
  (Python's reference documentation and the ``typing`` module's source; never the eval task generators). The
  answer is, per sample, with probability ``needle_fraction`` (0.4 in the config) the **needles planted in a
  filler** (four short spans of the text or runs of random digits, in a window of the text or one span
  repeated), else with probability ``copy_fraction`` (0.5) a **copy of a random span of the prompt**, else the
  **text that follows** the prompt. The continuation alone gives labels that point mostly at the recent window
  and at syntax, which the stabilisers and the ``n_loc`` tail keep anyway; an answer that depends on a distant
  part of the context is what a long-context answer is, and repeating a span is its generic, task-free form
  (induction heads attend to the span, so the labels point at it). The needles were added after heads trained on
  copies and continuations alone evicted the digits of a reworded passkey prompt (README): no such sample is a
  few new tokens in low-information context, which is what retrieval tasks hide. No template of any eval task is
  used. Spans and needles are uniform over the prompt, so no position prior is learned. The model's own greedy
  continuation was not used: 128 decode steps per sample cost more than the training itself. The last 10% of
  each text is held out.
- **Features computed once per sample.** On 2 CPU cores the frozen forward of a 2k-token sample costs 8-20 s and a
  step of the heads ~1 s, so by default the features and labels of ``samples`` samples (48 in the config) are
  computed first (stored in bfloat16: 118 MB per 2k sample for SmolLM2-135M) and the heads then train ``steps``
  steps over them in shuffled epochs: 450 steps in ~15 minutes instead of over an hour. With ``samples >= steps``
  every step takes a fresh sample through :func:`make_fused_train_step` (forward under ``stop_gradient`` +
  update, one program, no stored features): the official regime, which recomputes the forward at every step
  (``train.py:181``).
- **Labels from one forward without a cache** instead of chunked prefill (``data_gen.py:121``): the same numbers
  up to float round-off, since the official data generation evicts nothing. Attention is the model's own
  :func:`lcm.ops.attention.chunked_attention` (what ``Llama`` calls; 1.5x faster than the dense reference here).
- **Sliding windows** (Mistral) are applied to the forward's attention but not to the labels: a label is the raw
  logit, as in the official code (written for models without windows).
- **Short CPU runs**: 450 steps over 48 samples of 2k tokens by default instead of 3000 samples of up to 10240
  tokens, and float32 instead of bf16 for the model and the heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from lcm.cache.locret import Locret
from lcm.models.retaining import RetainingHeads
from lcm.train.locret_labels import Backbone, Example, layerwise_pass

ALPHA = 0.0025  # weight of the smoothness term (train.py:217)
LEARNING_RATE = 5e-4  # AdamW peak learning rate (train.py:32)
BETAS = (0.9, 0.95)  # AdamW betas (train.py:58-59)
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which train.py:151 keeps
CLIP_VALUE = 0.5  # gradient clipping by value (train.py:57, :219)
WARMUP_FRACTION = 2 / 3  # 2000 warmup steps of 3000 (train.py:53-54)
TOP_FRACTION = 0.1  # the held-out overlap is of the top 10% (train.py:189)

# --- loss, steps, metric (the program that runs them: lcm.train.locret_run) ---------------------------------


def predict(heads: RetainingHeads, example: Example) -> Float[Array, "L B P K"]:
    """Every layer's predicted CIS of the prompt tokens."""
    return jnp.stack([head(example.q[i], example.k[i], example.v[i]) for i, head in enumerate(heads.heads)])


def retaining_loss(
    predicted: Float[Array, "L B P K"], target: Float[Array, "L B P K"], alpha: float = ALPHA
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``mean SmoothL1(S̃, S) + alpha · Σ_layers mean (S̃_k+1 - S̃_k)²`` (the official reductions, module docstring)."""
    chex.assert_equal_shape([predicted, target])
    fit = jnp.mean(optax.huber_loss(predicted, target, delta=1.0))  # Huber with delta 1 is SmoothL1 with beta 1
    smoothness = jnp.sum(jnp.mean(jnp.square(predicted[:, :, 1:] - predicted[:, :, :-1]), axis=(1, 2, 3)))
    return fit + alpha * smoothness, {"smooth_l1": fit, "smoothness": smoothness}


def make_optimizer(
    steps: int, learning_rate: float = LEARNING_RATE, warmup_fraction: float = WARMUP_FRACTION
) -> optax.GradientTransformation:
    """Clip by value, then AdamW under a linear warmup and a linear decay to 0 (``get_linear_schedule_with_warmup``)."""
    warmup = min(max(steps - 1, 1), max(1, round(warmup_fraction * steps)))
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, learning_rate, warmup),
            optax.linear_schedule(learning_rate, 0.0, max(1, steps - warmup)),
        ],
        [warmup],
    )
    adamw = optax.adamw(schedule, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY)
    return optax.chain(optax.clip(CLIP_VALUE), adamw)


Step = Callable[..., tuple[nnx.State, optax.OptState, dict[str, jax.Array]]]


def _update(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, alpha: float) -> Step:
    def update(
        state: nnx.State, opt_state: optax.OptState, example: Example
    ) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
        def loss_fn(params: nnx.State) -> tuple[jax.Array, dict[str, jax.Array]]:
            return retaining_loss(predict(nnx.merge(graphdef, params), example), example.cis, alpha)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, {"loss": loss, **parts}

    return update


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, alpha: float = ALPHA) -> Step:
    """``step(heads_state, opt_state, example) -> (heads_state, opt_state, losses)`` on stored features and
    labels, jitted (once per shape)."""
    return jax.jit(_update(graphdef, optimizer, alpha), donate_argnums=(0, 1))


def make_fused_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, prompt_length: int, alpha: float = ALPHA
) -> Step:
    """``step(backbone, heads_state, opt_state, tokens) -> (heads_state, opt_state, losses)``: the frozen forward
    under ``stop_gradient``, then the heads' update, in one program jitted once per token shape."""
    update = _update(graphdef, optimizer, alpha)

    def step(
        backbone: Backbone, state: nnx.State, opt_state: optax.OptState, tokens: jax.Array
    ) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
        _, example = layerwise_pass(backbone, tokens, prompt_length)
        return update(state, opt_state, jax.lax.stop_gradient(example))

    return jax.jit(step, donate_argnums=(1, 2))


def top_overlap(scores: Float[Array, "L B P K"], target: Float[Array, "L B P K"], keep: int) -> Float[Array, " L"]:
    """Per layer, the share of the true top-``keep`` prompt positions (per batch row and KV head) that the
    top-``keep`` of ``scores`` holds too: recall at a budget of ``keep`` tokens."""

    def members(x: jax.Array) -> jax.Array:
        _, top = jax.lax.top_k(x.swapaxes(2, 3), keep)  # [L, B, K, keep]
        return jnp.put_along_axis(jnp.zeros(top.shape[:-1] + (x.shape[2],), bool), top, True, axis=-1, inplace=False)

    return jnp.mean(jnp.sum(members(scores) & members(target), axis=-1) / keep, axis=(1, 2))


def make_eval_step(
    graphdef: nnx.GraphDef, names: Sequence[str], prompt_length: int, keep: int, alpha: float = ALPHA
) -> Callable[..., dict[str, dict[str, jax.Array]]]:
    """``evaluate(backbone, states, tokens, key)``, jitted, one frozen forward for all: the loss of each heads state
    (named by ``names``) and the per-layer top-``keep`` overlap of its scores, of its scores with Locret's default
    stabilisers (the newest 15% of ``keep`` always kept, :class:`lcm.cache.locret.Locret`), of random scores and of
    the most recent ``keep`` tokens."""
    policy = Locret(budget=keep)

    def with_stabilizers(scores: jax.Array) -> jax.Array:
        filled = jnp.int32(prompt_length)
        return policy.priority(scores.swapaxes(2, 3), filled, filled).swapaxes(2, 3)

    def evaluate(backbone: Backbone, states: tuple[nnx.State, ...], tokens: jax.Array, key: jax.Array) -> dict:
        _, example = layerwise_pass(backbone, tokens, prompt_length)
        recency = jnp.broadcast_to(jnp.arange(prompt_length, dtype=jnp.float32)[:, None], example.cis.shape[2:])
        methods = {
            "random": jax.random.uniform(key, example.cis.shape),
            "recent": jnp.broadcast_to(recency, example.cis.shape),
        }
        losses = {}
        for name, state in zip(names, states, strict=True):
            predicted = predict(nnx.merge(graphdef, state), example)
            losses[name], _ = retaining_loss(predicted, example.cis, alpha)
            methods[name] = predicted
            methods[f"{name}+stabilizers"] = with_stabilizers(predicted)
        overlap = {name: top_overlap(scores, example.cis, keep) for name, scores in methods.items()}
        return {"loss": losses, "overlap": overlap}

    return jax.jit(evaluate)


def mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def evaluate_heads(
    backbone: Backbone,
    graphdef: nnx.GraphDef,
    states: dict[str, nnx.State],
    samples: Sequence[tuple[np.ndarray, str]],
    prompt_tokens: int,
    *,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Top-10% recall on ``samples`` (averaged over layers, KV heads and samples; per answer kind) of each named heads
    state, alone and with Locret's stabilisers, of random scores and of the most recent tokens; the heads' loss and
    per-layer recall."""
    keep = max(1, round(TOP_FRACTION * prompt_tokens))
    evaluate = make_eval_step(graphdef, list(states), prompt_tokens, keep, alpha)
    values = tuple(states.values())
    rows = [
        jax.device_get(evaluate(backbone, values, jnp.asarray(tokens[None]), jax.random.key(seed + i)))
        for i, (tokens, _) in enumerate(samples)
    ]
    kinds = [kind for _, kind in samples]
    result: dict[str, Any] = {"samples": len(samples), "keep": keep, "keep_fraction": TOP_FRACTION}
    for method in rows[0]["overlap"]:
        per_layer = np.mean([row["overlap"][method] for row in rows], axis=0)
        means = [float(row["overlap"][method].mean()) for row in rows]
        result[method] = {
            "recall": float(per_layer.mean()),
            "recall_by_kind": {
                kind: mean_or_nan([m for m, k in zip(means, kinds, strict=True) if k == kind])
                for kind in sorted(set(kinds))
            },
        }
        if method in states:
            result[method]["recall_per_layer"] = [round(float(x), 4) for x in per_layer]
            result[method]["loss"] = mean_or_nan([float(row["loss"][method]) for row in rows])
    return result
