"""Trained Locret retaining heads on disk: an orbax checkpoint of their parameters and a JSON sidecar.

    heads_dir("smollm2")                      # $LCM_LOCRET_DIR/smollm2, else <cache_dir>/locret/smollm2
    save_retaining_heads(heads, "smollm2", {"metrics": ...})
    model = load_retaining_heads(model, "smollm2")   # the model with the heads attached

A folder holds ``params/`` (orbax ``StandardCheckpointer``, the heads' ``nnx.State`` as a pure dict) and
``locret.json`` (model name, head shapes, hidden width, a hash of the model config, training metrics). The
sidecar is written last, so a folder without it holds no usable heads. Models are named as :mod:`lcm.io.fetch`
names them: a registered name, or the stem of a file or folder path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lcm.io.fetch import MODELS, cache_dir
from lcm.models.llama import Llama, LlamaConfig
from lcm.models.retaining import RetainingHeads, attach_retaining_heads

ENV_VAR = "LCM_LOCRET_DIR"  # overrides the root folder of all trained heads
METADATA_FILE = "locret.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
_SHAPE_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")  # what the heads' shapes depend on


def model_name(spec: str | os.PathLike[str]) -> str:
    """The name heads are filed under: a registered model's name, else the stem of the file or folder path."""
    if isinstance(spec, str) and spec in MODELS:
        return spec
    name = Path(spec).expanduser().stem
    if not name:
        raise ValueError(f"cannot name model {str(spec)!r}; give a registered name {sorted(MODELS)} or a path")
    return name


def heads_dir(spec: str | os.PathLike[str]) -> Path:
    """``$LCM_LOCRET_DIR/<name>`` if the variable is set, else ``<cache_dir>/locret/<name>``."""
    override = os.environ.get(ENV_VAR)
    root = Path(override).expanduser() if override else cache_dir() / "locret"
    return root / model_name(spec)


def config_hash(config: LlamaConfig) -> str:
    """A short hash of the whole model config (recorded, not enforced: another RoPE variant keeps the heads)."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shapes(config: LlamaConfig) -> dict[str, int]:
    return {name: getattr(config, name) for name in _SHAPE_FIELDS}


def save_retaining_heads(
    heads: RetainingHeads,
    model_name_or_path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    *,
    directory: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``heads`` to ``directory`` (default :func:`heads_dir` of the model), replacing what was there; returns
    the folder. ``metadata`` (JSON-ready: metrics, the training config) goes into the sidecar."""
    folder = Path(directory).expanduser().resolve() if directory else heads_dir(model_name_or_path).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METADATA_FILE).unlink(missing_ok=True)  # until the new sidecar is written, the folder holds no heads
    params = folder / PARAMS_DIR
    if params.exists():
        shutil.rmtree(params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params, nnx.to_pure_dict(nnx.state(heads)))
    checkpointer.wait_until_finished()
    sidecar = {
        "format": FORMAT_VERSION,
        "model": model_name(model_name_or_path),
        "hidden_width": heads.hidden_width,
        **_shapes(heads.config),
        "hidden_size": heads.config.hidden_size,
        "config_hash": config_hash(heads.config),
        **(metadata or {}),
    }
    partial = folder / (METADATA_FILE + ".partial")
    partial.write_text(json.dumps(sidecar, indent=2, default=float) + "\n")
    os.replace(partial, folder / METADATA_FILE)
    return folder


def read_metadata(folder: Path) -> dict[str, Any]:
    return json.loads((folder / METADATA_FILE).read_text())


def load_heads_for(
    config: LlamaConfig, model_spec: str | os.PathLike[str], *, directory: str | os.PathLike[str] | None = None
) -> RetainingHeads:
    """The trained heads of ``model_spec`` for a model with ``config``; one-line errors when there are none or
    their shapes do not fit."""
    folder = Path(directory).expanduser().resolve() if directory else heads_dir(model_spec).resolve()
    name = model_name(model_spec)
    if not (folder / METADATA_FILE).is_file():
        command = "lcm run configs/locret_smollm2.py" + ("" if name == "smollm2" else f" --config.model={model_spec}")
        raise FileNotFoundError(
            f"no trained Locret retaining heads for model {name!r} in {folder}; train them with: {command}"
        )
    meta = read_metadata(folder)
    saved = {field: meta.get(field) for field in _SHAPE_FIELDS}
    if saved != _shapes(config):
        raise ValueError(
            f"the Locret retaining heads in {folder} were trained for {saved}, but model {name!r} has {_shapes(config)}"
        )
    width = meta["hidden_width"]
    abstract = nnx.eval_shape(lambda: RetainingHeads(config, width, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore(folder / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def load_retaining_heads(
    model: Llama, model_spec: str | os.PathLike[str], *, directory: str | os.PathLike[str] | None = None
) -> Llama:
    """``model`` with the trained retaining heads of ``model_spec`` attached (``model`` itself is unchanged)."""
    return attach_retaining_heads(model, load_heads_for(model.config, model_spec, directory=directory))


def model_for_policy(model: Llama, model_spec: str | os.PathLike[str], policy: Any) -> Llama:
    """``model`` ready for a KV ``policy``: with its trained retaining heads attached when the policy ranks by them
    (Locret), else as it is."""
    return load_retaining_heads(model, model_spec) if getattr(policy, "retaining", False) else model
