"""TokenSelect: dynamic token-level KV selection by a soft vote of the query heads, as pure ``jnp`` functions.

Wu et al. 2024, "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic
Token-Level KV Cache Selection" (arXiv 2411.02886), METHODS.md §5. Per layer and step, with ``N`` filled slots and a
chunk of ``T`` new tokens (512 in prefill, 1 in decode) already written at the end of the cache:

1. ``N <= n_init + k + n_local``: full attention over the ``N`` slots.
2. ``q̄ = mean_t q_t`` (:func:`query_fingerprint`); criticality ``s[h, j] = q̄_h · K_j`` of the pre-RoPE key of head
   ``h``'s KV group, no ``1/sqrt(d)`` (:func:`criticality`).
3. Soft vote ``v[j] = Σ_h softmax_j(s[h, ·])``, softmax over the candidates ``j ∈ [n_init, N − n_local)``
   (:func:`soft_vote`).
4. ``I = first n_init ∪ sort(top-k(v)) ∪ last n_local`` (:func:`select_tokens`), and attention over ``I`` only, the
   selected keys rotated at contiguous positions ``0 … |I| − 1`` (:func:`selected_attention`): the source of its
   length extrapolation.
5. Selection cache: reuse the previous top-k while ``cos(q̄, q̄_cached) >= 0.9`` (:func:`select_with_cache`).

Shapes are static: a selection is ``min(n_init + k + n_local, S)`` cache slots per row (:func:`selection_width`)
with a validity mask; rows below the budget (step 1) list their filled slots first and pad. ``length`` and the
optional ``start`` (first real slot of a left-padded row, as ``KVCache.starts``) are scalars or ``[B]``; "first" and
"last" slots count inside ``[start, length)``.

What we took from the official code (pzs19/TokenSelect, ``patcher/token_retrieval.py``; line numbers there):

- Scores are plain dot products of the mean query with the *pre-RoPE* key buffer (``:224``; the model's rotary is
  patched out, ``:856-881``, and FlashInfer rotates at read time, ``ROPE_LLAMA``, ``:760-772``).
- The vote is summed over *all* query heads of the layer, ``softmax(scores, -1).sum(0)`` (``:361``), and across
  tensor-parallel ranks (``all_reduce``, ``:363-364``): one selection per layer, shared by every head. So
  :func:`soft_vote` returns ``[B, S]``, not one vote per KV head.
- ``top-k`` then ``sort`` (``:371-372``); ``[0, n_init) ∪ top-k ∪ [N − n_local, N)`` (``:436-446``); full attention
  when ``n_init + k + n_local >= N`` (``:377-378``).
- The query fingerprint is the chunk's mean query *after* rotating query ``t`` at position ``n_local + t``
  (``QUERY_ROTATE = True``, ``:380-392``, ``:916``), against unrotated keys: pass ``inv_freq`` and
  ``position_offset=n_local`` to :func:`query_fingerprint` (:func:`token_select_attention` does).
- Chunked prefill (``:716-775``, chunk 512 = ``n_local``, ``:917``): a chunk's K/V are stored *before* its selection
  (``:726-738``), so ``N`` includes the chunk and its tokens are the last entries of the local window; FlashInfer then
  runs causal attention over the retrieved list, keys at list positions ``0 … n−1`` and query ``t`` at
  ``n − T + t``. :func:`selected_attention` states the same by slot: query ``t`` (slot ``q_offset + t``) sees the
  selected slots ``<=`` its own, at the position = number of selected slots before its own.
- Selection cache intent (``:301-315``, ``:394-421``): one fingerprint ``[H·D]`` per layer, cosine similarity of the
  flattened vector, threshold 0.9; only the top-k is cached (``:415``) and reused (``:419``) while ``n_init`` and
  ``n_local`` are re-derived from the current ``N``; the fingerprint is refreshed only on recomputation (``:416``).

Deviations, and why:

- GQA: query head ``h`` reads KV head ``h // (H / H_kv)`` (transformers' ``repeat_kv``, our attention); the official
  kernel uses ``h % H_kv`` (``:202``), which reads the wrong group for HF-layout GQA models.
- Scores and softmax in float32; the official kernel writes bfloat16 scores (``:346``).
- No max-pooling of the votes (``KERNEL_SIZE``, ``:366-369``): off by default there (``kernel_size=-1``, ``:893``).
- The selection cache works: the released one is disabled (``QUERY_CACHE = False``, ``:918``) and broken —
  ``torch.cosine_similarity`` of two 1-D tensors with its default ``dim=1`` raises, ``get_topk_tokens`` is called
  without its ``indices`` argument (``:412``). Ours is per batch row, and a cached top-k is only reused while all of
  it is still a candidate (``< N − n_local``), so a cache left over from another sequence is never used.
- The model (:mod:`lcm.models.llama`) reuses selections at decode steps only (the paper motivates the cache by
  consecutive decode queries): the means of 512 prefill queries are alike whatever they attend to, and with reuse
  in prefill 62% of the layer steps of an 8k passkey prompt on SmolLM2 reused a selection made chunks earlier and
  the key was lost. These functions take any ``threshold``; the model passes ``inf`` for chunks of more than 1.
- Ties in the top-k go to the lower slot (``lax.top_k``); ``torch.topk`` leaves them unspecified.
- RoPE is the model's (any variant's ``inv_freq`` and ``attention_factor``, :func:`lcm.ops.rotary.apply_rope`) for the
  fingerprint and the attention, where the official code uses a plain LLaMA RoPE with ``rope_base``/``rope_scale``.
- A chunk longer than ``n_local`` is rejected by :func:`token_select_attention`: its first tokens would not be
  selected themselves, and the official causal alignment (chunk = last ``T`` entries) would be wrong.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcm.ops.rotary import apply_rope

DEFAULT_N_INIT = 128
DEFAULT_TOP_K = 2048
DEFAULT_N_LOCAL = 512
DEFAULT_THRESHOLD = 0.9

Length = Int[Array, ""] | Int[Array, " B"] | int


def selection_width(n_init: int, k: int, n_local: int, capacity: int) -> int:
    """Static number of entries per row of a selection: the budget ``n_init + k + n_local``, at most ``capacity``."""
    for name, value in (("n_init", n_init), ("k", k), ("n_local", n_local)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"TokenSelect {name} must be an integer >= 0, got {value!r}")
    return min(n_init + k + n_local, capacity)


def _rows(x: Length | None, batch: int, default: int = 0) -> jax.Array:
    """A scalar or ``[B]`` integer as ``[B]`` int32."""
    x = jnp.asarray(default if x is None else x, jnp.int32)
    if x.ndim > 1 or (x.ndim == 1 and x.shape[0] not in (1, batch)):
        raise ValueError(f"expected a scalar or a [B] = [{batch}] array, got shape {x.shape}")
    return jnp.broadcast_to(x.reshape(-1), (batch,))


def query_fingerprint(
    q: Float[Array, "B T H D"],
    *,
    inv_freq: Float[Array, " F"] | None = None,
    attention_factor: float | jax.Array = 1.0,
    position_offset: int = 0,
    q_valid: Bool[Array, "B T"] | None = None,
) -> Float[Array, "B H D"]:
    """``q̄``: mean over the chunk's (valid) queries, float32; with ``inv_freq``, query ``t`` rotated at
    ``position_offset + t`` first (the official ``QUERY_ROTATE`` with ``position_offset = n_local``)."""
    batch, q_len = q.shape[:2]
    q = q.astype(jnp.float32)
    if inv_freq is not None:
        positions = jnp.broadcast_to(position_offset + jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
        q = apply_rope(q, positions, inv_freq, attention_factor)
    if q_valid is None:
        return q.mean(axis=1)
    if q_valid.shape != (batch, q_len):
        raise ValueError(f"q_valid has shape {q_valid.shape}; expected (B, T) = {(batch, q_len)}")
    weights_BxT = q_valid.astype(jnp.float32) / jnp.maximum(q_valid.sum(axis=1, keepdims=True), 1)
    return jnp.einsum("bt,bthd->bhd", weights_BxT, q)


def criticality(
    q_mean: Float[Array, "B H D"], keys: Float[Array, "B K S D"], length: Length, *, start: Length | None = None
) -> Float[Array, "B H S"]:
    """``s[b, h, j] = q̄[b, h] · keys[b, h // (H/K), j]``: pre-RoPE keys, no scale; ``-inf`` outside
    ``[start, length)``."""
    batch, num_heads, head_dim = q_mean.shape
    num_kv_heads, capacity = keys.shape[1], keys.shape[2]
    if keys.shape != (batch, num_kv_heads, capacity, head_dim) or num_heads % num_kv_heads:
        raise ValueError(f"incompatible shapes q_mean={q_mean.shape} keys={keys.shape} (keys as [B, K, S, D])")
    q_BxKxGxD = q_mean.astype(jnp.float32).reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("bkgd,bksd->bkgs", q_BxKxGxD, keys.astype(jnp.float32)).reshape(batch, num_heads, capacity)
    slots_S = jnp.arange(capacity, dtype=jnp.int32)
    filled_BxS = (slots_S[None] >= _rows(start, batch)[:, None]) & (slots_S[None] < _rows(length, batch)[:, None])
    return jnp.where(filled_BxS[:, None, :], scores, -jnp.inf)


def candidate_mask(
    length: Length, capacity: int, n_init: int, n_local: int, *, start: Length | None = None
) -> Bool[Array, "B S"]:
    """Slots eligible for the top-k: ``[start + n_init, length − n_local)``; ``B`` is 1 for a scalar ``length`` and
    ``start``."""
    batch = max(jnp.size(length), 1 if start is None else jnp.size(start))
    slots_S = jnp.arange(capacity, dtype=jnp.int32)
    lo = _rows(start, batch)[:, None] + n_init
    return (slots_S[None] >= lo) & (slots_S[None] < _rows(length, batch)[:, None] - n_local)


def soft_vote(scores: Float[Array, "B H S"], candidates: Bool[Array, "B S"] | Bool[Array, " S"]) -> Float[Array, "B S"]:
    """``v[b, j] = Σ_h softmax over candidates of scores[b, h, ·]``; 0 at non-candidates (and rows with none)."""
    candidates = jnp.broadcast_to(candidates, (scores.shape[0], scores.shape[2]))
    logits = jnp.where(candidates[:, None, :], scores.astype(jnp.float32), -jnp.inf)
    has_any_B = candidates.any(axis=-1)
    probs = jax.nn.softmax(jnp.where(has_any_B[:, None, None], logits, 0.0), axis=-1)
    return jnp.where(candidates & has_any_B[:, None], probs.sum(axis=1), 0.0)


def top_k_candidates(votes: Float[Array, "B S"], candidates: Bool[Array, "B S"], k: int) -> Int[Array, "B k"]:
    """The ``k`` candidate slots of highest vote, ascending (ties to the lower slot). Meaningful where a row has
    more than ``k`` candidates, which is exactly when it selects."""
    if k == 0:
        return jnp.zeros((votes.shape[0], 0), jnp.int32)
    masked = jnp.where(jnp.broadcast_to(candidates, votes.shape), votes.astype(jnp.float32), -jnp.inf)
    return jnp.sort(jax.lax.top_k(masked, k)[1].astype(jnp.int32), axis=-1)


def assemble_selection(
    top: Int[Array, "B k"], length: Length, n_init: int, n_local: int, capacity: int, *, start: Length | None = None
) -> tuple[Int[Array, "B W"], Bool[Array, "B W"]]:
    """``(indices, valid)`` of width :func:`selection_width`: ``[start, start + n_init) ∪ top ∪ [length − n_local,
    length)`` where ``length − start > n_init + k + n_local``, else the filled slots ``start …`` then padding.

    Valid entries are a prefix, sorted ascending and unique; padding points at ``min(start + j, S − 1)``.
    """
    batch, k = top.shape
    width = selection_width(n_init, k, n_local, capacity)
    length_B, start_B = _rows(length, batch), _rows(start, batch)
    j_W = jnp.arange(width, dtype=jnp.int32)
    full = jnp.minimum(start_B[:, None] + j_W[None], capacity - 1)
    valid = j_W[None] < (length_B - start_B)[:, None]
    if width < n_init + k + n_local:  # the budget covers the cache: every row attends fully
        return full, valid
    init = start_B[:, None] + jnp.arange(n_init, dtype=jnp.int32)[None]
    local = length_B[:, None] - n_local + jnp.arange(n_local, dtype=jnp.int32)[None]
    selected = jnp.concatenate([init, top.astype(jnp.int32), local], axis=1)
    selects_B = (length_B - start_B) > width
    return jnp.where(selects_B[:, None], selected, full), valid | selects_B[:, None]


def select_tokens(
    votes: Float[Array, "B S"], length: Length, *, n_init: int, k: int, n_local: int, start: Length | None = None
) -> tuple[Int[Array, "B W"], Bool[Array, "B W"]]:
    """First ``n_init`` ∪ top-``k`` candidates by vote ∪ last ``n_local`` filled slots, or all filled slots when they
    fit the budget (see :func:`assemble_selection`)."""
    batch, capacity = votes.shape
    if selection_width(n_init, k, n_local, capacity) < n_init + k + n_local:
        top = jnp.zeros((batch, k), jnp.int32)  # never used: no row can exceed the budget
    else:
        candidates = candidate_mask(_rows(length, batch), capacity, n_init, n_local, start=start)
        top = top_k_candidates(votes, candidates, k)
    return assemble_selection(top, length, n_init, n_local, capacity, start=start)


def selected_attention(
    q: Float[Array, "B T H D"],
    keys: Float[Array, "B K S D"],
    values: Float[Array, "B K S D"],
    indices: Int[Array, "B W"],
    valid: Bool[Array, "B W"],
    *,
    q_offset: Length,
    inv_freq: Float[Array, " F"],
    attention_factor: float | jax.Array = 1.0,
    scale: float | None = None,
) -> Float[Array, "B T H D"]:
    """Softmax attention of the chunk over the selected entries, RoPE applied at contiguous positions.

    ``q``, ``keys`` are pre-RoPE. Valid entry ``w`` gets position = number of valid entries before it; query ``t``
    sits at slot ``q_offset + t``, sees the valid entries of slot ``<=`` its own, and is rotated at the number of
    valid entries of slot ``<`` its own — its own key's position when the chunk is in the selection (the last
    entries, ``n − T + t``). Scale ``1/sqrt(D)``; a query that sees nothing gets zeros. Plain ``jnp``, float32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, capacity = keys.shape[1], keys.shape[2]
    width = indices.shape[1]
    if keys.shape != values.shape or keys.shape != (batch, num_kv_heads, capacity, head_dim):
        raise ValueError(f"incompatible shapes q={q.shape} keys={keys.shape} values={values.shape} ([B, K, S, D])")
    if num_heads % num_kv_heads or indices.shape != (batch, width) or valid.shape != (batch, width):
        raise ValueError(
            f"incompatible shapes q={q.shape} keys={keys.shape} indices={indices.shape} valid={valid.shape}"
        )
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    gather = indices.astype(jnp.int32)[:, None, :, None]
    k_BxWxKxD = jnp.take_along_axis(keys.astype(jnp.float32), gather, axis=2).swapaxes(1, 2)
    v_BxWxKxD = jnp.take_along_axis(values.astype(jnp.float32), gather, axis=2).swapaxes(1, 2)
    k_positions_BxW = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    k_BxWxKxD = apply_rope(k_BxWxKxD, k_positions_BxW, inv_freq, attention_factor)

    q_slots_BxT = _rows(q_offset, batch)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None]
    before_BxTxW = valid[:, None, :] & (indices[:, None, :] < q_slots_BxT[:, :, None])
    q_BxTxHxD = apply_rope(
        q.astype(jnp.float32), before_BxTxW.sum(axis=-1, dtype=jnp.int32), inv_freq, attention_factor
    )
    visible_BxTxW = valid[:, None, :] & (indices[:, None, :] <= q_slots_BxT[:, :, None])

    q_BxTxKxGxD = q_BxTxHxD.reshape(batch, q_len, num_kv_heads, group, head_dim)
    logits = jnp.einsum("btkgd,bwkd->bkgtw", q_BxTxKxGxD, k_BxWxKxD) * scale
    logits = jnp.where(visible_BxTxW[:, None, None], logits, -jnp.inf)
    sees_any = visible_BxTxW.any(axis=-1)[:, None, None, :, None]
    probs = jnp.where(sees_any, jax.nn.softmax(jnp.where(sees_any, logits, 0.0), axis=-1), 0.0)
    out = jnp.einsum("bkgtw,bwkd->btkgd", probs, v_BxWxKxD)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectionCache:
    """One layer's cached selection per row: the fingerprint it was computed from and its top-k slots."""

    q_mean: jax.Array  # [B, H, D] float32: q̄ at the last recomputation
    top: jax.Array  # [B, k] int32: the top-k slots chosen then, ascending
    filled: jax.Array  # [B] bool: whether the row holds a selection yet


