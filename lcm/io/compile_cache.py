"""The persistent XLA compilation cache and a counter of what a run compiled.

``enable_compilation_cache()`` points JAX's on-disk cache at ``$LCM_COMPILE_CACHE`` (default
``$LCM_CACHE_DIR/xla``, i.e. ``~/.cache/lcm/xla``), so a second run of the same config loads every program it
compiled before instead of compiling it again. ``CompileStats`` listens to JAX's monitoring events while it is
active and reports how many programs were built, how long tracing, lowering and compiling took, and how many
came from the disk cache — the numbers a run prints so that "compiles once" can be checked rather than believed.

JAX's cache is keyed by the lowered program, so a hit still traces and lowers the function first: what it loads is
exactly what the code now says. lcm once kept a second layer that loaded executables *without* tracing, keyed by
the function, its static arguments and lcm's own source; it saved ~2% of a first run's compile time on the second
run, and it ran a stale program when a KV policy defined in a user's own module was edited (its code was not in the
key). A research tool does not trade correctness for that: the layer is gone (issue [V], item 0).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def compilation_cache_dir() -> Path:
    default = Path(os.environ.get("LCM_CACHE_DIR", Path.home() / ".cache" / "lcm")) / "xla"
    return Path(os.environ.get("LCM_COMPILE_CACHE", str(default)))


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Cache every compiled program on disk (``directory`` or :func:`compilation_cache_dir`); returns the path."""
    path = Path(directory) if directory is not None else compilation_cache_dir()
    if jax.config.jax_compilation_cache_dir != str(path):
        # JAX opens its cache once per process, at the first compilation: forget it so the new directory is used
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


@dataclasses.dataclass
class CompileStats:
    """Context manager counting compilations: ``with CompileStats() as stats: ...; stats.summary()``.

    ``programs`` is the number of XLA programs built (from scratch or loaded from the disk cache),
    ``cache_hits`` how many of them JAX's disk cache supplied, ``seconds`` the wall time spent tracing, lowering,
    compiling and loading.
    Events from every thread count while the block runs.
    """

    programs: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    backend_seconds: float = 0.0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    _active: bool = dataclasses.field(default=False, repr=False)

    @property
    def compiles(self) -> int:
        """Programs compiled from scratch (not loaded from the disk cache)."""
        return self.programs - self.cache_hits

    def _on_duration(self, event: str, duration: float, **_: Any) -> None:
        if not self._active or event not in (_TRACE, _LOWER, _BACKEND):
            return
        with self._lock:
            self.seconds += duration
            if event == _BACKEND:
                self.programs += 1
                self.backend_seconds += duration

    def _on_event(self, event: str, **_: Any) -> None:
        if self._active and event == _CACHE_HIT:
            with self._lock:
                self.cache_hits += 1

    def __enter__(self) -> CompileStats:
        self._active = True
        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._active = False
        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)

    def summary(self) -> dict[str, float | int]:
        return {
            "programs": self.programs,
            "compiled": self.compiles,
            "cache_hits": self.cache_hits,
            "compile_seconds": round(self.seconds, 2),
        }
