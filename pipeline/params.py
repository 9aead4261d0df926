"""params.yaml loading with dotted overrides (``-S train.steps=50``), as ``dvc exp run -S`` does.

The result is the typed schema (pipeline/schema.py): stages read attributes of their section; every
check lives in the schema. CLI flags are aliases for overrides (``values``), applied before the check."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .consumer import untrusted
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
        raw = untrusted.parse_yaml(untrusted.read_text(path, "params file", limit=1 << 20), f"params file {path}") or {}
        if not isinstance(raw, dict):
            raise PipelineError(f"params file {path} holds a {type(raw).__name__}, not a mapping of sections")
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
    value = untrusted.parse_yaml(raw, f"override {assignment!r}") if raw else ""
    _assign(params, key, value)


def _assign(params: dict, key: str, value: Any) -> None:
    node = params
    parts = key.strip().split(".")
    if not all(parts):
        raise PipelineError(f"override {key!r}: an empty key")
    for part in parts[:-1]:
        if not isinstance(node, dict):
            raise PipelineError(f"override {key!r}: {part!r} is not inside a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value
