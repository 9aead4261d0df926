"""params.yaml loading with dotted overrides (``-S train.steps=50``), as ``dvc exp run -S`` does."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    path = Path(path) if path else DEFAULT_PARAMS
    if not path.is_file():
        raise PipelineError(f"params file {path} not found: run from the project root or pass --params")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"params file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    params = copy.deepcopy(params)
    for item in overrides:
        set_dotted(params, item)
    from .schema import validate

    where = str(path) + (" with -S " + " ".join(overrides) if overrides else "")
    return validate(params, where)


def set_dotted(params: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise PipelineError(f"override {assignment!r} must look like section.key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        raise PipelineError(f"override {assignment!r}: the value is not valid YAML") from None
    node = params
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def section(params: dict, name: str) -> dict:
    value = params.get(name)
    if not isinstance(value, dict):
        raise PipelineError(f"params.yaml has no section {name!r}")
    return value


def get(params: dict, dotted: str, default: Any = None) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
