"""Where a CPU prefill spends its time: one decoder layer of SmolLM2-135M, op by op, in lcm (XLA) and in torch.

    python benchmarks/prefill_breakdown.py [--lengths 2048,8192] [--tiles 256/256,256/512] [--cpu-tiles 64/64]
    lcm bench prefill-breakdown [same options]

For each length ``L`` it times, best of 3, the pieces of one layer over a whole ``L``-token prefill, with random
float32 weights of SmolLM2's shapes:

- attention: lcm's ``chunked_attention`` called as the Engine calls it (chunks of ``--chunk`` queries against a
  heads-major cache of capacity ``L``), for every ``q_block/kv_block`` tile in ``--tiles``; the CPU FFI kernel
  (:mod:`lcm.kernels.attention.cpu`) called the same way, for every tile in ``--cpu-tiles``; torch's
  ``scaled_dot_product_attention`` (causal, GQA) over the full sequence, as transformers runs it;
- projections: q, k, v and o as matmuls over all ``L`` tokens (XLA ``jnp.dot``, torch ``F.linear``);
- MLP: gate, up, SiLU-gated product and down;
- RMSNorm x2 + RoPE on q and k (elementwise).

Multiplied by the 30 layers this is a per-op profile of the whole prefill, which BENCHMARKS.md puts beside the
end-to-end numbers of ``cpu_inference.py``; the XLA timings of each op run inside one jitted program, as in the
model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lcm.cli import int_list

LAYERS, D, F, H, K, HD = 30, 576, 1536, 9, 3, 64


def _best(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def lcm_ops(
    length: int, chunk: int, tiles: list[tuple[int, int]], cpu_tiles: list[tuple[int, int]]
) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from lcm.kernels.attention import api
    from lcm.ops import masks
    from lcm.ops.attention import chunked_attention
    from lcm.ops.rope import rope_frequencies
    from lcm.ops.rotary import apply_rope

    rng = np.random.default_rng(0)

    def arr(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05)

    x, attn_out = arr(1, length, D), arr(1, length, H * HD)
    q, cache_k, cache_v = arr(1, length, H, HD), arr(1, K, length, HD), arr(1, K, length, HD)
    wq, wk, wv, wo = arr(D, H * HD), arr(D, K * HD), arr(D, K * HD), arr(H * HD, D)
    wg, wu, wd = arr(D, F), arr(D, F), arr(F, D)
    scale = arr(D)
    inv_freq, factor = rope_frequencies("default", HD, 1e5, {})
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    out: dict[str, float] = {}

    for q_block, kv_block in tiles:

        @jax.jit
        def attend(q_chunk: jax.Array, offset: jax.Array, q_block: int = q_block, kv_block: int = kv_block) -> Any:
            mask = masks.causal() & masks.offsets(q_offset=offset, kv_length=offset + chunk)
            return chunked_attention(q_chunk, cache_k, cache_v, mask=mask, q_block=q_block, kv_block=kv_block)

        def run_attention(attend: Callable[..., Any] = attend) -> None:
            outs = [attend(q[:, s : s + chunk], jnp.int32(s)) for s in range(0, length, chunk)]
            jax.block_until_ready(outs)

        out[f"attention XLA q{q_block}/kv{kv_block}"] = _best(run_attention)

    for q_block, kv_block in cpu_tiles:

        @jax.jit
        def kernel(q_chunk: jax.Array, offset: jax.Array, q_block: int = q_block, kv_block: int = kv_block) -> Any:
            mask = masks.causal() & masks.offsets(q_offset=offset, kv_length=offset + chunk)
            return api.attention(
                q_chunk,
                cache_k[None],
                cache_v[None],
                mask=mask,
                layer=0,
                config=api.CpuConfig(q_block=q_block, kv_block=kv_block),
                implementation="cpu",
            )

        def run_kernel(kernel: Callable[..., Any] = kernel) -> None:
            outs = [kernel(q[:, s : s + chunk], jnp.int32(s)) for s in range(0, length, chunk)]
            jax.block_until_ready(outs)

        out[f"attention CPU kernel q{q_block}/kv{kv_block}"] = _best(run_kernel)

    projections = jax.jit(lambda x, a: (x @ wq, x @ wk, x @ wv, a @ wo))
    out["q/k/v/o projections"] = _best(lambda: jax.block_until_ready(projections(x, attn_out)))
    mlp = jax.jit(lambda x: (jax.nn.silu(x @ wg) * (x @ wu)) @ wd)
    out["MLP"] = _best(lambda: jax.block_until_ready(mlp(x)))

    def elementwise(x: jax.Array, q: jax.Array) -> Any:
        def norm(v: jax.Array) -> jax.Array:
            return v * jax.lax.rsqrt(jnp.mean(v * v, -1, keepdims=True) + 1e-5) * scale

        k_rot = apply_rope(q[:, :, :K], positions, inv_freq, factor)
        return norm(x), norm(x + 1.0), apply_rope(q, positions, inv_freq, factor), k_rot

    elementwise = jax.jit(elementwise)
    out["RMSNorm x2 + RoPE"] = _best(lambda: jax.block_until_ready(elementwise(x, q)))
    return out


def torch_ops(length: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as fn

    torch.manual_seed(0)
    x, attn_out = torch.randn(1, length, D) * 0.05, torch.randn(1, length, H * HD) * 0.05
    q = torch.randn(1, H, length, HD)
    k, v = torch.randn(1, K, length, HD), torch.randn(1, K, length, HD)
    wq, wk, wv, wo = (torch.randn(o, i) * 0.05 for o, i in ((H * HD, D), (K * HD, D), (K * HD, D), (D, H * HD)))
    wg, wu, wd = torch.randn(F, D) * 0.05, torch.randn(F, D) * 0.05, torch.randn(D, F) * 0.05
    scale = torch.randn(D)
    cos, sin = torch.randn(1, length, HD), torch.randn(1, length, HD)
    out: dict[str, float] = {}
    with torch.inference_mode():
        out["attention (SDPA)"] = _best(
            lambda: fn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        )
        out["q/k/v/o projections"] = _best(
            lambda: (fn.linear(x, wq), fn.linear(x, wk), fn.linear(x, wv), fn.linear(attn_out, wo))
        )
        out["MLP"] = _best(lambda: fn.linear(fn.silu(fn.linear(x, wg)) * fn.linear(x, wu), wd))

        def rotate_half(t: torch.Tensor) -> torch.Tensor:
            return torch.cat((-t[..., HD // 2 :], t[..., : HD // 2]), dim=-1)

        def elementwise() -> Any:
            def norm(t: torch.Tensor) -> torch.Tensor:
                return scale * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5))

            qr = q * cos[:, None] + rotate_half(q) * sin[:, None]  # transformers' apply_rotary_pos_emb
            kr = k * cos[:, None] + rotate_half(k) * sin[:, None]
            return norm(x), norm(x + 1.0), qr, kr

        out["RMSNorm x2 + RoPE"] = _best(elementwise)
    return out


def table(length: int, lcm: dict[str, float], hf: dict[str, float]) -> str:
    lines = [
        f"| L = {length}: op, whole prefill (x{LAYERS} layers) | lcm / XLA s | torch s | lcm / torch |",
        "|---|---|---|---|",
    ]
    for name, seconds in lcm.items():
        torch_name = "attention (SDPA)" if name.startswith("attention") else name
        ref = hf.get(torch_name)
        ratio = f"{seconds / ref:.2f}" if ref else "—"
        ref_text = f"{LAYERS * ref:.2f}" if ref else "—"
        lines.append(f"| {name} | {LAYERS * seconds:.2f} | {ref_text} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcm bench prefill-breakdown", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int_list, default="2048,8192")
    parser.add_argument("--tiles", default="256/256,256/512", help="XLA path's q_block/kv_block tiles")
    parser.add_argument("--cpu-tiles", default="64/64,32/128,64/128", help="CPU kernel's tiles ('' for none)")
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args(argv)

    def pairs(text: str) -> list[tuple[int, int]]:
        return [tuple(int(n) for n in t.split("/")) for t in text.split(",") if t]  # type: ignore[misc]

    try:
        tiles, cpu_tiles = pairs(args.tiles), pairs(args.cpu_tiles)
    except ValueError:
        parser.error(f"--tiles/--cpu-tiles take Q/KV pairs; got {args.tiles!r}, {args.cpu_tiles!r}")
    for length in args.lengths:
        if length % args.chunk:
            parser.error(f"length {length} is not a multiple of --chunk={args.chunk}")
        lcm = lcm_ops(length, args.chunk, tiles, cpu_tiles)
        hf = torch_ops(length)
        print(table(length, lcm, hf) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
