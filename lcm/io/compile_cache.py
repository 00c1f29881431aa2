"""The persistent XLA compilation cache and a counter of what a run compiled.

``enable_compilation_cache()`` points JAX's on-disk cache at ``$LCM_COMPILE_CACHE`` (default
``$LCM_CACHE_DIR/xla``, i.e. ``~/.cache/lcm/xla``), so a second run of the same config loads every program it
compiled before instead of compiling it again. ``CompileStats`` listens to JAX's monitoring events while it is
active and reports how many programs were built, how long tracing, lowering and compiling took, and how many
came from the disk cache — the numbers a run prints so that "compiles once" can be checked rather than believed.

JAX's cache is keyed by the lowered program, so even a hit traces and lowers the function first (about a third of
a second run's compile time for lcm's model programs). :func:`persistent_jit` goes one step further for the
inference programs (``lcm.steps``): it keys a serialised executable by what the call is made of — the function,
its static arguments, the shapes, dtypes and shardings of the rest, the JAX and XLA versions, the device and a
fingerprint of lcm's own source — and loads it without tracing (``jax.experimental.serialize_executable``).

One rule keeps those executables sound: only a freshly compiled executable is stored. An executable that JAX itself
loaded from its cache serialises without the compiled kernels of its fusions, and loading that copy later fails at
run time ("NOT_FOUND: Function gather_bitcast_fusion not found"; jax 0.10.2, CPU). So persistent_jit compiles
under a name carrying lcm's source fingerprint (a JAX cache key of its own, which a new lcm version misses), and it
never stores an executable whose compilation was a JAX cache hit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import platform
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax import monitoring
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_EXECUTABLE_LOAD = "/lcm/executable_cache/load_duration"  # a program loaded by persistent_jit, no tracing
_EXECUTABLE_SAVE = "/lcm/executable_cache/save_duration"  # serialising a freshly compiled one
_executable_dir: Path | None = None  # persistent_jit's directory; None = plain jax.jit (until enabled)


def compilation_cache_dir() -> Path:
    default = Path(os.environ.get("LCM_CACHE_DIR", Path.home() / ".cache" / "lcm")) / "xla"
    return Path(os.environ.get("LCM_COMPILE_CACHE", str(default)))


def enable_compilation_cache(directory: str | Path | None = None, executables: bool | None = None) -> Path:
    """Cache every compiled program on disk (``directory`` or :func:`compilation_cache_dir`); returns the path.

    ``executables`` (default: on, unless ``LCM_EXECUTABLE_CACHE=0``) also turns on :func:`persistent_jit`'s
    executable cache, which loads lcm's inference programs without tracing them."""
    if executables is None:
        executables = os.environ.get("LCM_EXECUTABLE_CACHE", "1") != "0"
    path = Path(directory) if directory is not None else compilation_cache_dir()
    if jax.config.jax_compilation_cache_dir != str(path):
        # JAX opens its cache once per process, at the first compilation: forget it so the new directory is used
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    global _executable_dir
    _executable_dir = path / "lcm-executables" if executables else None
    return path


def disable_executable_cache() -> None:
    """Make :func:`persistent_jit` functions plain ``jax.jit`` again (JAX's own cache stays as it is)."""
    global _executable_dir
    _executable_dir = None


_jax_cache_hits = threading.local()  # per thread: JAX cache hits so far (a compile runs in its caller's thread)


def _count_jax_cache_hit(event: str, **_: Any) -> None:
    if event == _CACHE_HIT:
        _jax_cache_hits.count = getattr(_jax_cache_hits, "count", 0) + 1


monitoring.register_event_listener(_count_jax_cache_hit)


