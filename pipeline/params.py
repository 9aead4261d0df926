"""params.yaml loading with dotted overrides (``-S train.steps=50``), as ``dvc exp run -S`` does.

The result is the typed schema (pipeline/schema.py): stages read attributes of their section; every
check lives in the schema. CLI flags are aliases for overrides (``values``), applied before the check."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, Any] | None = None, required: bool = True,
                stages: tuple[str, ...] | None = None):
    """The checked params. ``overrides``: ``key=value`` strings (values parsed as YAML, as DVC does);
    ``values``: dotted keys with values already typed (from CLI flags). ``stages``: check the shared
    sections and these stages' (a build verb: its own; evaluate, gate, report: none); None: the whole
    file. Without a params file and with ``required`` false (evaluate, gate, report on a consumer's
    machine), the consumer sections' defaults."""
    from .schema import ConsumerParams, params_model, validate

    path = Path(path) if path else DEFAULT_PARAMS
    if not path.is_file():
        if required or path != DEFAULT_PARAMS:
            raise PipelineError(f"params file {path} not found: run from the project root or pass --params")
        raw, schema, where = {}, ConsumerParams, "defaults (no params.yaml)"
    else:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PipelineError(f"params file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        raw, schema, where = copy.deepcopy(raw), params_model(stages), str(path)
    for item in overrides:
        set_dotted(raw, item)
    for key, value in (values or {}).items():
        _assign(raw, key, value)
    given = list(overrides) + [f"{k}={v}" for k, v in (values or {}).items()]
    return validate(raw, where + (" with -S " + " ".join(given) if given else ""), schema)


def set_dotted(params: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise PipelineError(f"override {assignment!r} must look like section.key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        raise PipelineError(f"override {assignment!r}: the value is not valid YAML") from None
    _assign(params, key, value)


def _assign(params: dict, key: str, value: Any) -> None:
    node = params
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value
