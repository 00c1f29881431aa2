"""Perplexity versus length.

``nll`` at length ``n`` is the mean negative log-likelihood of the ``n - 1`` next-token predictions over the
first ``n`` tokens of a text (no BOS is added unless the tokenizer adds one). For texts longer than the context,
:func:`sliding_window_nll` follows the strided evaluation of transformers' perplexity guide: windows of
``length`` tokens advanced by ``stride``, each token scored once, with up to ``length - stride`` tokens of
context.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lcm.generate import Engine


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    length: int
    nll: float
    n_tokens: int  # number of scored predictions

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))

    def to_dict(self) -> dict:
        return {"length": self.length, "nll": self.nll, "ppl": self.ppl, "n_tokens": self.n_tokens}


def prefix_nll(engine: Engine, ids: np.ndarray, length: int) -> PerplexityResult:
    """Mean NLL of the first ``length`` tokens of ``ids``; an error if the text is shorter."""
    ids = np.asarray(ids)
    if length < 2:
        raise ValueError(f"length={length} must be at least 2")
    if ids.shape[-1] < length:
        raise ValueError(f"the text has {ids.shape[-1]} tokens, fewer than the requested length {length}")
    nlls = engine.token_nlls(ids[:length][None])
    return PerplexityResult(length=length, nll=float(nlls.mean()), n_tokens=int(nlls.size))


def perplexity_vs_length(engine: Engine, ids: np.ndarray, lengths: list[int]) -> list[PerplexityResult]:
    """:func:`prefix_nll` at each length, from one causal pass over the longest prefix where that is exact.

    Attention is causal, so the first ``n - 1`` per-token NLLs of a pass over ``max(lengths)`` tokens are those of
    a pass over ``n`` tokens whenever the RoPE tables are the same at both lengths. Variants whose tables depend on
    the length (dynamic NTK, LongRoPE past the trained context) get a pass of their own at each length.
    """
    ids = np.asarray(ids)
    longest = max(lengths)
    if ids.shape[-1] < longest:
        raise ValueError(f"the text has {ids.shape[-1]} tokens, fewer than the requested length {longest}")
    nlls = engine.token_nlls(ids[:longest][None])[0]
    inv_freq, factor = engine.model.rope_tables(longest)
    results = []
    for n in lengths:
        inv_freq_n, factor_n = engine.model.rope_tables(n)
        if np.array_equal(inv_freq_n, inv_freq) and float(factor_n) == float(factor):
            results.append(PerplexityResult(length=n, nll=float(nlls[: n - 1].mean()), n_tokens=n - 1))
        else:
            results.append(prefix_nll(engine, ids, n))
    return results


def sliding_window_nll(engine: Engine, ids: np.ndarray, length: int, stride: int) -> PerplexityResult:
    """Tokens of ``ids`` scored once each, in windows of ``length`` advanced by ``stride``.

    With ``stride < length`` every token after the first is scored; with ``stride == length`` (disjoint windows)
    the first token of each window has no context and is not scored, as in transformers' guide.
    """
    ids = np.asarray(ids)
    if not 0 < stride <= length:
        raise ValueError(f"stride={stride} must be in (0, length={length}]")
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[-1] - 1, stride):
        end = min(begin + length, ids.shape[-1])
        new = end - max(prev_end, begin + 1)  # tokens not scored by an earlier window
        nlls = engine.token_nlls(ids[begin:end][None])[0]
        total += float(nlls[-new:].sum())
        count += new
        prev_end = end
        if end == ids.shape[-1]:
            break
    return PerplexityResult(length=length, nll=total / count, n_tokens=count)
