"""Tests for lcm.cache.kv: the empty cache's shapes and dtypes, its pytree structure, and ``write_layer``
against a numpy slice assignment (eager and jitted, with a traced start slot)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache.kv import KVCache, init_cache, write_layer


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("keys_pre_rope", [False, True])
def test_init_cache_shapes_and_dtypes(dtype: jnp.dtype, keys_pre_rope: bool) -> None:
    cache = init_cache(3, 2, 16, 4, 8, dtype, keys_pre_rope)
    chex.assert_shape([cache.keys, cache.values], (3, 2, 4, 16, 8))  # [L, B, K, S, D]
    chex.assert_shape(cache.positions, (2, 16))
    chex.assert_shape(cache.length, ())
    assert cache.keys.dtype == dtype and cache.values.dtype == dtype
    assert cache.positions.dtype == jnp.int32 and cache.length.dtype == jnp.int32
    assert int(cache.length) == 0
    assert cache.capacity == 16
    assert cache.keys_pre_rope is keys_pre_rope
    np.testing.assert_array_equal(cache.keys, 0)
    itemsize = jnp.dtype(dtype).itemsize
    assert cache.num_bytes == 2 * 3 * 2 * 16 * 4 * 8 * itemsize + 2 * 16 * 4


def test_cache_is_a_pytree_with_static_layout_flag() -> None:
    cache = init_cache(1, 1, 4, 1, 2, keys_pre_rope=True)
    # four array leaves; keys_pre_rope lives in the treedef, so jit specialises on it instead of tracing it
    assert len(jax.tree.leaves(cache)) == 4
    doubled = jax.jit(lambda c: jax.tree.map(lambda x: x + 1, c))(cache)
    assert isinstance(doubled, KVCache) and doubled.keys_pre_rope is True
    assert int(doubled.length) == 1
    other = init_cache(1, 1, 4, 1, 2, keys_pre_rope=False)
    assert jax.tree.structure(cache) != jax.tree.structure(other)


@pytest.mark.parametrize(
    "capacity,batch",
    [(0, 1), (-3, 1), (4, 0), (4, -1)],
)
def test_init_cache_rejects_non_positive_sizes(capacity: int, batch: int) -> None:
    with pytest.raises(ValueError, match="cache capacity and batch must be positive") as err:
        init_cache(2, batch, capacity, 2, 4)
    assert f"capacity={capacity}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("layer,start,length", [(0, 0, 3), (1, 2, 4), (2, 7, 1)])
def test_write_layer_writes_exactly_the_target_slots(layer: int, start: int, length: int, jit: bool) -> None:
    rng = np.random.default_rng(layer * 10 + start)
    num_layers, batch, capacity, heads, dim = 3, 2, 8, 2, 4
    keys = rng.standard_normal((num_layers, batch, heads, capacity, dim)).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    k = rng.standard_normal((batch, length, heads, dim)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    write = jax.jit(write_layer, static_argnums=2) if jit else write_layer
    new_keys, new_values = write(jnp.asarray(keys), jnp.asarray(values), layer, jnp.int32(start), k, v)
    expected_keys, expected_values = keys.copy(), values.copy()
    expected_keys[layer, :, :, start : start + length] = k.transpose(0, 2, 1, 3)
    expected_values[layer, :, :, start : start + length] = v.transpose(0, 2, 1, 3)
    # a copy, not arithmetic: bit-exact
    np.testing.assert_array_equal(new_keys, expected_keys)
    np.testing.assert_array_equal(new_values, expected_values)


def test_write_layer_casts_to_the_cache_dtype() -> None:
    cache = init_cache(2, 1, 4, 1, 2, jnp.bfloat16)
    k = jnp.full((1, 2, 1, 2), 1.0 + 2.0**-10, jnp.float32)  # rounds to 1.0 in bfloat16
    keys, values = write_layer(cache.keys, cache.values, 1, jnp.int32(1), k, -k)
    assert keys.dtype == jnp.bfloat16 and values.dtype == jnp.bfloat16
    np.testing.assert_array_equal(keys[1, 0, :, 1:3].astype(jnp.float32), 1.0)
    np.testing.assert_array_equal(values[1, 0, :, 1:3].astype(jnp.float32), -1.0)
    np.testing.assert_array_equal(keys[0], 0)
