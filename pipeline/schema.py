"""The typed schema of params.yaml, checked before any stage does work (pydantic, the way Olive types its
pass configs). Unknown keys are refused with the closest valid key; wrong types and out-of-range values
with one line naming the key, the value and what is allowed. ``-S`` overrides go through the same check.

Each stage declares its own config class beside its build (``stages/<name>.py``); this module holds
the building blocks and the sections that belong to no stage (eval, budgets, gate, tune), and
assembles the whole file's schema from the stages (:func:`params_model`).
"""

from __future__ import annotations

import difflib
import functools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from . import registry
from .errors import PipelineError
from .registry import ARTIFACTS, TUNABLE, index
from .scoring import metrics as metric_table

PosInt = Field(ge=1)
# The metrics a budget can bound (max_<metric> / min_<metric>): pipeline/scoring/metrics.py's table.
BUDGET_METRICS = metric_table.BUDGETED


class Section(BaseModel):
    # a NaN bound compares false with every figure: it would switch its check off, so it is refused
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def power_of_two(v: int) -> int:
    if v < 16 or v & (v - 1):
        raise ValueError("must be a power of two, at least 16")
    return v


class Eval(Section):
    ctx: int = Field(128, ge=4)  # window length; the second half of each window is scored
    max_windows: int = Field(0, ge=0)  # 0 = every window
    score_last: int = Field(0, ge=0)  # > 0: only the last N tokens of each window are scored (long contexts)

    @model_validator(mode="after")
    def _scored_inside(self):
        if self.score_last >= self.ctx:
            raise ValueError(f"score_last ({self.score_last}) must be less than ctx ({self.ctx})")
        return self

    @property
    def scored(self) -> int:
        """Tokens scored per window: the second half, or the last ``score_last``."""
        return self.score_last or self.ctx - self.ctx // 2


class Tasks(Section):
    """lm-evaluation-harness tasks `pipeline evaluate` scores beside the held-out text (pipeline/scoring/tasks.py):
    ``cloze`` and ``next_word`` are built from the held-out text (offline); any other name is an lm-eval
    task (its data from the hub: needs the network)."""
    names: list[str] = []
    docs: int = Field(200, ge=8)  # documents of each local task


class Gate(Section):
    metrics_dir: str = "metrics"
    max_ppl_regression_pct: float = Field(0.5, ge=0)
    max_drift_regression_pct: float = Field(0.25, ge=0)
    max_size_regression_pct: float = Field(2.0, ge=0)


# The figures a tune budget can bound: the scored ones plus the decode rate tune measures itself.
TUNE_METRICS = metric_table.TUNED
Knobs = dict[str, list[str | int | float | bool]]


class Tune(Section):
    """`pipeline tune` (pipeline/tune/): the smallest or fastest recipe for one artifact inside a budget,
    each candidate a DVC experiment. ``space`` and ``promote`` are per artifact: knob (a key of that
    artifact's params section, dotted below it) -> the values to try."""
    artifact: str = "int4"  # a stage that declares ``tunable`` knobs
    objective: Literal["size", "decode", "both"] = "size"
    strategy: Literal["greedy", "grid", "random"] = "greedy"
    budget: dict[str, float] = {}
    space: dict[str, Knobs] = {}
    promote: dict[str, Knobs] = {}
    max_candidates: int = Field(40, ge=1)
    workers: int = Field(2, ge=1)
    seed: int = Field(0, ge=0)
    decode_tokens: int = Field(64, ge=8)

    @field_validator("budget")
    @classmethod
    def _budget(cls, budget):
        for key in budget:
            bound, _, metric = key.partition("_")
            if bound not in ("max", "min") or metric not in TUNE_METRICS:
                valid = [f"{b}_{m}" for b in ("max", "min") for m in TUNE_METRICS]
                raise ValueError(_unknown(f"tune.budget.{key}", key, valid, "budget key"))
        return budget

    @field_validator("artifact")
    @classmethod
    def _tunable(cls, artifact):
        if artifact not in TUNABLE:
            raise ValueError(_unknown("tune.artifact", artifact, TUNABLE, "tunable artifact"))
        return artifact

    @field_validator("space", "promote")
    @classmethod
    def _per_artifact(cls, knobs, info):
        for name, table in knobs.items():
            if name not in TUNABLE:
                raise ValueError(_unknown(f"tune.{info.field_name}.{name}", name, TUNABLE, "tunable artifact"))
            for knob, values in table.items():
                if knob not in index()[name].tunable:
                    raise ValueError(_unknown(f"tune.{info.field_name}.{name}.{knob}", knob, index()[name].tunable,
                                              f"knob of {name} (its stage's `tunable`)"))
                if not values:
                    raise ValueError(f"tune.{info.field_name}.{name}.{knob} has no values")
                if len(set(map(repr, values))) != len(values):
                    raise ValueError(f"tune.{info.field_name}.{name}.{knob} lists a value twice")
        return knobs


