"""Tests for lcm.cache.kv: the empty cache's per-layer shapes and dtypes (one capacity for all layers or one per
layer), its pytree structure, ``replace_layers``, and ``write_layer`` against a numpy slice assignment (eager and
jitted, with a traced start slot)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache.kv import KVCache, LayerCache, init_cache, write_layer


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_init_cache_shapes_and_dtypes(dtype: jnp.dtype, keys_pre_rope: bool) -> None:
    cache = init_cache(3, 2, 16, 4, 8, dtype, keys_pre_rope)
    assert len(cache.layers) == 3 and all(isinstance(layer, LayerCache) for layer in cache.layers)
    for layer in cache.layers:
        chex.assert_shape([layer.keys, layer.values], (2, 4, 16, 8))  # [B, K, S, D]
        chex.assert_shape(layer.positions, (2, 16))
        chex.assert_shape(layer.length, ())
        assert layer.keys.dtype == dtype and layer.values.dtype == dtype
        assert layer.positions.dtype == jnp.int32 and layer.length.dtype == jnp.int32
        np.testing.assert_array_equal(layer.keys, 0)
    assert int(cache.length) == 0 and cache.batch == 2
    assert cache.capacity == 16 and cache.capacities == (16, 16, 16)
    assert cache.keys_pre_rope is keys_pre_rope
    itemsize = jnp.dtype(dtype).itemsize
    # per layer: keys and values, positions [B, S] int32, length int32
    assert cache.num_bytes == 3 * (2 * 2 * 16 * 4 * 8 * itemsize + 2 * 16 * 4 + 4)


def test_layers_may_hold_different_capacities() -> None:
    cache = init_cache(3, 1, (8, 4, 2), 2, 4)
    assert cache.capacities == (8, 4, 2)
    assert [layer.keys.shape for layer in cache.layers] == [(1, 2, 8, 4), (1, 2, 4, 4), (1, 2, 2, 4)]
    with pytest.raises(ValueError, match=r"different capacities \(8, 4, 2\)"):
        _ = cache.capacity
    with pytest.raises(ValueError, match="2 capacities given for 3 layers"):
        init_cache(3, 1, (8, 4), 2, 4)


def test_cache_is_a_pytree_with_static_layout_flag() -> None:
    cache = init_cache(2, 1, 4, 1, 2, keys_pre_rope=True)
    # four array leaves per layer; keys_pre_rope lives in the treedef, so jit specialises on it instead of tracing it
    assert len(jax.tree.leaves(cache)) == 8
    doubled = jax.jit(lambda c: jax.tree.map(lambda x: x + 1, c))(cache)
    assert isinstance(doubled, KVCache) and doubled.keys_pre_rope is True
    assert [int(layer.length) for layer in doubled.layers] == [1, 1]
    other = init_cache(2, 1, 4, 1, 2, keys_pre_rope=False)
    assert jax.tree.structure(cache) != jax.tree.structure(other)


def test_replace_layers_takes_one_value_for_all_or_one_per_layer() -> None:
    cache = init_cache(2, 1, 4, 1, 2)
    same = cache.replace_layers(length=jnp.int32(3))
    assert [int(layer.length) for layer in same.layers] == [3, 3]
    each = cache.replace_layers(length=[jnp.int32(1), jnp.int32(2)])
    assert [int(layer.length) for layer in each.layers] == [1, 2]
    with pytest.raises(ValueError, match="length: 3 values for 2 layers"):
        cache.replace_layers(length=[jnp.int32(1)] * 3)


@pytest.mark.parametrize(
    "capacity,batch",
    [(0, 1), (-3, 1), (4, 0), (4, -1)],
)
def test_init_cache_rejects_non_positive_sizes(capacity: int, batch: int) -> None:
    with pytest.raises(ValueError, match="cache capacity and batch must be positive") as err:
        init_cache(2, batch, capacity, 2, 4)
    assert f"capacity={capacity}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("start,length", [(0, 3), (2, 4), (7, 1)])
def test_write_layer_writes_exactly_the_target_slots(start: int, length: int, jit: bool) -> None:
    rng = np.random.default_rng(start)
    batch, capacity, heads, dim = 2, 8, 2, 4
    keys = rng.standard_normal((batch, heads, capacity, dim)).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    k = rng.standard_normal((batch, length, heads, dim)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    write = jax.jit(write_layer) if jit else write_layer
    new_keys, new_values = write(jnp.asarray(keys), jnp.asarray(values), jnp.int32(start), k, v)
    expected_keys, expected_values = keys.copy(), values.copy()
    expected_keys[:, :, start : start + length] = k.transpose(0, 2, 1, 3)
    expected_values[:, :, start : start + length] = v.transpose(0, 2, 1, 3)
    # a copy, not arithmetic: bit-exact
    np.testing.assert_array_equal(new_keys, expected_keys)
    np.testing.assert_array_equal(new_values, expected_values)


def test_write_layer_casts_to_the_cache_dtype() -> None:
    layer = init_cache(1, 1, 4, 1, 2, jnp.bfloat16).layers[0]
    k = jnp.full((1, 2, 1, 2), 1.0 + 2.0**-10, jnp.float32)  # rounds to 1.0 in bfloat16
    keys, values = write_layer(layer.keys, layer.values, jnp.int32(1), k, -k)
    assert keys.dtype == jnp.bfloat16 and values.dtype == jnp.bfloat16
    np.testing.assert_array_equal(keys[0, :, 1:3].astype(jnp.float32), 1.0)
    np.testing.assert_array_equal(values[0, :, 1:3].astype(jnp.float32), -1.0)
    np.testing.assert_array_equal(keys[0, :, 0], 0)
    np.testing.assert_array_equal(keys[0, :, 3], 0)
