"""lcm.parallel.mesh: logical axis names onto a device mesh.

The rules are checked on a stand-in mesh (only its axis sizes matter); the sharded model runs in a subprocess
with 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set before JAX
starts), against the same model on one device.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec

from lcm.parallel.mesh import logical_spec, make_mesh

MESH = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2, "context": 1})


def test_logical_spec_maps_names_and_replicates_what_does_not_divide() -> None:
    assert logical_spec(("embed", "heads", "head_dim"), (64, 4, 16), MESH) == PartitionSpec("fsdp", "tensor", None)
    assert logical_spec(("batch", "length"), (4, 32), MESH) == PartitionSpec(("data", "fsdp"), None)  # context = 1
    # SmolLM2's 3 KV heads on a 2-way tensor axis stay whole; a batch of 2 cannot take 4 data shards
    assert logical_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), MESH) == PartitionSpec("fsdp", None, None)
    assert logical_spec(("batch",), (2,), MESH) == PartitionSpec(None)
    # a mesh axis is used once: the second "embed" of a square matrix is replicated
    assert logical_spec(("embed", "embed"), (64, 64), MESH) == PartitionSpec("fsdp", None)
    assert logical_spec((None, "unknown"), (8, 8), MESH) == PartitionSpec(None, None)
    # a mesh of other axes (a user's own): the rules' axes that it lacks shard nothing
    data_only = types.SimpleNamespace(shape={"data": 2})
    assert logical_spec(("batch", "length"), (4, 8), data_only) == PartitionSpec("data", None)
    with pytest.raises(ValueError, match=r"logical axes \('embed',\) do not match shape \(4, 4\)"):
        logical_spec(("embed",), (4, 4), MESH)


def test_make_mesh_checks_sizes() -> None:
    assert make_mesh().shape == {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}
    with pytest.raises(ValueError, match=r"mesh \{'data': 2, 'fsdp': 1, 'tensor': 1, 'context': 1\} needs 2 devices"):
        make_mesh(data=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"mesh axis sizes must be positive integers, got \{'tensor': 0\}"):
        make_mesh(tensor=0)


SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from lcm import steps
    from lcm.models.llama import Llama, LlamaConfig, forward
    from lcm.parallel.mesh import make_mesh, shard_cache, shard_params, sharded_random_model

    assert jax.device_count() == 8
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, tie_embeddings=False, rms_norm_eps=1e-5,
                      rope_base=1e5, attention_implementation=sys.argv[1])
    mesh = make_mesh(data=2, fsdp=2, tensor=2)

    # initialised sharded under jit: the numbers of an eager init, each device holding its shard only
    sharded = sharded_random_model(cfg, mesh, seed=0)
    eager = Llama(cfg, rngs=nnx.Rngs(0))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(nnx.state(sharded, nnx.Param)),
                                 jax.tree.leaves(nnx.state(eager, nnx.Param)), strict=True):
        # the same draws; the jitted scale-by-1/sqrt(fan_in) may round the last bit differently
        where = jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0, err_msg=where)
    q = sharded.layers[0].attn.q_proj.get_value()
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None), q.sharding.spec
    assert q.addressable_shards[0].data.shape == (32, 2, 16)

    # a forward over the mesh (batch over data x fsdp, heads and mlp over tensor) equals the one-device forward
    batch, length = 4, 16
    tokens = np.random.default_rng(0).integers(0, 128, (batch, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    run = jax.jit(forward, static_argnums=0)
    want, want_cache = run(*nnx.split(eager), tokens, positions, eager.init_cache(batch, 32))
    model = shard_params(eager, mesh)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    cache = shard_cache(model.init_cache(batch, 32), mesh)
    for layer in cache.layers:
        assert layer.keys.sharding.spec == PartitionSpec(("data", "fsdp"), "tensor", None, None)
    graphdef, params = nnx.split(model)
    got, got_cache = run(graphdef, params, jax.device_put(tokens, rows), jax.device_put(positions, rows), cache)
    # float32 sums split across shards round differently: logits are O(1), round-off ~1e-6
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    for got_layer, want_layer, placed in zip(got_cache.layers, want_cache.layers, cache.layers, strict=True):
        np.testing.assert_allclose(np.asarray(got_layer.keys), np.asarray(want_layer.keys), atol=1e-5, rtol=0)
        assert got_layer.keys.sharding.is_equivalent_to(placed.keys.sharding, 4)  # the cache stays where it was

    # the Engine's decode step on the sharded cache: the same greedy tokens
    token = jnp.argmax(got[:, -1], -1).astype(jnp.int32)
    want_token = jnp.argmax(want[:, -1], -1).astype(jnp.int32)
    for step in range(3):
        position = jnp.full((batch,), length + step, jnp.int32)
        token, got_cache = steps.decode_step(graphdef, params, token, position, got_cache)
        want_token, want_cache = steps.decode_step(*nnx.split(eager), want_token, position, want_cache)
        np.testing.assert_array_equal(np.asarray(token), np.asarray(want_token))
    print("ok")
    """
)


@pytest.mark.parametrize("implementation", ["xla", "auto"])
def test_sharded_model_matches_one_device(tmp_path: Path, implementation: str) -> None:
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), implementation], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
