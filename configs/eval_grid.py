"""The eval grid: RULER-style tasks (and Giraffe's, passkey, NIAH, LongBench-format files) x lengths x methods.

Default: the 12 RULER-style tasks at 1k, 2k and 4k tokens on SmolLM2-135M (CPU, 5 samples per cell, about an
hour on 2 cores). ``:giraffe`` runs Giraffe's LongChat-Lines, FreeFormQA and AlteredNumericQA; ``:smoke`` is a
two-task, one-length check in a few minutes. Results append to ``OUT/results.jsonl``, so an interrupted run
resumes where it stopped (``lcm run configs/eval_grid.py`` again), and ``OUT/results.md`` holds the tables.
Run: ``lcm run configs/eval_grid.py`` (``--config.lengths=1024,2048`` or ``--config.num_samples=2`` to shrink).
"""

import ml_collections

RULER = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa",
)
GIRAFFE = ("lines", "freeform_qa", "altered_numeric_qa")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = {"ruler": RULER, "giraffe": GIRAFFE, "smoke": ("niah_single_1", "vt")}
    name = arg or "ruler"
    if name not in variants:
        raise ValueError(f"unknown eval_grid variant {name!r}; choose one of {sorted(variants)}")
    cfg = ml_collections.ConfigDict()
    cfg.job = "eval_grid"  # a name in lcm.cli.JOBS
    cfg.model = "smollm2"  # registered name, GGUF file or HF folder
    cfg.dtype = "float32"  # float32 | bfloat16
    cfg.out_dir = f"out/eval_grid_{name}"  # results.jsonl, results.md, heatmaps, summary.png
    cfg.tasks = variants[name]  # registered task names or file:PATH.jsonl
    cfg.lengths = (1024,) if name == "smoke" else (1024, 2048, 4096)  # prompt lengths in tokens
    cfg.ropes = ("none",)  # RoPE specs: none | VARIANT[:k=v,...]
    cfg.policies = ("full",)  # KV-cache policies by name
    cfg.budgets = (0,)  # KV budgets in tokens (0 = the whole cache)
    # kvpress's compression ratios r (keep int(n * (1 - r)) of a prompt's n compressed tokens); () = none
    cfg.compression_ratios = ()
    cfg.question_apart = False  # True: the question appended after compression, uncompressed (kvpress)
    cfg.num_samples = 2 if name == "smoke" else 5  # samples per (task, length)
    cfg.seed = 0  # sample seed
    cfg.depths = ()  # needle depths cycled over samples; () = evenly spaced in [0, 1]
    cfg.batch_size = cfg.num_samples  # samples per prefill/decode batch (left padding changes no result)
    cfg.chat = True  # prompts through the tokenizer's chat template
    cfg.chunk_size = 512  # prefill chunk in tokens
    return cfg.lock()