def init_selection_cache(
    batch: int, num_heads: int, head_dim: int, k: int, num_layers: int | None = None
) -> SelectionCache:
    """An empty cache: nothing is reused until a row has selected once. With ``num_layers``, one per layer,
    stacked on a leading axis (the cache holds one per layer, :class:`lcm.cache.kv.LayerCache`)."""
    lead = () if num_layers is None else (num_layers,)
    return SelectionCache(
        q_mean=jnp.zeros((*lead, batch, num_heads, head_dim), jnp.float32),
        top=jnp.zeros((*lead, batch, k), jnp.int32),
        filled=jnp.zeros((*lead, batch), bool),
    )


@dataclasses.dataclass(frozen=True)
class TokenSelectRule:
    """The static parameters of a TokenSelect step (hashable: it rides on the KV cache as static metadata)."""

    n_init: int = DEFAULT_N_INIT  # first tokens always attended (attention sinks)
    k: int = DEFAULT_TOP_K  # tokens chosen by the soft vote
    n_local: int = DEFAULT_N_LOCAL  # last tokens always attended; a prefill chunk must fit in it
    threshold: float = DEFAULT_THRESHOLD  # cosine similarity above which the previous top-k is reused

    def __post_init__(self) -> None:
        selection_width(self.n_init, self.k, self.n_local, 1)  # validates the three counts
        if self.n_local < 1:
            raise ValueError(f"TokenSelect n_local={self.n_local} must be >= 1 (the current token is local)")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"TokenSelect threshold={self.threshold!r} must be a number (cosine; > 1 = no reuse)")

    @property
    def budget(self) -> int:
        """Entries a step attends to once the cache holds more: ``n_init + k + n_local``."""
        return self.n_init + self.k + self.n_local


