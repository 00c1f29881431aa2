"""CompileStats counts what JAX compiles, the persistent cache turns a recompilation into a disk hit, and
persistent_jit loads a stored executable in a new process without tracing."""

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.io import compile_cache
from lcm.io.compile_cache import (
    CompileStats,
    compilation_cache_dir,
    disable_executable_cache,
    enable_compilation_cache,
    persistent_jit,
)


@pytest.fixture
def isolated_cache(tmp_path: Path):
    before = jax.config.jax_compilation_cache_dir
    # a cache already in use, as after an `lcm` command earlier in the session: JAX opened it at the first
    # compilation, and enable_compilation_cache must make it switch to the new directory
    enable_compilation_cache(tmp_path / "earlier")
    jax.jit(lambda x: x * 11.0 + 2.0)(jnp.ones(3)).block_until_ready()
    yield enable_compilation_cache(tmp_path / "xla")
    if before is not None:
        enable_compilation_cache(before)
    else:
        jax.config.update("jax_compilation_cache_dir", None)
        disable_executable_cache()


def test_second_compilation_of_the_same_program_is_a_disk_cache_hit(isolated_cache: Path) -> None:
    def fn(x):
        return jnp.tanh(x @ x.T).sum(axis=0) * 3.0  # an unusual program: nothing else in the session has it

    x = jnp.ones((37, 11))
    with CompileStats() as first:
        jax.jit(fn)(x).block_until_ready()
    assert first.programs == 1 and first.cache_hits == 0 and first.compiles == 1 and first.seconds > 0
    assert any(isolated_cache.iterdir()), "nothing was written to the persistent cache"

    jax.clear_caches()  # forget the in-memory executable: the next call must go to disk
    with CompileStats() as second:
        jax.jit(fn)(x).block_until_ready()
    assert second.programs == 1 and second.cache_hits == 1 and second.compiles == 0
    summary = second.summary()
    assert summary == {"programs": 1, "compiled": 0, "cache_hits": 1, "compile_seconds": round(second.seconds, 2)}


def test_stats_count_only_inside_the_block() -> None:
    x = jnp.ones(13)
    stats = CompileStats()
    with stats:
        jax.jit(lambda x: x * 5.0 - 1.0)(x).block_until_ready()
    inside = stats.programs
    jax.jit(lambda x: x * 7.0 - 2.0)(x).block_until_ready()
    assert inside == 1 and stats.programs == 1


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LCM_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("LCM_CACHE_DIR", str(tmp_path))
    assert compilation_cache_dir() == tmp_path / "xla"
    monkeypatch.setenv("LCM_COMPILE_CACHE", str(tmp_path / "elsewhere"))
    assert compilation_cache_dir() == tmp_path / "elsewhere"


# A program in a fresh process, twice: the body prints when traced, so the second process shows it was not.
_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from lcm.io.compile_cache import CompileStats, enable_compilation_cache, persistent_jit

    enable_compilation_cache(sys.argv[1], executables=True)

    @persistent_jit(static_argnums=(0,), donate_argnames=("state",))
    def step(power, x, state):
        print("TRACED", flush=True)
        return jnp.tanh(x) ** power + 0.5, state + x.sum()

    x = jnp.asarray(np.linspace(-2.0, 2.0, 13, dtype=np.float32))
    state = jnp.zeros((), jnp.float32)
    with CompileStats() as stats:
        y, new_state = step(3, x, state)
    print("DONATED", state.is_deleted())
    print("HITS", stats.cache_hits, "PROGRAMS", stats.programs)
    print("RESULT", " ".join(f"{v:.8e}" for v in np.asarray(y)), float(new_state))
    """
)


def _run(script: Path, cache: Path) -> str:
    done = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_persistent_jit_loads_the_executable_in_a_new_process_without_tracing(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(_SCRIPT)
    first = _run(script, tmp_path / "cache")
    assert "TRACED" in first and "HITS 0 PROGRAMS 1" in first
    stored = list((tmp_path / "cache" / "lcm-executables").glob("__main__.step-*.pkl"))
    assert len(stored) == 1
    second = _run(script, tmp_path / "cache")
    assert "TRACED" not in second, "the second process traced the function again"
    assert "HITS 1 PROGRAMS 1" in second
    assert "DONATED True" in second  # donation survives serialisation: the state buffer was reused
    # the loaded program computes what the compiled one did, bit for bit, and what plain jnp computes
    result = first.split("RESULT ")[1].split()
    assert second.split("RESULT ")[1].split() == result
    x = np.linspace(-2.0, 2.0, 13, dtype=np.float32)
    # XLA's tanh is a rational approximation a few float32 ulps from numpy's: 1e-6 absolute on values near 1
    np.testing.assert_allclose(np.array(result[:-1], np.float32), np.tanh(x) ** 3 + 0.5, atol=1e-6)


# A program with gathers (what the failing CLI programs had), in three fresh processes sharing one cache directory.
_GATHER_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from lcm.io.compile_cache import enable_compilation_cache, persistent_jit

    enable_compilation_cache(sys.argv[1], executables=sys.argv[2] == "executables")

    @persistent_jit
    def lookup(table, idx, x):
        print("TRACED", flush=True)
        rows = table[idx]
        return jnp.sort(jnp.tanh(rows @ x.T).reshape(-1))[:5] + jnp.take(table.reshape(-1), idx * 3).sum()

    table = jnp.asarray(np.arange(64.0, dtype=np.float32)[None, :] * np.ones((1000, 1), np.float32) / 64.0)
    idx = jnp.asarray(np.arange(100, dtype=np.int32) * 7 % 1000)
    x = jnp.asarray(np.linspace(-1.0, 1.0, 32 * 64, dtype=np.float32).reshape(32, 64))
    print("RESULT", " ".join(f"{v:.8e}" for v in np.asarray(lookup(table, idx, x))))
    """
)


