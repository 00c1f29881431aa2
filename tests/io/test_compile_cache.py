"""CompileStats counts what JAX compiles, the persistent cache turns a recompilation into a disk hit, and a cached
program never outlives an edit of the code it was traced from (a user's own KV policy included)."""

import subprocess
import sys
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


# A user's own KV policy, in a module of their own, run through lcm's jitted steps in a fresh process sharing one
# cache directory; between the two runs the policy is edited (keep the even slots, then the odd ones).
_POLICY = """
import dataclasses
from typing import ClassVar
import jax.numpy as jnp
from lcm.cache.policies import KVPolicy


@dataclasses.dataclass(frozen=True)
class EveryOther(KVPolicy):
    name: ClassVar[str] = "every_other"

    def priority(self, scores, length, prompt_seen):
        slots = jnp.arange(scores.shape[-1])
        rank = jnp.where(slots % 2 == PARITY, 1.0, 0.0)
        return jnp.broadcast_to(jnp.where(slots < length, rank, -jnp.inf), scores.shape)
"""

_RUN = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from lcm.generate import Engine
from lcm.io.compile_cache import enable_compilation_cache
from lcm.models.llama import LlamaConfig, random_model
from mypolicy import EveryOther

enable_compilation_cache(sys.argv[1])
cfg = LlamaConfig.preset("smollm2-135m", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=2, num_kv_heads=1)
engine = Engine(random_model(cfg, seed=0), chunk_size=16, policy=EveryOther(budget=16))
tokens = np.arange(40, dtype=np.int32)[None] % 64
cache = engine.new_cache(1, engine.prompt_capacity(40) + 1)
_, cache = engine.prefill(tokens, cache)
print("KEPT", sum(float(np.asarray(layer.keys)[:, :, : int(layer.length)].sum()) for layer in cache.layers))
"""


def test_an_edited_user_policy_never_runs_its_old_program(tmp_path: Path) -> None:
    """[V] item 0: the second run loads from the same cache directory, but runs the edited code."""
    (tmp_path / "run.py").write_text(_RUN)
    kept = []
    for parity in (0, 1):
        (tmp_path / "mypolicy.py").write_text(_POLICY.replace("PARITY", str(parity)))
        done = subprocess.run(
            [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cache"), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        kept.append(next(line for line in done.stdout.splitlines() if line.startswith("KEPT")))
    assert kept[0] != kept[1], kept