def fingerprint_similarity(a: Float[Array, "B H D"], b: Float[Array, "B H D"]) -> Float[Array, " B"]:
    """Cosine similarity of the flattened ``[H·D]`` fingerprints (the official intent, ``:397-399``); 0 where
    either is the zero vector, so an empty cache entry never matches."""
    a, b = a.reshape(a.shape[0], -1).astype(jnp.float32), b.reshape(b.shape[0], -1).astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.where(norms > 0, (a * b).sum(axis=-1) / jnp.where(norms > 0, norms, 1.0), 0.0)


def reuse_mask(
    cache: SelectionCache, q_mean: Float[Array, "B H D"], length: Length, *, n_local: int, threshold: float
) -> Bool[Array, " B"]:
    """Rows whose cached top-k is reused: filled, similar enough, and every cached slot still a candidate."""
    batch, k = cache.top.shape
    still_candidates = (cache.top[:, -1] < _rows(length, batch) - n_local) if k else jnp.ones((batch,), bool)
    return cache.filled & (fingerprint_similarity(q_mean, cache.q_mean) >= threshold) & still_candidates


def select_with_cache(
    q_mean: Float[Array, "B H D"],
    keys: Float[Array, "B K S D"],
    length: Length,
    cache: SelectionCache,
    *,
    n_init: int,
    k: int,
    n_local: int,
    threshold: float = DEFAULT_THRESHOLD,
    start: Length | None = None,
) -> tuple[Int[Array, "B W"], Bool[Array, "B W"], SelectionCache, Bool[Array, " B"]]:
    """:func:`select_tokens` from :func:`criticality` and :func:`soft_vote`, reusing cached top-k rows.

    Returns ``(indices, valid, new_cache, reused)``. Scoring is skipped (``lax.cond``) when no row needs it; rows
    that select anew refresh their cache entry, rows at full attention leave it as it was (as the official code).
    """
    batch, capacity = q_mean.shape[0], keys.shape[2]
    if cache.top.shape != (batch, k):
        raise ValueError(f"selection cache holds top-k of shape {cache.top.shape}; expected (B, k) = {(batch, k)}")
    length_B, start_B = _rows(length, batch), _rows(start, batch)
    width = selection_width(n_init, k, n_local, capacity)
    selects = (length_B - start_B > width) & (width == n_init + k + n_local)
    reused = reuse_mask(cache, q_mean, length_B, n_local=n_local, threshold=threshold) & selects

    def fresh_top() -> jax.Array:
        candidates = candidate_mask(length_B, capacity, n_init, n_local, start=start_B)
        votes = soft_vote(criticality(q_mean, keys, length_B, start=start_B), candidates)
        return top_k_candidates(votes, candidates, k)

    if width < n_init + k + n_local:
        top = cache.top
    else:
        top = jax.lax.cond((selects & ~reused).any(), fresh_top, lambda: cache.top)
    top = jnp.where(reused[:, None], cache.top, top)
    refresh = selects & ~reused
    new_cache = SelectionCache(
        q_mean=jnp.where(refresh[:, None, None], q_mean.astype(jnp.float32), cache.q_mean),
        top=jnp.where(refresh[:, None], top, cache.top),
        filled=cache.filled | refresh,
    )
    indices, valid = assemble_selection(top, length_B, n_init, n_local, capacity, start=start_B)
    return indices, valid, new_cache, reused


