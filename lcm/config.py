"""Experiment configs: Python files with ``get_config(arg=None)`` returning an ``ml_collections.ConfigDict``.

``load_config("configs/quickstart.py:small", ["--config.passkey.trials=3"])`` imports the file, calls
``get_config("small")``, locks the dict and applies ``--config.a.b=value`` overrides, parsing each value as the
type of the field it replaces (comma-separated for sequences). Unknown fields and unparsable values are one-line
errors that name the field.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections


def _import_file(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"lcm_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import config file {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _join_spec_parameters(items: list[str]) -> list[str]:
    """Comma-split specs rejoined: in ``yarn:factor=2,beta_fast=16,none`` the ``k=v`` pieces without a ``:`` are
    parameters of the spec before them (``NAME[:k=v,...]``, the grammar of ``--rope`` and ``--policy``)."""
    specs: list[str] = []
    for item in items:
        if specs and ":" in specs[-1] and "=" in item and ":" not in item:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def _parse_like(field: str, old: Any, text: str) -> Any:
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, list | tuple):
            items = [s.strip() for s in text.split(",") if s.strip()]
            kind = type(old[0]) if old else str
            if kind is str:
                return tuple(_join_spec_parameters(items))
            return tuple(_parse_like(field, kind(), s) for s in items)
        if old is None or isinstance(old, str):
            return text
    except ValueError:
        raise ValueError(f"--config.{field}={text!r}: expected a value of type {type(old).__name__}") from None
    raise ValueError(f"--config.{field} is a {type(old).__name__}; it cannot be set from the command line")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"bad override {item!r}; write --config.FIELD=VALUE")
        field, text = item[len("--config.") :].split("=", 1)
        *parents, leaf = field.split(".")
        node = cfg
        for name in parents:
            if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
                raise ValueError(f"unknown config field {field!r}; top-level fields: {sorted(cfg.keys())}")
            node = node[name]
        if leaf not in node:
            raise ValueError(f"unknown config field {field!r}; fields here: {sorted(node.keys())}")
        with node.unlocked():
            node[leaf] = _parse_like(field, node[leaf], text)
    return cfg


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``PATH[:ARG]`` -> the locked ConfigDict with overrides applied."""
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path_text!r} does not exist")
    module = _import_file(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path_text!r} defines no get_config()")
    cfg = module.get_config(arg) if arg else module.get_config()
    cfg = ml_collections.ConfigDict(cfg)
    cfg.lock()
    return apply_overrides(cfg, overrides)