@functools.cache
def _source_fingerprint() -> str:
    """A hash of lcm's own source: any edit to it is a different program."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for source in sorted(root.rglob("*")):
        if source.suffix in (".py", ".cc", ".h") and source.is_file():
            digest.update(str(source.relative_to(root)).encode() + source.read_bytes())
    return digest.hexdigest()


@functools.cache
def _environment_fingerprint() -> str:
    """Everything outside a call that shapes its executable: versions, device, XLA flags, lcm's own source."""
    device = jax.devices()[0]
    cpu_model = ""
    if Path("/proc/cpuinfo").exists():  # the CPU backend compiles for the host's instruction set
        cpu_model = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln), "")
    parts = [
        jax.__version__,
        jaxlib.__version__,
        device.platform,
        device.client.platform_version,
        device.device_kind,
        str(jax.device_count()),
        cpu_model,
        platform.machine(),
        os.environ.get("XLA_FLAGS", ""),
        str(jax.config.jax_enable_x64),
        str(jax.config.jax_default_matmul_precision),
        str(jax.config.jax_numpy_dtype_promotion),
    ]
    parts.append(_source_fingerprint())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _leaf_signature(x: Any) -> tuple[Any, ...]:
    """What a compiled program assumes about one array argument (the in-process key)."""
    if isinstance(x, jax.Array):
        return (x.aval, x.sharding)
    if isinstance(x, np.ndarray | np.generic):
        return (x.shape, x.dtype, "host")
    if isinstance(x, bool | int | float | complex):  # Python scalars become weakly typed arrays
        return ((), type(x), "host")
    raise TypeError(f"persistent_jit: unsupported argument of type {type(x).__name__}")


def _describe(signature: tuple[Any, ...]) -> str:
    """The same, as text that is stable across processes (the disk key)."""
    if len(signature) == 2:  # a jax.Array: its abstract value and sharding
        aval, sharding = signature
        return f"{aval.shape}:{aval.dtype}:{aval.weak_type}:{sharding}"
    return ":".join(map(str, signature))


