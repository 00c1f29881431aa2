"""Gemma 3 270M (base, 32k trained context, 5 sliding-window layers to each global one) through the quickstart's
suite at the lengths its context allows, on CPU: the [M] table of the README.

Passkey retrieval at 1k-16k tokens (10 seeded trials each, random depth), a needle-in-a-haystack grid over the
Python reference docs at 2k-8k, and perplexity versus length to 32k on the same docs (``prose``: 113k Gemma tokens;
``typing.py``, the quickstart's text, is 31.7k, short of 32k). The sliding-window layers hold only their 512-token
window (``lcm.cache.kv.WindowCache``).

Run: ``lcm run configs/gemma3_quickstart.py`` (hours on 2 cores: the 16k passkey and the 32k perplexity dominate);
``lcm run configs/gemma3_quickstart.py:short`` stops at 4k (minutes).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "short"):
        raise ValueError(f"unknown gemma3_quickstart variant {arg!r}; choose one of ['short']")
    short = arg == "short"
    cfg = ml_collections.ConfigDict()
    cfg.job = "long_context_suite"
    cfg.model = "gemma3-270m"
    cfg.dtype = "float32"
    cfg.out_dir = "out/gemma3_quickstart" + ("_short" if short else "")
    cfg.chunk_size = 512
    cfg.rope = ("none",)

    cfg.passkey = ml_collections.ConfigDict()
    cfg.passkey.lengths = (1024, 2048, 4096) if short else (1024, 2048, 4096, 8192, 16384)
    cfg.passkey.trials = 10
    cfg.passkey.depth = -1.0
    cfg.passkey.seed = 0

    cfg.niah = ml_collections.ConfigDict()
    cfg.niah.lengths = (2048, 4096) if short else (2048, 4096, 8192)
    cfg.niah.depths = (0.0, 0.5, 1.0)
    cfg.niah.haystack = ""

    cfg.perplexity = ml_collections.ConfigDict()
    cfg.perplexity.lengths = (512, 1024, 2048, 4096) if short else (512, 1024, 2048, 4096, 8192, 16384, 32768)
    cfg.perplexity.input = "prose"  # code | prose | a text file
    return cfg
