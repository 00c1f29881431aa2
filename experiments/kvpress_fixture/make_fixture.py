"""Reference fixture from NVIDIA kvpress 0.5.5: which KV-cache entries its presses keep on a tiny random Llama.

Runs in a separate virtualenv (see README.md beside this file), never in lcm's environment: kvpress pins its own
transformers. It writes

* ``tests/fixtures/kvpress/tiny_llama/`` -- a tiny random ``LlamaForCausalLM`` (config.json + model.safetensors);
* ``tests/fixtures/kvpress/kept.json`` -- for KnormPress, TOVAPress, SnapKVPress and PyramidKVPress, the positions
  each press keeps for every layer and KV head on a fixed 96-token prompt, the scores kvpress computed, and the
  smallest gap between the lowest kept and the highest dropped score of any head (how far from a tie the choice is).

The presses are kvpress's own classes applied as its pipeline applies them (``with press(model):
model.model(input_ids=..., past_key_values=DynamicCache())``). The kept positions are read back from the compressed
cache itself: each kept key (and value) vector is matched against the uncompressed cache of the same layer and KV head,
and must equal exactly one original position.

    /tmp/kvpress_env/bin/python experiments/kvpress_fixture/make_fixture.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import kvpress
import torch
import transformers
from kvpress import KnormPress, PyramidKVPress, SnapKVPress, TOVAPress
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "kvpress"
MODEL_DIR = OUT / "tiny_llama"

PROMPT_LENGTH = 96
PROMPT_SEED = 1234
WEIGHT_STD = 0.3  # well above HF's 0.02: attention far from uniform; of 0.15-0.3 a wide relative score gap
# PyramidKV: on a 96-token prompt with compression_ratio=0.5, window_size=8 keeps kvpress off its SnapKV fallback
# (q_len >= max_num >= min_num >= window_size holds: 96 >= 88 >= 8 >= 8) and gives budgets 88/61/35/8 over 4 layers.
WINDOW = 8
KERNEL = 5
MATCH_TOL = 1e-6


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=WEIGHT_STD,
        torch_dtype="float32",
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm scales, so a loader must read them
            else:
                p.copy_(WEIGHT_STD * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.eval()


def prompt_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(0, 256, (1, PROMPT_LENGTH), generator=g)


def prefill(model: LlamaForCausalLM, ids: torch.Tensor, press=None) -> DynamicCache:
    """kvpress's pipeline prefill: the decoder without the LM head, the press as a context manager."""
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
    return cache


def record_scores(press) -> dict[int, dict]:
    """Wrap the press instance's own ``score`` to keep what kvpress computed per layer (and whether the eager
    attention weights reached it); the scores themselves are untouched."""
    seen: dict[int, dict] = {}
    original = press.score

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = original(module, hidden_states, keys, values, attentions, kwargs)
        seen[module.layer_idx] = {"scores": s.detach().clone(), "had_attentions": attentions is not None}
        return s

    press.score = score
    return seen


def kept_positions(full: torch.Tensor, full_v: torch.Tensor, kept: torch.Tensor, kept_v: torch.Tensor) -> list[int]:
    """Positions in ``full`` [k_len, d] of each row of ``kept`` [n, d]; every row must match exactly one."""
    dist = torch.cdist(kept.double(), full.double())  # [n, k_len]
    positions = []
    for row in range(kept.shape[0]):
        hits = torch.nonzero(dist[row] < MATCH_TOL).flatten().tolist()
        assert len(hits) == 1, f"kept key {row} matches {len(hits)} original positions"
        pos = hits[0]
        assert torch.equal(kept[row], full[pos]), "kept key is not bitwise the original"
        assert torch.equal(kept_v[row], full_v[pos]), "kept value is not the original's value"
        positions.append(pos)
    assert len(set(positions)) == len(positions), "a position is kept twice"
    return sorted(positions)


def main() -> None:
    model = build_model()
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    ids = prompt_ids()
    reference = prefill(model, ids)
    n_layers = model.config.num_hidden_layers
    full_keys = [reference.layers[i].keys[0] for i in range(n_layers)]  # [kv_heads, k_len, d], post-RoPE
    full_values = [reference.layers[i].values[0] for i in range(n_layers)]

    presses = {
        "knorm": (KnormPress, {"compression_ratio": 0.5}),
        "tova": (TOVAPress, {"compression_ratio": 0.5}),
        "snapkv": (SnapKVPress, {"compression_ratio": 0.5, "window_size": WINDOW, "kernel_size": KERNEL}),
        "pyramidkv": (
            PyramidKVPress,
            {"compression_ratio": 0.5, "window_size": WINDOW, "kernel_size": KERNEL, "beta": 20},
        ),
    }
    out: dict = {
        "kvpress_version": kvpress.__version__ if hasattr(kvpress, "__version__") else _dist_version("kvpress"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model": "tiny_llama (this folder), float32, attn_implementation=eager",
        "prompt_seed": PROMPT_SEED,
        "prompt_ids": ids[0].tolist(),
        "presses": {},
    }
    for name, (cls, params) in presses.items():
        press = cls(**params)
        seen = record_scores(press)
        cache = prefill(model, ids, press)
        kept, budgets, gaps, rel_gaps, scores, had_attn = [], [], [], [], [], []
        for layer in range(n_layers):
            k, v = cache.layers[layer].keys[0], cache.layers[layer].values[0]
            layer_kept = [
                kept_positions(full_keys[layer][h], full_values[layer][h], k[h], v[h]) for h in range(k.shape[0])
            ]
            s = seen[layer]["scores"][0].double()  # [kv_heads, k_len]
            layer_gaps, layer_rel = [], []
            for h, pos in enumerate(layer_kept):
                mask = torch.zeros(s.shape[-1], dtype=torch.bool)
                mask[pos] = True
                if (~mask).any():
                    low_kept, high_dropped = s[h][mask].min(), s[h][~mask].max()
                    gap = (low_kept - high_dropped).item()
                    assert gap > 0, f"{name} layer {layer} head {h}: kept set is not the top scores"
                    layer_gaps.append(gap)
                    layer_rel.append(gap / max(low_kept.abs().item(), high_dropped.abs().item()))
            kept.append(layer_kept)
            budgets.append(len(layer_kept[0]))
            gaps.append(min(layer_gaps) if layer_gaps else None)
            rel_gaps.append(min(layer_rel) if layer_rel else None)
            scores.append(seen[layer]["scores"][0].tolist())
            had_attn.append(seen[layer]["had_attentions"])
        finite = [g for g in gaps if g is not None and math.isfinite(g)]
        out["presses"][name] = {
            "class": cls.__name__,
            "params": params,
            "n_kept_per_layer": budgets,
            "kept": kept,
            "score_gap_min": min(finite) if finite else None,
            "score_gap_min_per_layer": gaps,
            # the same gap over the larger |score| of the two it separates: how far from a tie in float terms
            "relative_score_gap_min": min(g for g in rel_gaps if g is not None),
            "scores": scores,
            "attentions_passed_to_score": had_attn,
        }
        print(
            f"{name:10s} n_kept={budgets} score_gap_min={out['presses'][name]['score_gap_min']:.3e} "
            f"relative={out['presses'][name]['relative_score_gap_min']:.3e} gaps={[f'{g:.2e}' for g in gaps]}"
        )
    (OUT / "kept.json").write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", OUT / "kept.json", "and", MODEL_DIR)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
