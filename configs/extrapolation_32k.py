"""Past the trained length without training: SmolLM2-135M (trained to 8k) at 8k, 16k and 32k.

Methods: no scaling, dynamic NTK, YaRN, SelfExtend, Dual Chunk Attention, ReRoPE (position schemes inside attention,
lcm.ops.position_schemes), TokenSelect and InfiniPot (KV policies whose positions stay inside their cache). Stages,
in order: passkey at 16k and 8k (10 seeded trials at random depths), the NIAH grid and RULER-style niah_single_1,
niah_multikey_1 and vt at 16k (5 samples each), passkey at 32k (5 trials), perplexity of the reference docs at
8k/16k/32k (one 32k pass per method). Writes OUT/results.md (one table), OUT/passkey.png (accuracy versus length,
one line per method) and OUT/summary.json; resumable (rerun the same command).

On 2 CPU cores a 16k prefill takes 2-4 minutes and a 32k one 6-12, so the whole config takes days there: run one
stage at a time (``--config.stages=passkey_16k``) and commit OUT's JSONL as it grows. ``:tiny`` is a minutes-long
check on short prompts with windows scaled down to match (tests and the notebook).
Run: ``lcm run configs/extrapolation_32k.py`` or ``lcm run configs/extrapolation_32k.py:tiny``.
"""

import ml_collections

METHODS = (
    "none",
    "dynamic:factor=2",
    "yarn:factor=4",
    "selfextend",  # group 16, window 1024 (the LongLM README's rule for 8k -> 32k)
    "dca",  # chunk 3L/4 = 6144, window L/16 = 512 (ChunkLlama's replace_with_chunkllama)
    "rerope:window=512",
    "none+tokenselect@2688",  # the paper's 128 initial + 2048 selected + 512 local, contiguous positions
    "none+infinipot@3584",  # |C| = 3584 + a 512 chunk = the paper's 4k pot |M|, CR-RoPE positions
)


def _stage(task: str, lengths: tuple[int, ...], samples: int = 1) -> ml_collections.ConfigDict:
    stage = ml_collections.ConfigDict()
    stage.task = task  # a grid task (lcm.evals.registry.TASKS) or "perplexity"
    stage.lengths = lengths
    stage.samples = samples
    return stage


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown extrapolation_32k variant {arg!r}; choose one of ['tiny']")
    tiny = arg == "tiny"
    cfg = ml_collections.ConfigDict()
    cfg.job = "extrapolation"  # a name in lcm.cli.JOBS
    cfg.model = "smollm2"  # registered name, GGUF file or HF folder
    cfg.dtype = "float32"
    cfg.chunk_size = 512  # prefill chunk (tokens)
    cfg.seed = 0  # sample seed: passkey keys and depths, RULER draws
    cfg.chat = True  # chat template for the RULER-style tasks (passkey is a plain completion prompt)
    cfg.perplexity_text = "prose"  # "prose" (the Python reference docs), "code" (typing.py) or a UTF-8 file
    cfg.out_dir = "out/extrapolation_tiny" if tiny else "out/extrapolation_32k"
    cfg.methods = (
        ("none", "selfextend:group=4,window=128", "dca:chunk=384,window=32", "rerope:window=128") if tiny else METHODS
    )
    cfg.stage = ml_collections.ConfigDict()
    if tiny:
        cfg.stage.passkey = _stage("passkey", (512, 1024), 2)
        cfg.stage.tasks = _stage("niah_single_1", (512,), 1)
        cfg.stage.perplexity = _stage("perplexity", (512, 1024))
        cfg.stages = ("passkey", "tasks", "perplexity")
        return cfg
    cfg.stage.passkey_16k = _stage("passkey", (16384,), 10)
    cfg.stage.passkey_8k = _stage("passkey", (8192,), 10)
    cfg.stage.niah_16k = _stage("niah", (16384,), 5)
    cfg.stage.niah_single_16k = _stage("niah_single_1", (16384,), 5)
    cfg.stage.niah_multikey_16k = _stage("niah_multikey_1", (16384,), 5)
    cfg.stage.vt_16k = _stage("vt", (16384,), 5)
    cfg.stage.passkey_32k = _stage("passkey", (32768,), 5)
    cfg.stage.perplexity = _stage("perplexity", (8192, 16384, 32768))
    # in this order; --config.stages=passkey_16k runs one
    cfg.stages = (
        "passkey_16k",
        "passkey_8k",
        "niah_16k",
        "niah_single_16k",
        "niah_multikey_16k",
        "vt_16k",
        "passkey_32k",
        "perplexity",
    )
    return cfg
