"""Chunked prefill, greedy decoding and per-token NLL over the model's explicit KV cache.

Every jitted program (:mod:`lcm.steps`) takes the model as ``(graphdef, params)`` with ``graphdef`` static, so
one compiled program serves every prompt of the same (chunk, capacity) shape: prompts are processed in fixed chunks of
``chunk_size`` tokens (the last one right-padded, ``num_valid`` saying how many are real) and the cache capacity is
rounded up to a multiple of the chunk. Decoding compiles one step per capacity and is reused token after token;
the cache is donated so XLA updates it in place. Attention memory is ``O(chunk x capacity)``, never
``O(context^2)``.

The capacity is the bucket: an eval compiles at most three programs (prefill, NLL, decode) per distinct capacity,
i.e. per distinct ``ceil((prompt + new tokens) / chunk_size)``, and RoPE variant; ``lcm`` reports the count of
each run (:class:`lcm.io.compile_cache.CompileStats`). Inside a step nothing is spent on the empty tail of the
cache: attention visits only the key blocks below the filled length (see :mod:`lcm.ops.attention`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm import steps
from lcm.cache.kv import KVCache
from lcm.cache.policies import ChunkDone, KVPolicy
from lcm.models.families import Model


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class Engine:
    """A model ready for inference: split once, jitted functions cached per shape.

    ``chunk_size`` is the prefill chunk (and the granularity of cache capacities); ``keys_pre_rope`` stores
    keys unrotated in the cache. ``policy`` (:mod:`lcm.cache.policies`) decides what the cache keeps, through
    hooks the Engine calls and never branches around: each layer's state and in-layer hooks
    (:meth:`KVPolicy.init_layer`, :meth:`KVPolicy.layer_hooks`), the slots a prompt needs
    (:meth:`KVPolicy.prompt_capacity`), the positions entries get (:meth:`KVPolicy.first_position`), what happens
    after each prefill chunk (:meth:`KVPolicy.after_chunk`: compress, probe). After the prompt every layer's
    buffer is cut to what it holds plus the tokens to generate.

    ``reuse_prefix``: :meth:`generate` keeps its final cache, and a next prompt of the same shape that begins with
    the same whole chunks (the passkey trials of one length share everything before their needles) starts its
    prefill after them instead of recomputing them. Under the full cache this changes no bit of the result: the
    keys and values of a chunk depend only on the tokens up to it, and the reused chunks were computed by the same
    program from the same inputs. Off by default, since it makes ``last_prefill_seconds`` the time of the chunks
    actually run and keeps the last cache alive between calls; policies other than ``full`` never reuse.
    """

    model: Model
    chunk_size: int = 512
    keys_pre_rope: bool = False
    policy: KVPolicy = dataclasses.field(default_factory=KVPolicy)
    reuse_prefix: bool = False
    decode_block: int = 32  # greedy steps per on-device loop between host checks (lcm.steps.decode_block)

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size={self.chunk_size} must be positive")
        if self.decode_block <= 0:
            raise ValueError(f"decode_block={self.decode_block} must be positive")
        limit = self.policy.max_prefill_chunk()
        if limit is not None:  # the policy caps the chunk (a local window)
            self.chunk_size = min(self.chunk_size, limit)
        self.graphdef, self.params = nnx.split(self.model)
        self.config = self.model.config
        self.policy.check_model(self.model)
        # a position scheme rotates each key per part of its attention: keys are stored before RoPE
        scheme = getattr(self.config, "position_scheme", None)
        self.keys_pre_rope = self.policy.stores_keys_pre_rope(self.keys_pre_rope or scheme is not None)
        # what the last generate() measured: its prompt cache at its largest, prefill and decode wall time
        self.last_cache_bytes, self.last_decode_steps = 0, 0
        self.last_prefill_seconds = self.last_decode_seconds = 0.0
        self.last_reused_tokens = 0  # prompt tokens the last generate() took from the previous one's cache
        self._previous: tuple[np.ndarray, KVCache] | None = None  # (prompt, final cache) kept by reuse_prefix

    def prompt_capacity(self, length: int, question: int = 0) -> int:
        """Cache slots the prefill of ``length`` tokens needs under the policy, before any generated token
        (:meth:`KVPolicy.prompt_capacity`: a streaming policy's is bounded whatever the prompt's length); the last
        ``question`` of them appended after the context uncompressed (:meth:`prefill`)."""
        if not 0 <= question < length:
            raise ValueError(f"question={question} must be a number of tokens in [0, {length}) (the prompt's)")
        context = self.policy.prompt_capacity(length - question, self.chunk_size)
        return context + _round_up(question, self.chunk_size)

    def _check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty [batch, length] array, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got [{tokens.min()}, {tokens.max()}]"
            )
        return tokens.astype(np.int32)

    def new_cache(self, batch: int, capacity: int, starts: np.ndarray | None = None) -> KVCache:
        """An empty cache of ``capacity`` (rounded up to a chunk) slots; ``starts [B]`` for left-padded rows."""
        cache = self.model.init_cache(batch, _round_up(capacity, self.chunk_size), self.keys_pre_rope)
        cfg = self.config  # each layer's state holds what the policy keeps beside the entries
        layers = tuple(
            self.policy.init_layer(layer, cfg.num_heads, cfg.head_dim) if layer.takes_policy else layer
            for layer in cache.layers
        )
        cache = dataclasses.replace(cache, layers=layers, hooks=self.policy.layer_hooks())
        if starts is not None:
            starts = np.asarray(starts, np.int32)
            if starts.shape != (batch,) or starts.min() < 0:
                raise ValueError(f"starts must be {batch} non-negative slots, got {starts.tolist()}")
            cache = dataclasses.replace(cache, starts=jnp.asarray(starts))
        return cache

    def _chunks(self, length: int, split: int | None = None) -> list[tuple[int, int]]:
        """``(start, n)`` of each chunk of ``length`` tokens; with ``split``, chunks end there and start anew."""
        split = length if split is None else split
        head = [(s, min(self.chunk_size, split - s)) for s in range(0, split, self.chunk_size)]
        return head + [(s, min(self.chunk_size, length - s)) for s in range(split, length, self.chunk_size)]

    def _pad(self, rows: np.ndarray, start: int, n: int) -> np.ndarray:
        """Columns ``start…start+n`` of ``rows``, right-padded with zeros to one chunk."""
        chunk = np.zeros((rows.shape[0], self.chunk_size), np.int32)
        chunk[:, :n] = rows[:, start : start + n]
        return chunk

    def _positions(self, cache: KVCache, first: int, size: int) -> np.ndarray:
        """RoPE positions ``[B, size]`` of tokens from position ``first`` on, less each row's left padding (clipped
        at 0: a padding slot takes position 0)."""
        positions = np.broadcast_to(np.arange(first, first + size, dtype=np.int32), (cache.batch, size))
        if cache.starts is None:
            return positions
        return np.maximum(positions - np.asarray(cache.starts)[:, None], 0)

    def prefill(
        self, tokens: np.ndarray, cache: KVCache, start: int = 0, question: int = 0
    ) -> tuple[jax.Array, KVCache]:
        """Feed ``tokens [B, T]`` (positions ``0…T-1``) chunk by chunk; logits ``[B, V]`` at the last one.

        After each chunk the policy decides what happens to the cache (:meth:`KVPolicy.after_chunk`: a bounded
        policy compresses it to its budget after every chunk or after the last); tokens take the positions the
        policy gives them (:meth:`KVPolicy.first_position`). ``start`` (a multiple of ``chunk_size``, a policy that
        keeps everything) skips the chunks before it: ``cache`` must already hold the first ``start`` tokens, as a
        cache of the same prompt (prefix) does.

        ``question``: the last ``question`` tokens are a question appended to the compressed context, as kvpress
        does: the policy compresses the first ``T - question`` tokens as if they were the whole prompt
        (query-agnostic: its observers are the context's), and the question is fed after the last compression and
        never evicted. ``0`` (the default) compresses the question with the context.
        """
        tokens = self._check_tokens(tokens)
        batch, length = tokens.shape
        policy = self.policy
        context = length - question
        if start and (start % self.chunk_size or not 0 < start < length or not self._reusable(cache.starts)):
            raise ValueError(
                f"prefill start={start} must be a multiple of chunk_size={self.chunk_size} below the prompt's "
                f"{length} tokens, on an unpadded cache under the full-cache policy (got policy {policy.name!r})"
            )
        if start and int(cache.length) != start:
            raise ValueError(f"prefill start={start} needs a cache holding exactly {start} tokens, got {cache.length}")
        needed = _round_up(self.prompt_capacity(length, question), self.chunk_size)
        if needed > min(cache.capacities):
            raise ValueError(
                f"a prompt of {length} tokens in chunks of {self.chunk_size} needs a cache capacity of at least "
                f"{needed}, got {min(cache.capacities)} (use Engine.new_cache)"
            )
        if cache.starts is not None and not policy.accepts_padded_rows():
            raise ValueError(f"KV policy {policy.name!r} works on unpadded rows; batch prompts of equal length")
        # one scale for the whole prompt, as a single transformers forward (a policy may bound it)
        rope_seq_len = jnp.int32(policy.rope_length(length, needed))
        ops = _PrefillOps(self, rope_seq_len)
        filled = int(cache.length)
        logits = np.zeros((batch, self.config.vocab_size), np.float32)  # what "predicts" the first chunk's first token
        evict_end = policy.evictable(context)  # the tokens after it are fed after the last compression
        skip = start
        for start, n in self._chunks(length, evict_end):
            if start < skip:  # already in the cache (reuse_prefix)
                continue
            chunk = self._pad(tokens, start, n)
            positions = self._positions(cache, policy.first_position(start, filled), self.chunk_size)
            observers = None  # the queries the policy's layer hooks record from
            slots = np.arange(start, start + self.chunk_size)
            # real context tokens only (not in place: the policy's array): no compression follows the question's
            watch = policy.observers(slots, context) & (slots < min(start + n, context))
            if watch.any():  # else the chunk records nothing: skip it
                observers = jnp.asarray(np.broadcast_to(watch, chunk.shape))
            logits, cache = steps.prefill_chunk(
                self.graphdef,
                self.params,
                chunk,
                positions,
                jnp.int32(n),
                rope_seq_len,
                cache,
                observers,
                logits,
            )
            seen = start + n
            done = ChunkDone(filled + n, seen, seen == evict_end, seen > evict_end, len(cache.layers))
            cache, filled = policy.after_chunk(cache, done, ops)
        return logits, cache

    def generate(
        self,
        tokens: np.ndarray,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        question: np.ndarray | None = None,
    ) -> np.ndarray:
        """Greedy continuation ``[B, <= max_new_tokens]`` of equal-length prompts ``[B, T]``.

        Decoding stops early once every row has produced a token in ``stop_ids`` (the stop token is kept).
        With ``question [B, Q]`` the prompt is ``tokens`` (the context) followed by the question, and the policy
        compresses the context alone, the question appended uncompressed (kvpress's ``question=``; see
        :meth:`prefill`); without, a question inside ``tokens`` is compressed with the context.
        """
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
        tokens = self._check_tokens(tokens)
        if question is None:
            return self._complete(tokens, None, max_new_tokens, stop_ids)
        question = self._check_tokens(question)
        if question.shape[0] != tokens.shape[0]:
            raise ValueError(f"question has {question.shape[0]} rows for {tokens.shape[0]} prompts; give one per row")
        prompt = np.concatenate([tokens, question], axis=1)
        return self._complete(prompt, None, max_new_tokens, stop_ids, question=question.shape[1])

    def _complete(
        self,
        tokens: np.ndarray,
        starts: np.ndarray | None,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        question: int = 0,
    ) -> np.ndarray:
        """Prefill into a fresh cache sized for the policy (or the previous prompt's, :attr:`reuse_prefix`),
        shrink it to what is kept, decode greedily."""
        batch, length = tokens.shape
        started = time.perf_counter()
        capacity = self.prompt_capacity(length, question) + max_new_tokens
        previous, self._previous = self._previous, None  # dropped before a new cache is made: one alive at a time
        reused = self._shared_chunks(previous, tokens, capacity) if self.reuse_prefix and self._reusable(starts) else 0
        if reused:
            cache = previous[1].replace_layers(length=jnp.int32(reused))
        else:
            del previous
            cache = self.new_cache(batch, capacity, starts)
        self.last_reused_tokens = reused
        logits, cache = self.prefill(tokens, cache, start=reused, question=question)
        jax.block_until_ready(logits)
        self.last_prefill_seconds = time.perf_counter() - started
        self.last_cache_bytes = cache.num_bytes  # the prompt's cache at its largest, for memory reports
        cache = self.fit(cache, max_new_tokens)
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        position = self.policy.first_position(length, int(cache.layers[0].length))
        started = time.perf_counter()
        out, cache = self.decode(first, position, cache, max_new_tokens, stop_ids)
        self.last_decode_seconds, self.last_decode_steps = time.perf_counter() - started, out.shape[1] - 1
        if self.reuse_prefix and self._reusable(starts):
            self._previous = (tokens.copy(), cache)
        return out

    def fit(self, cache: KVCache, max_new_tokens: int) -> KVCache:
        """The cache after a prompt with each layer's buffer cut to what decoding ``max_new_tokens`` needs
        (:meth:`KVPolicy.decode_capacity` of what it holds, rounded up to a chunk): after eviction, or under
        per-layer budgets, layers then hold buffers of their own capacities."""
        held = [int(n) for n in jax.device_get([layer.length for layer in cache.layers])]
        needed = [_round_up(self.policy.decode_capacity(n, max_new_tokens), self.chunk_size) for n in held]
        capacities = tuple(map(min, needed, cache.capacities))
        return cache if capacities == cache.capacities else steps.shrink_cache(cache, capacities)

    def _reusable(self, starts: np.ndarray | jax.Array | None) -> bool:
        """Whether a cache's prefix can serve another prompt: unpadded rows, a policy that keeps every entry as
        computed (:meth:`KVPolicy.keeps_everything`)."""
        return starts is None and self.policy.keeps_everything()

    def _shared_chunks(self, previous: tuple[np.ndarray, KVCache] | None, tokens: np.ndarray, capacity: int) -> int:
        """Prompt tokens that ``previous`` (prompt, cache) already holds for ``tokens``: its whole chunks in common,
        short of the last chunk (which yields the logits); 0 unless shapes, hence capacity and RoPE length, agree."""
        if previous is None:
            return 0
        old, cache = previous
        if not cache.rewindable or old.shape != tokens.shape or cache.capacity != _round_up(capacity, self.chunk_size):
            return 0
        differs = np.flatnonzero((old != tokens).any(axis=0))
        common = int(differs[0]) if differs.size else tokens.shape[1]
        return min(common, tokens.shape[1] - 1) // self.chunk_size * self.chunk_size

    def generate_many(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        batch_size: int = 1,
        progress: Callable[[int], None] | None = None,
    ) -> list[np.ndarray]:
        """Greedy continuations of prompts of any lengths, ``batch_size`` rows per prefill and decode.

        Prompts are taken in order of length, so a batch is padded little, and left-padded to the batch's
        longest (:meth:`left_pad`); the last batch is filled up with copies of its last prompt, so every batch
        has the same shape and reuses the compiled programs of its capacity. Each continuation is cut after its
        first stop token. Padding changes no result: a padded row computes what it computes alone (up to
        float summation order), except under length-dependent RoPE (dynamic NTK, LongRoPE), where every row is
        scaled for the batch's longest prompt, as transformers does in a batch. ``progress(n)`` is called with
        the number of prompts finished after each batch.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not prompts:
            return []
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        stops = set(stop_ids)
        outputs: list[np.ndarray | None] = [None] * len(prompts)
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            batch = [prompts[i] for i in rows] + [prompts[rows[-1]]] * (batch_size - len(rows))
            tokens, starts = self.left_pad(batch)
            out = self._complete(tokens, starts if starts.any() else None, max_new_tokens, stop_ids)
            for row, index in enumerate(rows):
                ids = out[row]
                hits = [k for k, t in enumerate(ids.tolist()) if t in stops]
                outputs[index] = ids[: hits[0] + 1] if hits else ids
            if progress is not None:
                progress(len(rows))
        return [o for o in outputs if o is not None]

    def left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``tokens [B, T]``, each prompt right-aligned after padding id 0, and ``starts [B]``: its first slot."""
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"every prompt needs at least one token, got lengths {lengths}")
        longest = max(lengths)
        tokens = np.zeros((len(prompts), longest), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt) :] = np.asarray(prompt, np.int32)
        return tokens, longest - np.asarray(lengths, np.int32)

    def decode(
        self, first: jax.Array, position: int, cache: KVCache, max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> tuple[np.ndarray, KVCache]:
        """Greedy tokens ``[B, <= max_new_tokens]`` starting with ``first [B]``, whose RoPE position is ``position``.

        ``first`` goes into the cache's next slot (``cache.length``); its position is ``position``, less the row's
        padding for a left-padded cache (``cache.starts``), and the next tokens count on from there.

        Steps run on the device in blocks of :attr:`decode_block` (:func:`lcm.steps.decode_block`, a
        ``lax.while_loop`` with the stop test inside): one compiled program per cache capacity, and one host
        transfer per block, not per token. Decoding stops once every row has produced a token in ``stop_ids``.
        """
        batch = first.shape[0]
        slots = jax.device_get([layer.length for layer in cache.layers])
        for index, (slot, capacity) in enumerate(zip(slots, cache.capacities, strict=True)):
            needed = self.policy.decode_capacity(int(slot), max_new_tokens - 1)
            if needed > capacity:
                raise ValueError(
                    f"decoding {max_new_tokens} tokens after {slot} cached ones needs a cache capacity of at least "
                    f"{needed}, got {capacity} (layer {index})"
                )
        # host-side bookkeeping in numpy: an eager jnp op would compile a small program of its own
        stops = np.asarray(list(stop_ids), np.int32).reshape(-1)
        token = np.asarray(first)
        out = [token[:, None]]
        done = np.isin(token, stops)
        # a host copy: the cache (its `starts` included) is donated to the step
        offsets = np.zeros((batch,), np.int32) if cache.starts is None else np.asarray(cache.starts)
        positions = np.asarray(position - offsets, np.int32)
        remaining = max_new_tokens - 1
        while remaining > 0 and not done.all():
            steps_now = min(self.decode_block, remaining)
            tokens, count, cache, done_B = steps.decode_block(
                self.graphdef,
                self.params,
                token,
                positions,
                cache,
                self.decode_block,
                np.int32(steps_now),
                stops,
                done,
            )
            count = int(count)  # the host transfers of the block: its count, tokens and stop flags
            block = np.asarray(tokens)[:, :count]
            out.append(block)
            token, done = block[:, -1].copy(), np.asarray(done_B)
            positions, remaining = positions + np.int32(count), remaining - count
        return np.concatenate(out, axis=1), cache

    def token_nlls(self, tokens: np.ndarray) -> np.ndarray:
        """``[B, T-1]`` negative log-likelihoods of tokens ``1…T-1`` given their prefixes (one causal pass)."""
        tokens = self._check_tokens(tokens)
        batch, length = tokens.shape
        if length < 2:
            raise ValueError(f"need at least 2 tokens for a next-token NLL, got {length}")
        if not self.policy.keeps_everything():
            raise ValueError(f"token_nlls runs the full cache; got KV policy {self.policy.name!r} (use policy=full)")
        cache = self.new_cache(batch, length)
        rope_seq_len = jnp.int32(length)
        targets_all = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
        nlls = []
        for start, n in self._chunks(length):
            chunk, targets = self._pad(tokens, start, n), self._pad(targets_all, start, n)
            positions = self._positions(cache, start, self.chunk_size)
            nll, cache = steps.nll_chunk(
                self.graphdef, self.params, chunk, targets, positions, jnp.int32(n), rope_seq_len, cache
            )
            nlls.append(np.asarray(nll[:, :n]))
        return np.concatenate(nlls, axis=1)[:, : length - 1]

    def with_model(self, model: Model) -> Engine:
        return Engine(
            model,
            chunk_size=self.chunk_size,
            keys_pre_rope=self.keys_pre_rope,
            policy=self.policy,
            decode_block=self.decode_block,
        )


@dataclasses.dataclass(frozen=True)
class _PrefillOps:
    """The jitted programs a policy's :meth:`KVPolicy.after_chunk` runs (:class:`lcm.cache.policies.CacheOps`)."""

    engine: Engine
    rope_seq_len: jax.Array

    def compress(self, policy: KVPolicy, cache: KVCache, prompt_seen: int, final: bool) -> KVCache:
        return steps.compress_cache(policy, cache, jnp.int32(prompt_seen), final)

    def probe(self, cache: KVCache, tokens: tuple[int, ...], first_position: int) -> KVCache:
        engine = self.engine
        ids = np.asarray(tokens, np.int32)
        rows = engine._check_tokens(np.broadcast_to(ids, (cache.batch, ids.size)))
        positions = engine._positions(cache, first_position, ids.size)
        return steps.probe_chunk(engine.graphdef, engine.params, rows, positions, self.rope_seq_len, cache)