def test_an_executable_jax_loaded_from_its_cache_is_never_stored(tmp_path: Path) -> None:
    """Regression (2026-12-02): JAX's cache held a program, persistent_jit stored the executable JAX loaded from it,
    and a later process failed running that copy: "NOT_FOUND: Function gather_bitcast_fusion not found"."""
    script, cache = tmp_path / "gather.py", tmp_path / "cache"
    script.write_text(_GATHER_SCRIPT)

    def run(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, str(script), str(cache), mode], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    plain = run("jax-only")  # JAX's cache now holds the program under its own name
    assert not (cache / "lcm-executables").exists()
    stored = run("executables")  # compiled afresh under the versioned name, then stored
    entries = list((cache / "lcm-executables").glob("*.pkl"))
    assert len(entries) == 1
    loaded = run("executables")  # runs the stored copy: it raised NOT_FOUND before the fix
    assert "TRACED" not in loaded
    assert plain.split("RESULT ")[1] == stored.split("RESULT ")[1] == loaded.split("RESULT ")[1]

    entries[0].unlink()  # our entry gone, JAX's copy of the versioned program still there: a JAX hit, not stored
    again = run("executables")
    assert "TRACED" in again and not list((cache / "lcm-executables").glob("*.pkl"))
    assert again.split("RESULT ")[1] == plain.split("RESULT ")[1]


@pytest.fixture
def executable_cache(tmp_path: Path):
    before = jax.config.jax_compilation_cache_dir
    yield enable_compilation_cache(tmp_path / "xla", executables=True) / "lcm-executables"
    disable_executable_cache()
    if before is not None:
        enable_compilation_cache(before)
    else:
        jax.config.update("jax_compilation_cache_dir", None)
        disable_executable_cache()


def test_one_entry_per_shape_dtype_and_static_value(executable_cache: Path) -> None:
    traces = []

    @persistent_jit(static_argnums=(1,))
    def scale(x, factor):
        traces.append((x.shape, x.dtype, factor))
        return x * factor

    np.testing.assert_array_equal(scale(jnp.ones(3), 2), np.full(3, 2.0))
    np.testing.assert_array_equal(scale(jnp.ones(3), 2), np.full(3, 2.0))  # in memory: no new trace
    np.testing.assert_array_equal(scale(jnp.ones(4), 2), np.full(4, 2.0))
    np.testing.assert_array_equal(scale(jnp.ones(3, jnp.int32), 2), np.full(3, 2))
    np.testing.assert_array_equal(scale(jnp.ones(3), 5), np.full(3, 5.0))
    assert len(traces) == 4
    assert len(list(executable_cache.glob("*.pkl"))) == 4


def test_a_corrupt_entry_is_rebuilt_with_a_warning(executable_cache: Path) -> None:
    def double(x):
        return x * 2.0 + 1.0

    persistent_jit(double)(jnp.ones(5))
    (entry,) = executable_cache.glob("*.pkl")
    entry.write_bytes(b"not an executable")
    fresh = persistent_jit(double)  # a new wrapper has nothing in memory: it goes to the disk entry
    with pytest.warns(UserWarning, match="unreadable cached executable"):
        np.testing.assert_array_equal(fresh(jnp.ones(5)), np.full(5, 3.0))
    assert not entry.exists()  # dropped: this compile was a JAX cache hit, which is never stored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(persistent_jit(double)(jnp.ones(5)), np.full(5, 3.0))  # no second warning


def test_without_the_cache_it_is_plain_jit(tmp_path: Path) -> None:
    disable_executable_cache()
    assert compile_cache._executable_dir is None

    @persistent_jit
    def add(x):
        return x + 1.0

    np.testing.assert_array_equal(add(jnp.zeros(2)), np.ones(2))
    assert not any(tmp_path.iterdir())
