"""RoPE scaling at 8k-16k on SmolLM2-135M (trained to 8k): no scaling, PI, NTK, dynamic NTK and YaRN at factor 2.

The GPU-sized config: on 2 CPU cores one 16k prefill takes 1.7-3.5 minutes depending on the machine's day
(BENCHMARKS.md), one 8k passkey trial 1-2 minutes, so the whole config takes 4-6 hours there; ``:cpu`` runs 1 passkey
trial per length instead of 10 and perplexity at 16k only. The trials of a length share their prompts up to the
needle, which the suite computes once (``Engine(reuse_prefix=True)``). On a CPU, one variant and one length at a
time fits a session: ``lcm run configs/rope_16k.py --config.rope=yarn:factor=2 --config.passkey.lengths=8192
--config.perplexity.lengths=4096,8192`` (the README's table was assembled that way).
Run: ``lcm run configs/rope_16k.py`` (GPU) or ``lcm run configs/rope_16k.py:cpu``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "gpu", "cpu"):
        raise ValueError(f"unknown rope_16k variant {arg!r}; choose one of ['cpu', 'gpu']")
    cfg = ml_collections.ConfigDict()
    cfg.job = "long_context_suite"  # a name in lcm.cli.JOBS
    cfg.model = "smollm2"  # registered name, GGUF file or HF folder
    cfg.dtype = "float32"  # float32 | bfloat16
    cfg.out_dir = "out/rope_16k"  # results.md/.json and plots go here
    cfg.chunk_size = 512  # prefill chunk (tokens)
    cfg.rope = (  # RoPE specs to compare
        "none",
        "linear:factor=2",
        "ntk:factor=2",
        "dynamic:factor=2",
        "yarn:factor=2",
    )

    cfg.passkey = ml_collections.ConfigDict()
    cfg.passkey.lengths = (8192, 16384)  # prompt lengths in tokens
    cfg.passkey.trials = 1 if arg == "cpu" else 10  # seeded trials per length
    cfg.passkey.depth = -1.0  # needle depth in [0, 1]; negative = random per trial
    cfg.passkey.seed = 0  # trial seed

    cfg.niah = ml_collections.ConfigDict()
    cfg.niah.lengths = ()  # no NIAH grid here
    cfg.niah.depths = (0.5,)
    cfg.niah.haystack = ""

    cfg.perplexity = ml_collections.ConfigDict()
    cfg.perplexity.lengths = (16384,) if arg == "cpu" else (4096, 8192, 16384)  # prefix lengths in tokens
    cfg.perplexity.input = ""  # "" = the source of typing.py (~30k tokens)
    return cfg
