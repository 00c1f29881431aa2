"""The training program for Locret's retaining heads: samples, labels, the loop, the held-out report and the
``lcm run configs/locret_smollm2.py`` job. The method (loss, optimiser, steps, metric) and the choices behind this
program are in :mod:`lcm.train.locret`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lcm.models.llama import Llama
from lcm.models.retaining import PAPER_FRACTION, RetainingHeads, retaining_hidden_width
from lcm.train.locret import (
    ALPHA,
    LEARNING_RATE,
    WARMUP_FRACTION,
    evaluate_heads,
    make_fused_train_step,
    make_optimizer,
    make_train_step,
    mean_or_nan,
)
from lcm.train.locret_data import (
    COPY_FRACTION,
    NEEDLE_FRACTION,
    default_texts,
    digit_token_ids,
    make_sample,
    split_streams,
    token_streams,
)
from lcm.train.locret_labels import backbone_of, make_example_fn


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
    backbone = backbone_of(model)

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
        "train_loss_start": mean_or_nan(losses[:window]),
        "train_loss_end": mean_or_nan(losses[-window:]),
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
