"""Params presets: a small YAML of overrides applied with ``dvc exp run -S``.

A preset (e.g. ``params/fracatlas.yaml``) holds only what differs from
``params.yaml``. It is checked against the typed config first (a bad key fails
here, by name), then flattened into ``-S key=value`` pairs so DVC records the
run as an experiment with exactly those params: reproducible, and comparable
with ``dvc exp show``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bonefrac.config import ConfigError, load_params


def load_preset(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: preset file not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of params sections")
    return data


def flatten(overrides: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mapping → dotted keys; lists and scalars are leaves."""
    out: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(flatten(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def _present(tree: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def set_args(preset: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    """``-S key=value`` arguments for ``dvc exp run``, after validating the merged params.

    DVC applies them with Hydra's override grammar, which refuses ``key=value`` for a key
    that ``params.yaml`` does not spell out (a setting left at its typed default, e.g.
    ``evaluate.calibration``): such keys are added with ``+key=value``.
    """
    overrides = load_preset(preset)
    load_params(params_path, overrides=overrides)  # raises ConfigError naming the bad key
    written = yaml.safe_load(Path(params_path).read_text()) or {}
    args: list[str] = []
    for key, value in flatten(overrides):
        rendered = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
        args += ["-S", f"{'' if _present(written, key) else '+'}{key}={rendered}"]
    return args
