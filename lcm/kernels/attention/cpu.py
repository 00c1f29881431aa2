"""The CPU attention kernel: ``cpu_flash.cc`` behind an XLA FFI custom call, built on first use.

Why a hand-written kernel: XLA's CPU backend runs the flash loop of :func:`lcm.ops.attention.chunked_attention`
as separate loops per op (row max, exp + sum, rescale, each matmul split across threads), so the score tile leaves
the cache between them and every op synchronises the thread pool; BENCHMARKS.md measured that path at ~60% of the
rate of torch's CPU flash kernel. ``cpu_flash.cc`` does what torch does: one task per (batch row, KV head, query
tile) on XLA's intra-op thread pool, a register-blocked Q·Kᵀ micro-kernel, the softmax in one sweep over the tile
while it is in cache, and a P·V micro-kernel (AVX2 + FMA).

Forward only; the VJP recomputes through the XLA path (training does not run on this kernel). It declines
(``NotImplementedError``, so :mod:`lcm.kernels.attention.api` falls through to the next implementation) whenever
it does not apply: a backend other than the CPU, a dtype other than float32, document masks (it takes left
padding, ``kv_start``), a head dim that is not a multiple of 16, or no C++ compiler / no AVX2 on this machine (a
one-time warning says why). Decode steps (one query per sequence, so one tile per KV head: fewer tasks than
threads) split the keys across tasks and merge the partial softmaxes at the end (split-K, as FlashDecoding does on
GPUs).

The shared library is compiled with ``$CXX`` (default ``g++``) and ``-march=native`` into
``$LCM_KERNEL_CACHE`` (default ``~/.cache/lcm/kernels``), named by a hash of the source, the flags, the compiler
and jaxlib's version, so it is built once per machine and rebuilt when any of them changes. Like XLA's own
compilation cache, this is the only file the kernel writes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lcm.ops.attention import chunked_attention, stacked_cache
from lcm.ops.masks import check_kv_start

SOURCE = Path(__file__).with_name("cpu_flash.cc")
TARGET = "lcm_cpu_flash_attention"
Q_BLOCK = 64  # queries per task: with 3 grouped heads a 192 x 64 score tile (BENCHMARKS.md)
LONG_Q_BLOCK = 128  # queries per task in a call that sees LONG_KEYS keys or more: fewer passes over them
LONG_KEYS = 8192  # (BENCHMARKS.md: 128-query tiles are 16% faster over a 16k prefill, a tie at 8k, slower at 2k)
KV_BLOCK = 64  # keys per inner step
MIN_SPLIT_KEYS = 256  # split-K (decode): the fewest keys per split; shorter splits cost more to set up than they save
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def kernel_cache_dir() -> Path:
    default = Path(os.environ.get("LCM_CACHE_DIR", Path.home() / ".cache" / "lcm")) / "kernels"
    return Path(os.environ.get("LCM_KERNEL_CACHE", str(default)))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build_library(directory: Path | None = None) -> Path:
    """Compile ``cpu_flash.cc`` (once per source, flags, compiler and jaxlib) and return the library's path.

    Raises ``RuntimeError`` naming the reason when there is no compiler or the build fails.
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler: {os.environ.get('CXX', 'g++')!r} is not on PATH (set $CXX)")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the kernel needs x86-64 with AVX2, this machine is {platform.machine()!r}")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = "\0".join([SOURCE.read_text(), " ".join(_FLAGS), version, jax.lib.__version__, platform.node()])
    name = f"cpu_flash-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    directory = kernel_cache_dir() if directory is None else Path(directory)
    path = directory / name
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        out = Path(tmp) / name
        command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed: {result.stderr.strip()[-400:]}")
        os.replace(out, path)  # atomic: concurrent builders leave one complete file
    return path


@functools.cache
def _registered() -> str | None:
    """Build, load and register the custom call once per process; the reason it is unavailable, or None."""
    try:
        import ctypes

        library = ctypes.cdll.LoadLibrary(str(build_library()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.LcmCpuFlashForward), platform="cpu")
    except (RuntimeError, OSError) as error:
        warnings.warn(f"CPU attention kernel unavailable, using the XLA path: {error}", stacklevel=3)
        return str(error)
    return None


def available() -> bool:
    """Can this process run the kernel (CPU backend, compiler, AVX2)? Builds it on the first call."""
    return jax.default_backend() == "cpu" and _registered() is None


class Tiles(NamedTuple):
    """The kernel's tiling of one call (static, hashable)."""

    q_block: int = Q_BLOCK
    long_q_block: int = LONG_Q_BLOCK
    long_keys: int = LONG_KEYS
    kv_block: int = KV_BLOCK
    min_split_keys: int = MIN_SPLIT_KEYS


