"""Parameter overlays: a partial params.yaml (e.g. configs/full_scale.yaml) turned into
``dvc exp run -S key=value`` arguments, after checking that the merged
parameters are valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from latentlab.config import parse_params
from latentlab.errors import ConfigError


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def leaves(overlay: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in overlay.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(leaves(value, dotted))
        else:
            out[dotted] = value
    return out


def set_dotted(params: dict[str, Any], assignment: str) -> None:
    """Apply ``KEY=VALUE`` to ``params`` in place: ``KEY`` dotted as in ``dvc exp run -S``
    (missing sections are created), ``VALUE`` read as YAML (``[32]``, ``null``, ``5``).
    Raises ConfigError naming the assignment when it is not ``KEY=VALUE``, walks through a
    key that is not a section, or has a value that is not YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"{assignment!r}: expected KEY=VALUE, e.g. train.zoo.deep.training.epochs=40")
    *parents, leaf = key.split(".")
    node = params
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{assignment!r}: {'.'.join(parents[: depth + 1])} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{assignment!r}: the value is not YAML ({exc.__class__.__name__})") from None


def overlay_args(params_path: Path, overlay_path: Path) -> list[str]:
    """``-S key=value`` arguments for ``dvc exp run`` that apply ``overlay_path``."""
    base = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))
    try:
        overlay = yaml.safe_load(Path(overlay_path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{overlay_path}: cannot read ({exc.strerror})") from None
    parse_params(merge(base, overlay), f"{params_path} + {overlay_path}")
    args: list[str] = []
    for key, value in leaves(overlay).items():
        # DVC parses ``-S`` with Hydra's override grammar: a plain ``key=value`` may only change
        # a key params.yaml already has, ``++key=value`` adds it or changes it (an overlay may
        # set keys params.yaml leaves at their defaults, e.g. a training lr_schedule).
        # The value is read as YAML: JSON is valid YAML, and null stays null.
        args += ["-S", f"++{key}={json.dumps(value, separators=(',', ':'))}"]
    return args
