"""CompileStats counts what JAX compiles, and the persistent cache turns a recompilation into a disk hit."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lcm.io.compile_cache import CompileStats, compilation_cache_dir, enable_compilation_cache


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