Budgets = dict[str, dict[str, float | bool]]


class ConsumerParams(Section):
    """What `evaluate`, `gate` and `report` read: enough to run on a machine with artifacts and no
    params.yaml (a consumer's), where every section takes its default."""
    eval: Eval = Eval()
    tasks: Tasks = Tasks()
    budgets: Budgets = {}
    gate: Gate = Gate()

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, budgets):
        return _check_budgets(budgets)


class Shared(ConsumerParams):
    """The sections that belong to no stage: read by evaluate, gate, report and tune."""
    tune: Tune = Tune()


class _Part(Shared):
    # A verb checks its own stage's sections; the other stages' are checked by those stages (and by
    # `pipeline check-params`), so that a verb imports, and so depends on, its own stage only.
    model_config = ConfigDict(extra="allow")


def _sections(name: str) -> dict:
    """The params sections stage ``name`` reads, each with its config class (declared beside the stage)."""
    stage = registry.load(name)
    if stage.section:
        return {stage.section: stage.config}
    return {field: info.annotation for field, info in stage.config.model_fields.items()}


@functools.lru_cache(maxsize=None)
def params_model(stages: tuple[str, ...] | None = None) -> type[BaseModel]:
    """params.yaml's schema, assembled from the stage declarations: the shared sections and the sections
    of ``stages``; None: every stage's, and no other key."""
    fields: dict = {}
    for name in registry.STAGES if stages is None else stages:
        fields.update({section: (cls, ...) for section, cls in _sections(name).items()})
    if stages is None:
        fields["budgets"] = (Budgets, ...)  # the whole file names its budgets
    return create_model("Params", __base__=Shared if stages is None else _Part, **fields)


def __getattr__(name: str):
    if name == "Params":  # the whole file's schema (it imports every stage: built when first asked for)
        return params_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_budgets(budgets: Budgets) -> Budgets:
    for name, budget in budgets.items():
        if name not in ARTIFACTS:
            raise ValueError(_unknown(f"budgets.{name}", name, ARTIFACTS, "artifact name"))
        for key, value in budget.items():
            if key == "report_only":
                if not isinstance(value, bool):
                    raise ValueError(f"budgets.{name}.report_only must be true or false")
                continue
            bound, _, metric = key.partition("_")
            if bound not in ("max", "min") or metric not in BUDGET_METRICS:
                valid = [f"{b}_{m}" for b in ("max", "min") for m in BUDGET_METRICS] + ["report_only"]
                raise ValueError(_unknown(f"budgets.{name}.{key}", key, valid, "budget key"))
            if isinstance(value, bool):
                raise ValueError(f"budgets.{name}.{key} must be a number, not {value}")
    return budgets


def _unknown(where: str, key: str, valid, what: str) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(sorted(valid))}"
    return f"{where}: unknown {what} ({hint})"


def _model_at(loc: tuple, schema: type[BaseModel]) -> type[BaseModel] | None:
    """The schema class that holds the key at ``loc`` (for suggesting valid keys)."""
    model: type[BaseModel] | None = schema
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


UNION_TAGS = ("float", "bool", "int", "str")  # pydantic names a union's member in the error's location


def _message(err: dict, source: str, schema: type[BaseModel]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    while len(loc) > 1 and loc[-1] in UNION_TAGS:
        loc = loc[:-1]
    if not loc:  # about a key itself (one pydantic cannot read as text)
        return f"{source}: a key {str(err.get('input'))[:40]!r}: {err['msg']}"
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        model = _model_at(loc, schema)
        valid = model.model_fields if model else []
        close = difflib.get_close_matches(loc[-1], list(valid), n=1, cutoff=0.6)
        prefix = ".".join(loc[:-1])
        hint = (f"did you mean {(prefix + '.' if prefix else '') + close[0]}?" if close
                else f"valid keys here: {', '.join(valid)}")
        return f"{source}: unknown key {key} ({hint})"
    if err["type"] == "missing":
        return f"{source}: {key} is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith(f"{loc[0]}."):  # our own validators name the key themselves
        return f"{source}: {msg}"
    if isinstance(err.get("input"), dict):  # a check across a section's keys
        return f"{source}: {key}: {msg}"
    return f"{source}: {key} = {err.get('input')!r}: {msg}"


def validate(params: dict, source: str = "params.yaml", schema: type[BaseModel] | None = None):
    """The params as typed objects (``params.int4.block_size``); one PipelineError line for the first problem.
    ``schema``: default, the whole file's."""
    schema = schema or params_model()
    if not isinstance(params, dict):
        raise PipelineError(f"{source}: expected a mapping of sections, not {type(params).__name__}")
    try:
        return schema.model_validate(params)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise PipelineError(_message(errors[0], source, schema) + more) from None
