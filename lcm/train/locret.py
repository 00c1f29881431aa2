"""Training Locret's retaining heads with the backbone frozen (Huang et al. 2024, arXiv 2410.01805; METHODS.md §9).

A sample of ``prompt_tokens`` tokens of text and ``answer_tokens`` answer tokens goes once through the frozen model
(:func:`lcm.train.locret_labels.layerwise_pass`: the model's own modules, layer by layer). That pass yields, per
layer, the **features** (pre-RoPE ``q, k, v`` of the prompt tokens: what the heads read at inference) and the
**labels**: the causal importance score (CIS) of every prompt token and KV head, ``S[k, g] = max over the answer
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

import time
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from lcm.cache.locret import Locret
from lcm.models.llama import Llama
from lcm.models.retaining import PAPER_FRACTION, RetainingHeads, retaining_hidden_width
from lcm.train.locret_data import (
    COPY_FRACTION,
    NEEDLE_FRACTION,
    default_texts,
    digit_token_ids,
    make_sample,
    split_streams,
    token_streams,
)
from lcm.train.locret_labels import Backbone, Example, backbone_of, layerwise_pass, make_example_fn

ALPHA = 0.0025  # weight of the smoothness term (train.py:217)
LEARNING_RATE = 5e-4  # AdamW peak learning rate (train.py:32)
BETAS = (0.9, 0.95)  # AdamW betas (train.py:58-59)
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which train.py:151 keeps
CLIP_VALUE = 0.5  # gradient clipping by value (train.py:57, :219)
WARMUP_FRACTION = 2 / 3  # 2000 warmup steps of 3000 (train.py:53-54)
TOP_FRACTION = 0.1  # the held-out overlap is of the top 10% (train.py:189)

# --- loss, steps, metric ----------------------------------------------------------------------------------------


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


# --- the training program ---------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
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
                kind: _mean([m for m, k in zip(means, kinds, strict=True) if k == kind]) for kind in sorted(set(kinds))
            },
        }
        if method in states:
            result[method]["recall_per_layer"] = [round(float(x), 4) for x in per_layer]
            result[method]["loss"] = _mean([float(row["loss"][method]) for row in rows])
    return result


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"locret training: {name}={value!r} must be a positive integer")


def train_on_streams(
    model: Llama,
    streams: Sequence[np.ndarray],
    *,
    steps: int,
    prompt_tokens: int,
    answer_tokens: int,
    samples: int = 16,
    seed: int = 0,
    learning_rate: float = LEARNING_RATE,
    warmup_fraction: float = WARMUP_FRACTION,
    alpha: float = ALPHA,
    hidden_fraction: float = PAPER_FRACTION,
    hidden_width: int | None = None,
    copy_fraction: float = COPY_FRACTION,
    needle_fraction: float = NEEDLE_FRACTION,
    digit_ids: Sequence[int] = (),
    eval_samples: int = 4,
    progress: bool = True,
) -> tuple[RetainingHeads, dict[str, Any]]:
    """Train retaining heads for ``model`` on samples from token ``streams`` (see :func:`train_retaining_heads`)."""
    _check_positive(steps=steps, prompt_tokens=prompt_tokens, answer_tokens=answer_tokens, samples=samples)
    if answer_tokens > prompt_tokens:
        raise ValueError(
            f"locret training: answer_tokens={answer_tokens} must not exceed prompt_tokens={prompt_tokens}"
        )
    for name, fraction in (("copy_fraction", copy_fraction), ("needle_fraction", needle_fraction)):
        if not 0 <= fraction <= 1:
            raise ValueError(f"locret training: {name}={fraction!r} must lie in [0, 1]")
    mix = {"copy_fraction": copy_fraction, "needle_fraction": needle_fraction, "digit_ids": digit_ids}
    sample_tokens = prompt_tokens + answer_tokens
    train_streams, held_out_streams = split_streams(streams, sample_tokens)
    rng, held_out_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    train_samples = [make_sample(rng, train_streams, prompt_tokens, answer_tokens, **mix) for _ in range(samples)]
    held_out = [
        make_sample(held_out_rng, held_out_streams, prompt_tokens, answer_tokens, **mix) for _ in range(eval_samples)
    ]

    width = hidden_width or retaining_hidden_width(model.config, hidden_fraction)
    graphdef, state = nnx.split(RetainingHeads(model.config, width, rngs=nnx.Rngs(seed)))
    initial = jax.tree.map(jnp.copy, state)
    optimizer = make_optimizer(steps, learning_rate, warmup_fraction)
    opt_state = optimizer.init(state)
    backbone = backbone_of(model, sample_tokens)

    started = time.perf_counter()
    fresh = samples >= steps  # one new sample per step: the fused step, no stored features
    examples = []
    if not fresh:
        example_fn = make_example_fn(prompt_tokens)
        for tokens, _ in tqdm(train_samples, desc="locret labels", unit="sample", disable=not progress):
            examples.append(jax.block_until_ready(example_fn(backbone, jnp.asarray(tokens[None]))))
    labelled = time.perf_counter()
    if fresh:
        fused_step = make_fused_train_step(graphdef, optimizer, prompt_tokens, alpha)
        inputs = [jnp.asarray(tokens[None]) for tokens, _ in train_samples[:steps]]
        order = np.arange(steps)
    else:
        train_step = make_train_step(graphdef, optimizer, alpha)
        order = np.concatenate([rng.permutation(samples) for _ in range(-(-steps // samples))])[:steps]
    losses: list[float] = []
    pending = None
    bar = tqdm(order, desc="locret heads", unit="step", disable=not progress)
    with jax.transfer_guard("disallow"):
        for step, index in enumerate(bar):
            if fresh:
                state, opt_state, parts = fused_step(backbone, state, opt_state, inputs[index])
            else:
                state, opt_state, parts = train_step(state, opt_state, examples[index])
            if pending is not None:  # read one step late, so the host never waits on the step it just queued
                losses.append(float(jax.device_get(pending["loss"])))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step == 0:
                jax.block_until_ready(parts)
                first_step = time.perf_counter() - labelled
            pending = parts
        losses.append(float(jax.device_get(pending["loss"])))
    trained = time.perf_counter()
    del examples

    head_params = sum(int(x.size) for x in jax.tree.leaves(state))
    model_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    window = max(1, min(10, steps // 5))
    metrics: dict[str, Any] = {
        "steps": steps,
        "samples": samples,
        "prompt_tokens": prompt_tokens,
        "answer_tokens": answer_tokens,
        "seed": seed,
        "learning_rate": learning_rate,
        "warmup_fraction": warmup_fraction,
        "alpha": alpha,
        "copy_fraction": copy_fraction,
        "needle_fraction": needle_fraction,
        "digit_ids": [int(i) for i in digit_ids],
        "kinds": {k: sum(kind == k for _, kind in train_samples) for k in sorted({kind for _, kind in train_samples})},
        "hidden_width": width,
        "head_params": head_params,
        "param_fraction": head_params / model_params,
        "train_loss_start": _mean(losses[:window]),
        "train_loss_end": _mean(losses[-window:]),
        "train_loss": [round(x, 5) for x in losses],
        "features": "fresh" if fresh else "stored",  # a new sample per step (fused step), or samples cycled
        "label_seconds_per_sample": 0.0 if fresh else (labelled - started) / samples,  # with the first's compile
        "first_step_seconds": first_step,  # includes compilation
        "seconds_per_step": (trained - labelled - first_step) / max(1, steps - 1),
        "train_seconds": trained - started,
    }
    if eval_samples:
        metrics["held_out"] = evaluate_heads(
            backbone, graphdef, {"trained": state, "initial": initial}, held_out, prompt_tokens, seed=seed, alpha=alpha
        )
    return nnx.merge(graphdef, state), metrics


def train_retaining_heads(
    model: Llama,
    tokenizer: Any,
    *,
    steps: int,
    prompt_tokens: int,
    answer_tokens: int,
    seed: int = 0,
    texts: Sequence[str] | None = None,
    **options: Any,
) -> tuple[RetainingHeads, dict[str, Any]]:
    """Train Locret retaining heads for the frozen ``model`` over ``steps`` steps (batch 1) of ``prompt_tokens`` +
    ``answer_tokens`` tokens from ``texts`` (default: the standard library's prose and code).

    ``options`` go to :func:`train_on_streams`: ``samples`` (distinct training samples, 16), ``learning_rate``,
    ``warmup_fraction``, ``alpha``, ``hidden_fraction`` or ``hidden_width``, ``copy_fraction``, ``needle_fraction``,
    ``digit_ids`` (default: the tokenizer's single-token digits), ``eval_samples``
    (held-out, 4), ``progress``. Returns the heads and a JSON-ready dict of metrics: train loss, timings and
    (``held_out``) the held-out loss and top-10% recall of the trained and untrained heads, with the random-score
    and most-recent baselines.
    """
    streams = token_streams(tokenizer, default_texts() if texts is None else texts)
    options.setdefault("digit_ids", digit_token_ids(tokenizer))
    return train_on_streams(
        model, streams, steps=steps, prompt_tokens=prompt_tokens, answer_tokens=answer_tokens, seed=seed, **options
    )


def summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: size, loss, speed, held-out recall against the baselines."""
    lines = [
        f"retaining heads: hidden {metrics['hidden_width']}, {metrics['head_params']:,} parameters "
        f"({metrics['param_fraction']:.2%} of the model)",
        f"train loss {metrics['train_loss_start']:.4f} -> {metrics['train_loss_end']:.4f} over {metrics['steps']} "
        f"steps on {min(metrics['samples'], metrics['steps'])} samples; "
        + ("" if metrics["features"] == "fresh" else f"labels {metrics['label_seconds_per_sample']:.1f} s/sample, ")
        + f"{metrics['seconds_per_step']:.2f} s/step, {metrics['train_seconds']:.0f} s in all",
    ]
    if "held_out" in metrics:
        held = metrics["held_out"]
        lines.append(
            f"held-out top-{held['keep_fraction']:.0%} recall over {held['samples']} samples: trained "
            f"{held['trained']['recall']:.3f} ({held['trained+stabilizers']['recall']:.3f} with stabilisers), "
            f"untrained {held['initial']['recall']:.3f}, random {held['random']['recall']:.3f}, most recent "
            f"{held['recent']['recall']:.3f}; loss {held['initial']['loss']:.4f} -> {held['trained']['loss']:.4f}"
        )
    return "\n".join(lines)


def run_locret_job(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``lcm run configs/locret_smollm2.py``: load the model, train its heads, evaluate held-out, save them."""
    from lcm.io.checkpoints import load_model
    from lcm.io.retaining import save_retaining_heads

    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    heads, metrics = train_retaining_heads(
        model,
        tokenizer,
        steps=cfg.steps,
        prompt_tokens=cfg.prompt_tokens,
        answer_tokens=cfg.answer_tokens,
        samples=cfg.samples,
        seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        warmup_fraction=cfg.warmup_fraction,
        alpha=cfg.alpha,
        hidden_fraction=cfg.hidden_fraction,
        copy_fraction=cfg.copy_fraction,
        needle_fraction=cfg.needle_fraction,
        eval_samples=cfg.eval_samples,
    )
    metadata = {"metrics": metrics, "config": cfg.to_dict()}
    out = save_retaining_heads(heads, cfg.model, metadata, directory=cfg.out or None)
    log(summary(metrics))
    log(f"wrote {out}")
    return {"out": str(out), **metrics}
