"""The tiny random decoder that the KV-policy tests run (shared by test_policies.py and test_infinipot.py)."""

import pytest
from flax import nnx

from lcm.models.llama import Llama, LlamaConfig

TINY = LlamaConfig(
    rms_norm_eps=1e-5,
    rope_base=100000.0,
    max_position_embeddings=8192,
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    tie_embeddings=False,
    attention_q_block=8,
    attention_kv_block=8,
)


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(TINY, rngs=nnx.Rngs(1))