def token_select_attention(
    q: Float[Array, "B T H D"],
    keys: Float[Array, "B K S D"],
    values: Float[Array, "B K S D"],
    length: Length,
    cache: SelectionCache,
    *,
    inv_freq: Float[Array, " F"],
    attention_factor: float | jax.Array = 1.0,
    n_init: int = DEFAULT_N_INIT,
    k: int = DEFAULT_TOP_K,
    n_local: int = DEFAULT_N_LOCAL,
    threshold: float = DEFAULT_THRESHOLD,
    start: Length | None = None,
    scale: float | None = None,
    num_valid: Int[Array, ""] | int | None = None,
) -> tuple[Float[Array, "B T H D"], SelectionCache, Bool[Array, " B"]]:
    """One layer's TokenSelect step for a chunk of ``T`` queries whose pre-RoPE K/V fill slots ``length − T …
    length − 1``: fingerprint (rotated at ``n_local + t``), cached selection, attention. Returns the output, the
    updated cache and which rows reused it. Pass ``threshold > 1`` to never reuse.

    A right-padded chunk (a prefill's last chunk at a static shape) passes ``num_valid``: its first ``num_valid``
    queries are real and fill slots ``length − num_valid …`` (``length`` counts real entries only); padded queries
    stay out of the fingerprint, and their outputs are meaningless."""
    q_len = q.shape[1]
    if q_len > n_local:
        raise ValueError(
            f"a chunk of T={q_len} tokens must fit in the local window n_local={n_local} (chunk <= n_local)"
        )
    real = q_len if num_valid is None else num_valid
    q_valid = None if num_valid is None else jnp.broadcast_to(jnp.arange(q_len) < num_valid, q.shape[:2])
    q_mean = query_fingerprint(
        q, inv_freq=inv_freq, attention_factor=attention_factor, position_offset=n_local, q_valid=q_valid
    )
    indices, valid, cache, reused = select_with_cache(
        q_mean, keys, length, cache, n_init=n_init, k=k, n_local=n_local, threshold=threshold, start=start
    )
    q_offset = _rows(length, q.shape[0]) - real
    out = selected_attention(
        q,
        keys,
        values,
        indices,
        valid,
        q_offset=q_offset,
        inv_freq=inv_freq,
        attention_factor=attention_factor,
        scale=scale,
    )
    return out, cache, reused
