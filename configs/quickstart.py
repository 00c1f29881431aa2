"""The README's main job: SmolLM2-135M on CPU in a few minutes.

Passkey retrieval at 1k, 2k and 4k tokens (10 seeded trials each, random depth), a 2 x 3 needle-in-a-haystack
grid over the Python reference docs, and perplexity versus length on the source of ``typing.py``.
Run: ``lcm run configs/quickstart.py`` (``--config.passkey.trials=3`` for a faster look).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"unknown quickstart variant {arg!r}; choose one of []")
    cfg = ml_collections.ConfigDict()
    cfg.job = "long_context_suite"  # a name in lcm.cli.JOBS
    cfg.model = "smollm2"  # registered name, GGUF file or HF folder
    cfg.dtype = "float32"  # float32 | bfloat16
    cfg.out_dir = "out/quickstart"  # results.md/.json and plots go here
    cfg.chunk_size = 512  # prefill chunk (tokens); cache capacities are multiples of it
    cfg.rope = ("none",)  # RoPE specs to compare: none | VARIANT[:k=v,...]

    cfg.passkey = ml_collections.ConfigDict()
    cfg.passkey.lengths = (1024, 2048, 4096)  # prompt lengths in tokens
    cfg.passkey.trials = 10  # seeded trials per length
    cfg.passkey.depth = -1.0  # needle depth in [0, 1]; negative = random per trial
    cfg.passkey.seed = 0  # trial seed

    cfg.niah = ml_collections.ConfigDict()
    cfg.niah.lengths = (1024, 2048)  # haystack lengths in tokens
    cfg.niah.depths = (0.0, 0.5, 1.0)  # needle depths
    cfg.niah.haystack = ""  # prose (the Python reference docs, the default "") | code | a text file

    cfg.perplexity = ml_collections.ConfigDict()
    cfg.perplexity.lengths = (256, 512, 1024, 2048, 4096)  # prefix lengths in tokens
    cfg.perplexity.input = ""  # code (the source of typing.py, the default "") | prose (the Python docs) | a text file
    return cfg
