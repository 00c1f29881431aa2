"""Train Locret retaining heads for SmolLM2-135M on CPU (backbone frozen; lcm.train.locret).

Default: 450 steps over 48 samples of 2048 prompt + 128 answer tokens from the standard library's prose and code
(planted needles, copied spans and continuations; 20 minutes on 2 shared cores), held-out recall of the true
top-10% CIS positions against random and most-recent baselines, heads saved where
``lcm.io.retaining.load_retaining_heads(model, "smollm2")`` finds them.
``:smoke`` is a 20-step, 512-token check.
Run: ``lcm run configs/locret_smollm2.py`` (``--config.steps=900`` for longer).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in ("default", "smoke"):
        raise ValueError(f"unknown locret_smollm2 variant {variant!r}; choose one of ['default', 'smoke']")
    smoke = variant == "smoke"
    cfg = ml_collections.ConfigDict()
    cfg.job = "locret_train"  # a name in lcm.cli.JOBS
    cfg.model = "smollm2"  # registered name, GGUF file or HF folder
    cfg.dtype = "float32"  # float32 | bfloat16: the frozen backbone's dtype (the heads are float32)
    cfg.steps = 20 if smoke else 450  # training steps, one sample each (batch 1)
    cfg.samples = 4 if smoke else 48  # distinct training samples (one frozen forward each), cycled over by the steps
    cfg.prompt_tokens = 512 if smoke else 2048  # prompt tokens per sample: the positions the heads are scored on
    cfg.answer_tokens = 64 if smoke else 128  # answer tokens per sample: the queries the labels take the max over
    cfg.learning_rate = 5e-4  # AdamW peak learning rate (the official 5e-4)
    cfg.warmup_fraction = 2 / 3  # share of steps in linear warmup (the official 2000 of 3000), then linear decay
    cfg.alpha = 0.0025  # weight of the smoothness term (the paper's 0.0025)
    cfg.hidden_fraction = 0.025  # the heads' share of the model's parameters (the paper's 2.5%): hidden width
    cfg.needle_fraction = 0.4  # share of samples whose answer repeats needles planted in a filler (locret_data)
    cfg.copy_fraction = 0.5  # of the other samples, the share whose answer repeats a span (else the follow-on)
    cfg.eval_samples = 2 if smoke else 4  # held-out samples for the recall metric (one frozen forward each)
    cfg.seed = 0  # samples and initialisation
    cfg.out = ""  # output folder; "" = lcm.io.retaining.heads_dir(model) ($LCM_LOCRET_DIR or the cache)
    return cfg.lock()