def flash_call(target, q, k, v, layer, q_offset, kv_length, kv_start, *, window, sinks, scale, tiles: Tiles):
    """The FFI call of the kernel registered as ``target`` (``benchmarks/kernel_ab.py`` registers edited builds)."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(
        q,
        k,
        v,
        layer,
        q_offset,
        kv_length,
        kv_start,
        window=np.int64(-1 if window is None else window),
        sinks=np.int64(sinks),
        q_tile=np.int64(tiles.q_block),
        long_q_tile=np.int64(tiles.long_q_block),
        long_keys=np.int64(tiles.long_keys),
        kv_block=np.int64(tiles.kv_block),
        min_split_keys=np.int64(tiles.min_split_keys),
        scale=np.float32(scale),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, layer, q_offset, kv_length, kv_start, window, sinks, scale, tiles, xla_kwargs):
    return flash_call(
        TARGET, q, k, v, layer, q_offset, kv_length, kv_start, window=window, sinks=sinks, scale=scale, tiles=tiles
    )


def _flash_fwd(q, k, v, layer, q_offset, kv_length, kv_start, *static):
    residuals = (q, k, v, layer, q_offset, kv_length, kv_start)
    return _flash(*residuals, *static), residuals


def _flash_bwd(window, sinks, scale, tiles, xla_kwargs, residuals, d_out):
    """The XLA path's FlashAttention-2 backward (it recomputes the forward's statistics)."""
    q, k, v, layer, q_offset, kv_length, kv_start = residuals

    def xla(q, k, v):
        return chunked_attention(
            q,
            k,
            v,
            q_offset=q_offset,
            kv_length=kv_length,
            kv_start=kv_start,
            window=window,
            sinks=sinks,
            scale=scale,
            heads_first=True,
            layer=layer,
            **dict(xla_kwargs),
        )

    _, vjp = jax.vjp(xla, q, k, v)
    dq, dk, dv = vjp(d_out)
    zero = np.zeros((), jax.dtypes.float0)
    return dq, dk, dv, zero, zero, zero, np.zeros(kv_start.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def cpu_flash_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    *,
    q_offset: Int[Array, ""] | int = 0,
    kv_length: Int[Array, ""] | int | None = None,
    window: int | None = None,
    sinks: int = 0,
    q_segments: Int[Array, "B T"] | None = None,
    k_segments: Int[Array, "B S"] | None = None,
    kv_start: Int[Array, " B"] | None = None,
    scale: float | None = None,
    q_block: int = 256,
    kv_block: int = 256,
    heads_first: bool = False,
    layer: Int[Array, ""] | int | None = None,
    cpu_q_block: int = Q_BLOCK,
    cpu_kv_block: int = KV_BLOCK,
    cpu_min_split_keys: int = MIN_SPLIT_KEYS,
    cpu_long_q_block: int = LONG_Q_BLOCK,
    cpu_long_keys: int = LONG_KEYS,
) -> Float[Array, "B T H D"]:
    """:func:`lcm.ops.attention.chunked_attention` (same arguments, same result to float32 rounding) on the CPU
    kernel. ``q_block``/``kv_block`` are the XLA path's tiles, used only by the backward; the kernel tiles with
    ``cpu_q_block`` queries x ``cpu_kv_block`` keys, or ``cpu_long_q_block`` queries in a call that sees at least
    ``cpu_long_keys`` keys (0: never); when there are fewer tiles than twice the threads (decode steps), keys are
    split across tasks, at least ``cpu_min_split_keys`` per split (0: never split). Raises
    ``NotImplementedError`` where the module docstring says it declines."""
    head_dim = q.shape[3]
    if q_segments is not None or k_segments is not None:
        raise NotImplementedError("the CPU kernel has no document masks")
    if q.dtype != jnp.float32 or k.dtype != jnp.float32 or v.dtype != jnp.float32:
        raise NotImplementedError(f"the CPU kernel is float32 only, got {q.dtype}/{k.dtype}/{v.dtype}")
    if head_dim % 16:
        raise NotImplementedError(f"the CPU kernel needs head_dim % 16 == 0, got {head_dim}")
    if cpu_kv_block <= 0 or cpu_kv_block % 16 or min(cpu_q_block, cpu_long_q_block) <= 0:
        raise ValueError(
            f"cpu_kv_block={cpu_kv_block} must be a multiple of 16, cpu_q_block={cpu_q_block} and "
            f"cpu_long_q_block={cpu_long_q_block} >= 1"
        )
    if cpu_min_split_keys < 0 or cpu_long_keys < 0:
        raise ValueError(f"cpu_min_split_keys={cpu_min_split_keys} and cpu_long_keys={cpu_long_keys} must be >= 0")
    if not available():
        raise NotImplementedError("the CPU kernel is not available here (see the warning)")
    k, v, layer = stacked_cache(q, k, v, heads_first=heads_first, layer=layer, sinks=sinks)
    cap = k.shape[3]
    if kv_start is None:
        kv_start = jnp.zeros((q.shape[0],), jnp.int32)
    check_kv_start(kv_start, q.shape[0])
    kv_length = jnp.asarray(cap if kv_length is None else kv_length, jnp.int32)
    scale = head_dim**-0.5 if scale is None else float(scale)
    xla_kwargs = (("q_block", q_block), ("kv_block", kv_block))
    return _flash(
        q,
        k,
        v,
        jnp.asarray(layer, jnp.int32),
        jnp.asarray(q_offset, jnp.int32),
        kv_length,
        kv_start.astype(jnp.int32),
        window,
        sinks,
        scale,
        Tiles(cpu_q_block, cpu_long_q_block, cpu_long_keys, cpu_kv_block, cpu_min_split_keys),
        xla_kwargs,
    )