class PersistentJit:
    """``jax.jit(fun, static_argnums=..., static_argnames=..., donate_argnames=...)`` whose executables persist.

    While :func:`enable_compilation_cache` is in effect, the first call of a new shape lowers and compiles as
    ``jax.jit`` would, then writes the executable under ``<cache>/lcm-executables/``; a later process making the
    same call loads it from there without tracing or lowering. Static arguments must pickle (the key hashes
    their pickle); a call whose key cannot be built falls back to ``jax.jit``, as does every call while the cache
    is off. ``before_load`` runs once before the first executable is loaded (e.g. registering the custom calls
    that tracing would have registered). Loads and saves are reported as monitoring events that
    :class:`CompileStats` counts.
    """

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        static_argnums: Sequence[int] = (),
        static_argnames: Sequence[str] = (),
        donate_argnames: Sequence[str] = (),
        before_load: Callable[[], Any] | None = None,
    ) -> None:
        options = dict(static_argnums=static_argnums, static_argnames=static_argnames, donate_argnames=donate_argnames)
        self._jitted = jax.jit(fun, **options)
        self._fun, self._options = fun, options
        self._fresh_jitted: Any = None  # the same under a versioned name, built at the first store (see module doc)
        self._static_argnums = tuple(static_argnums)
        self._static_argnames = tuple(static_argnames)
        self._name = f"{fun.__module__}.{fun.__qualname__}"
        self._before_load = before_load
        self._executables: dict[Any, jax.stages.Compiled] = {}
        # static arguments by identity: hashing a model's graphdef costs ~1 ms, too much for every decode step
        self._static_by_id: dict[int, tuple[Any, int]] = {}
        self._static_tokens: dict[Any, int] = {}
        self._lock = threading.Lock()
        functools.update_wrapper(self, fun)

    def lower(self, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
        return self._jitted.lower(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        directory = _executable_dir
        if directory is None:
            return self._jitted(*args, **kwargs)
        static = tuple(args[i] for i in self._static_argnums if i < len(args)) + tuple(
            (k, kwargs[k]) for k in self._static_argnames if k in kwargs
        )
        dynamic_args = tuple(a for i, a in enumerate(args) if i not in self._static_argnums)
        dynamic_kwargs = {k: v for k, v in kwargs.items() if k not in self._static_argnames}
        leaves, treedef = jax.tree.flatten((dynamic_args, dynamic_kwargs))
        try:
            tokens = tuple(self._static_token(v) for v in static)
            key = (tokens, treedef, tuple(_leaf_signature(x) for x in leaves), directory)
            compiled = self._executables.get(key)
        except TypeError:  # an unhashable static argument or an unusual leaf: jax.jit decides
            return self._jitted(*args, **kwargs)
        if compiled is None:
            with self._lock:
                compiled = self._executables.get(key)
                if compiled is None:
                    compiled = self._load_or_compile(directory, static, key, args, kwargs)
                    if compiled is None:
                        return self._jitted(*args, **kwargs)
                    self._executables[key] = compiled
        return compiled(*dynamic_args, **dynamic_kwargs)

    def _static_token(self, value: Any) -> int:
        """A small int standing for a static argument, equal for equal values; hashed once per object."""
        entry = self._static_by_id.get(id(value))
        if entry is None or entry[0] is not value:
            with self._lock:
                entry = (value, self._static_tokens.setdefault(value, len(self._static_tokens)))
                self._static_by_id[id(value)] = entry  # holds the object, so its id is never reused
        return entry[1]

    def _load_or_compile(
        self,
        directory: Path,
        static: tuple[Any, ...],
        key: tuple[Any, ...],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> jax.stages.Compiled | None:
        _, treedef, signature, _ = key
        try:
            static_bytes = pickle.dumps(static, protocol=5)
        except Exception:  # noqa: BLE001 - anything that does not pickle cannot be keyed across processes
            return None
        digest = hashlib.sha256()
        for part in (_environment_fingerprint(), self._name, str(treedef), *map(_describe, signature)):
            digest.update(part.encode() + b"\0")
        digest.update(static_bytes)
        path = directory / f"{self._name}-{digest.hexdigest()[:32]}.pkl"
        if path.exists():
            started = time.perf_counter()
            try:
                if self._before_load is not None:
                    self._before_load()
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            except Exception as err:  # noqa: BLE001 - a stale or corrupt entry is rebuilt, never trusted
                warnings.warn(f"lcm: ignoring unreadable cached executable {path.name}: {err}", stacklevel=3)
                path.unlink(missing_ok=True)  # replaced below if this compile is fresh, else compiled next time
            else:
                monitoring.record_event_duration_secs(_EXECUTABLE_LOAD, time.perf_counter() - started)
                return compiled
        hits_before = getattr(_jax_cache_hits, "count", 0)
        compiled = self._versioned_jit().lower(*args, **kwargs).compile()
        if getattr(_jax_cache_hits, "count", 0) != hits_before:
            return compiled  # loaded by JAX from its cache: usable here, but it would not survive serialisation
        started = time.perf_counter()
        try:
            entry = pickle.dumps(serialize_executable.serialize(compiled), protocol=5)
        except (ValueError, NotImplementedError, pickle.PicklingError):  # e.g. captured constants: not storable
            return compiled
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(entry)
        partial.replace(path)  # atomic: a concurrent reader sees the whole entry or none
        monitoring.record_event_duration_secs(_EXECUTABLE_SAVE, time.perf_counter() - started)
        return compiled

    def _versioned_jit(self) -> Any:
        """``jax.jit`` of the function renamed ``<name>_lcm<source hash>``: its JAX cache key is lcm-version's own."""
        if self._fresh_jitted is None:

            @functools.wraps(self._fun)
            def versioned(*args: Any, **kwargs: Any) -> Any:
                return self._fun(*args, **kwargs)

            versioned.__name__ = f"{getattr(self._fun, '__name__', 'fun')}_lcm{_source_fingerprint()[:12]}"
            self._fresh_jitted = jax.jit(versioned, **self._options)
        return self._fresh_jitted


def persistent_jit(
    fun: Callable[..., Any] | None = None, **options: Any
) -> PersistentJit | Callable[[Callable[..., Any]], PersistentJit]:
    """Decorator form of :class:`PersistentJit`: ``@persistent_jit(static_argnums=0, donate_argnames=("cache",))``."""
    if fun is None:
        return functools.partial(PersistentJit, **options)
    return PersistentJit(fun, **options)


@dataclasses.dataclass
class CompileStats:
    """Context manager counting compilations: ``with CompileStats() as stats: ...; stats.summary()``.

    ``programs`` is the number of XLA programs built (from scratch or loaded from the disk cache),
    ``cache_hits`` how many of them the disk caches supplied (JAX's, or :func:`persistent_jit`'s without
    tracing), ``seconds`` the wall time spent tracing, lowering, compiling, loading and storing executables.
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
        if not self._active or event not in (_TRACE, _LOWER, _BACKEND, _EXECUTABLE_LOAD, _EXECUTABLE_SAVE):
            return
        with self._lock:
            self.seconds += duration
            if event in (_BACKEND, _EXECUTABLE_LOAD):
                self.programs += 1
                self.backend_seconds += duration
            if event == _EXECUTABLE_LOAD:
                self.cache_hits += 1

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
