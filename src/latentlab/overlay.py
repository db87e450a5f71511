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
