"""lcm.kernels.dispatch: names, aliases and fall-through, on toy implementations; both kernel apis use it."""

from __future__ import annotations

import pytest

from lcm.kernels.dispatch import Dispatch
from lcm.kernels.token_select import api as token_select_api


def _declines(*args, **kwargs):
    raise NotImplementedError("not for this call")


def _dispatch(calls: list[str]) -> Dispatch:
    def named(name):
        def run(x, *, scale=1):
            calls.append(name)
            return (name, x * scale)

        return run

    return Dispatch("toy", {"xla": named("xla"), "fast": named("fast"), "never": _declines}, {"auto": ("fast", "xla")})


def test_first_implementation_that_takes_the_call_runs() -> None:
    calls: list[str] = []
    toy = _dispatch(calls)
    assert toy(3, implementation="auto", scale=2) == ("fast", 6)
    assert toy(3, implementation="never, xla") == ("xla", 3)  # the declining one is skipped
    assert toy(3, implementation=["xla", "fast"]) == ("xla", 3)
    assert calls == ["fast", "xla", "xla"]
    with pytest.raises(
        NotImplementedError,
        match=r"no toy implementation among \['never'\] takes this call \(never: not for this call\)",
    ):
        toy(3, implementation="never")


def test_resolve_expands_aliases_and_rejects_unknown_names() -> None:
    toy = _dispatch([])
    assert toy.resolve("auto") == ("fast", "xla")
    assert toy.resolve(" never ,auto") == ("never", "fast", "xla")
    choices = r"\['fast', 'never', 'xla', 'auto'\]"
    with pytest.raises(ValueError, match=rf"unknown toy implementation 'gpu'; choose from {choices}"):
        toy.resolve("fast,gpu")
    with pytest.raises(ValueError, match="toy implementation must name at least one of"):
        toy.resolve([])


def test_token_select_api_takes_names_lists_and_auto() -> None:
    assert token_select_api.resolve("auto") == ("xla",)
    assert token_select_api.resolve("xla,auto") == ("xla", "xla")
    with pytest.raises(ValueError, match="unknown token_select implementation 'pallas'"):
        token_select_api.token_select_attention(implementation="pallas")
