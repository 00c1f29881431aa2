"""The model families lcm runs, by config type: what loaders, the Engine's callers and the evals use when they do not
care which family a model is (a model answers the same calls: ``init_cache``, ``hidden_states``, ``logits``,
``train_forward``, ``rope_tables``; its config has ``vocab_size``, ``max_position_embeddings``, ``with_rope``)."""

from __future__ import annotations

from typing import Any

from flax import nnx

from lcm.models import gemma3, llama

Config = llama.LlamaConfig | gemma3.Gemma3Config
Model = llama.Llama | gemma3.Gemma3

_MODULES: dict[type, Any] = {llama.LlamaConfig: llama, gemma3.Gemma3Config: gemma3}
PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    name: (cls, preset) for cls, module in _MODULES.items() for name, preset in module.PRESETS.items()
}


def _module(cfg: Config) -> Any:
    if type(cfg) not in _MODULES:
        raise TypeError(f"no model family for config type {type(cfg).__name__}; lcm has {sorted(map(str, _MODULES))}")
    return _MODULES[type(cfg)]


def preset(name: str, **overrides: Any) -> Config:
    """The config of a named architecture of any family (``smollm2-135m``, ``gemma3-270m``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cls, values = PRESETS[name]
    return cls(**(values | overrides))


def abstract_model(cfg: Config) -> Model:
    """Shapes and sharding metadata only, no memory."""
    return _module(cfg).abstract_model(cfg)


def random_model(cfg: Config, seed: int = 0) -> Model:
    return _module(cfg).random_model(cfg, seed)


def with_config(model: Model, cfg: Config) -> Model:
    """The same parameters under another config of the same family (e.g. another RoPE variant)."""
    if type(cfg) is not type(model.config):
        raise TypeError(f"a {type(model.config).__name__} model cannot take a {type(cfg).__name__}")
    graphdef, _ = nnx.split(abstract_model(cfg))
    return nnx.merge(graphdef, nnx.state(model))
