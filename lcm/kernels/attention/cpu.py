"""The CPU attention kernel: ``cpu_flash.cc`` behind an XLA FFI custom call, built on first use.

Why a hand-written kernel: XLA's CPU backend runs the flash loop of :func:`lcm.ops.attention.chunked_attention`
as separate loops per op (row max, exp + sum, rescale, each matmul split across threads), so the score tile leaves
the cache between them and every op synchronises the thread pool; BENCHMARKS.md measured that path at ~60% of the
rate of torch's CPU flash kernel. ``cpu_flash.cc`` does what torch does: one task per (batch row, KV head, query
tile) on XLA's intra-op thread pool, a register-blocked Q·Kᵀ micro-kernel, the softmax in one sweep over the tile
while it is in cache, and a P·V micro-kernel (AVX2 + FMA).

Forward only; the VJP recomputes through the XLA path (training does not run on this kernel). It reads the
:class:`lcm.ops.masks.Mask` fields it implements (causal, ``q_offset``, ``kv_length``, ``window``, ``sinks``,
``kv_start``) and declines (``NotImplementedError`` with the reason, so :mod:`lcm.kernels.attention.api` falls
through to the next implementation) whenever it does not apply: a backend other than the CPU, a dtype other than
float32, any other mask term (documents, prefix, bidirectional, block-sparse, a key offset), a log-sum-exp asked
for, a head dim that is not a multiple of 16, or no C++ compiler / no AVX2 on this machine (a one-time warning
says why). Decode steps (one query per sequence, so one tile per KV head: fewer tasks than
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

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lcm.kernels.attention.config import CpuConfig, XlaConfig, pick
from lcm.ops import masks
from lcm.ops.attention import as_arrays, chunked_attention
from lcm.ops.masks import Mask

SOURCE = Path(__file__).with_name("cpu_flash.cc")
TARGET = "lcm_cpu_flash_attention"
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


def flash_call(target, q, k, v, q_offset, kv_length, kv_start, *, window, sinks, scale, tiles: CpuConfig):
    """The FFI call of the kernel registered as ``target`` (``benchmarks/kernel_ab.py`` registers edited builds),
    tiled as ``tiles`` says (its tuned defaults: :class:`lcm.kernels.attention.config.CpuConfig`)."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(
        q,
        k,
        v,
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q, k, v, q_offset, kv_length, kv_start, window, sinks, scale, tiles, xla_config):
    return flash_call(
        TARGET,
        q,
        k,
        v,
        q_offset,
        kv_length,
        kv_start,
        window=window,
        sinks=sinks,
        scale=scale,
        tiles=tiles,
    )


def _flash_fwd(q, k, v, q_offset, kv_length, kv_start, *static):
    residuals = (q, k, v, q_offset, kv_length, kv_start)
    return _flash(*residuals, *static), residuals


def _flash_bwd(window, sinks, scale, tiles, xla_config, residuals, d_out):
    """The XLA path's FlashAttention-2 backward (it recomputes the forward's statistics)."""
    q, k, v, q_offset, kv_length, kv_start = residuals
    mask = masks.causal() & masks.offsets(q_offset, kv_length) & masks.left_padding(kv_start)
    if window is not None:
        mask &= masks.sliding_window(window, sinks)

    def xla(q, k, v):
        return chunked_attention(
            q, k, v, mask=mask, scale=scale, q_block=xla_config.q_block, kv_block=xla_config.kv_block
        )

    _, vjp = jax.vjp(xla, q, k, v)
    dq, dk, dv = vjp(d_out)
    zero = np.zeros((), jax.dtypes.float0)
    return dq, dk, dv, zero, zero, np.zeros(kv_start.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def declines(q: jax.Array, k: jax.Array, mask: Mask, normalizer: str, return_lse: bool) -> str | None:
    """Why the kernel cannot take a call, or None. It reads the mask's causal rule, offsets, filled length,
    window, sinks and left padding; anything else in the mask is a reason."""
    if normalizer != "softmax":
        return f"normalizer {normalizer!r} (softmax only)"
    if return_lse:
        return "it does not return the log-sum-exp"
    if not mask.causal:
        return "bidirectional masks (causal only)"
    unsupported = [name for name in ("q_segments", "prefix") if getattr(mask, name) is not None]
    if mask.sparse is not None:
        unsupported.append("block-sparse layout")
    if mask.band is not None:
        unsupported.append("position band")
    if not (isinstance(mask.k_offset, int) and mask.k_offset == 0):
        unsupported.append("k_offset")
    if unsupported:
        return f"no {', '.join(unsupported)} in the mask"
    if q.dtype != jnp.float32 or k.dtype != jnp.float32:
        return f"float32 only, got {q.dtype}/{k.dtype}"
    if q.shape[3] % 16:
        return f"head_dim % 16 == 0 only, got {q.shape[3]}"
    if not available():
        return "not available on this machine (see the warning)"
    return None


def cpu_flash_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B K S D"],
    v: Float[Array, "B K S D"],
    *,
    mask: Mask,
    scale: float | None,
    normalizer: str,
    return_lse: bool,
    configs: tuple,
) -> Float[Array, "B T H D"]:
    """:func:`lcm.kernels.attention.api.attention` (arguments already checked there) on the CPU kernel: the same
    result as the XLA path to float32 rounding. Raises ``NotImplementedError`` with the reason where
    :func:`declines` gives one. Tiles come from the :class:`CpuConfig` among ``configs`` (the backward from the
    :class:`XlaConfig`): a call that sees at least ``long_keys`` keys uses ``long_q_block`` queries per task; when
    there are fewer tiles than twice the threads (decode steps), keys are split across tasks."""
    reason = declines(q, k, mask, normalizer, return_lse)
    if reason is not None:
        raise NotImplementedError(reason)
    mask = as_arrays(mask, k.shape[2])  # int32 arrays, kv_length clamped to the buffer
    kv_start = mask.kv_start if mask.kv_start is not None else jnp.zeros((q.shape[0],), jnp.int32)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    return _flash(
        q,
        k,
        v,
        mask.q_offset,
        mask.kv_length,
        kv_start,
        mask.window,
        mask.sinks,
        scale,
        pick(configs, CpuConfig),
        pick(configs, XlaConfig),
    )
