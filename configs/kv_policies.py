"""KV-cache policies compared on one model and one memory budget: every policy x budget on passkey, NIAH and
LongChat-Lines, with accuracy, KV memory (measured from the cache arrays), prefill and decode time.

Default (GPU-sized): lengths 2k, 4k and 8k, budgets 256, 512 and 1024 tokens, 10 samples per cell.
``:cpu`` is the 2-core version (2k and 4k, 3 samples; about 40 minutes). ``:passkey8k`` is issue [B]'s check:
passkey at 8k tokens with the needle in the middle, 10 trials, a 1024-token budget (StreamingLLM cannot see the
middle; the others must find it). Results, tables (``results.md``: a score table per task and a cost table) and
``budget.png`` (score versus budget per policy) go to ``out_dir``; reruns resume.
Run: ``lcm run configs/kv_policies.py:cpu``.
"""

import ml_collections

# lcm.cache.policies.POLICIES; NAME[:k=v] for parameters. locret needs trained heads: lcm run configs/locret_smollm2.py
POLICIES = ("full", "streamingllm", "snapkv", "h2o", "tokenselect", "infinipot", "locret", "knorm", "tova", "pyramidkv")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "gpu"
    if variant not in ("gpu", "cpu", "passkey8k"):
        raise ValueError(f"unknown kv_policies variant {variant!r}; choose one of ['cpu', 'gpu', 'passkey8k']")
    cfg = ml_collections.ConfigDict()
    cfg.job = "eval_grid"  # a name in lcm.cli.JOBS
    cfg.model = "smollm2"  # registered name, GGUF file or HF folder
    cfg.dtype = "float32"  # float32 | bfloat16
    cfg.out_dir = f"out/kv_policies_{variant}"  # results.jsonl, results.md, budget.png, heatmaps
    cfg.tasks = ("passkey",) if variant == "passkey8k" else ("passkey", "niah", "lines")  # task names
    cfg.lengths = {"gpu": (2048, 4096, 8192), "cpu": (2048, 4096), "passkey8k": (8192,)}[variant]  # tokens
    cfg.ropes = ("none",)  # RoPE specs
    cfg.policies = POLICIES  # KV policies to compare (full runs once, at budget 0)
    cfg.budgets = (0, 1024) if variant == "passkey8k" else (0, 256, 512, 1024)  # tokens per layer and KV head
    cfg.num_samples = 3 if variant == "cpu" else 10  # samples per (task, length)
    cfg.seed = 0  # sample seed
    cfg.depths = (0.5,) if variant == "passkey8k" else ()  # needle depths; () = evenly spaced in [0, 1]
    cfg.batch_size = 1  # bounded policies always run one sample at a time
    cfg.chat = True  # chat template for the instruct model (passkey is a plain completion prompt)
    cfg.chunk_size = 512  # prefill chunk in tokens (streaming policies hold budget + one chunk)
    return cfg.lock()
