"""The typed schema of params.yaml, checked before any stage does work (pydantic, the way Olive types its
pass configs). Unknown keys are refused with the closest valid key; wrong types and out-of-range values
with one line naming the key, the value and what is allowed. ``-S`` overrides go through the same check.
"""

from __future__ import annotations

import difflib
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import PipelineError
from .registry import ARTIFACTS, TUNABLE, index

PosInt = Field(ge=1)
# The metrics a budget can bound (max_<metric> / min_<metric>), as evaluate and the checkpoint write them.
BUDGET_METRICS = ("drift_pct", "kld_mean", "kld_p99", "top1_agreement", "size_ratio", "ppl", "ref_ppl",
                  "ppl_ratio_vs_unigram", "heldout_ppl", "parity_max_abs_logit_delta", "parity_greedy_prefix_match",
                  "parity_batch_rows_prefix_match", "parity_decode_max_abs_logit_delta", "parity_decode_kld_mean",
                  "parity_decode_top1_agreement")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _power_of_two(v: int) -> int:
    if v < 16 or v & (v - 1):
        raise ValueError("must be a power of two, at least 16")
    return v


class Fractions(Section):
    train: float = Field(gt=0, lt=1)
    calibration: float = Field(gt=0, lt=1)
    eval: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _sum(self):
        if abs(self.train + self.calibration + self.eval - 1.0) > 1e-6:
            raise ValueError("train + calibration + eval must sum to 1")
        return self


class Data(Section):
    source: str = Field(min_length=1)
    text_column: str = Field(min_length=1)
    seed: int = Field(ge=0)
    fractions: Fractions


class Outliers(Section):
    """Outlier activation channels moved into the model without changing its function
    (pipeline/outliers.py): the hard case for quantization that real LLMs are and the built-in model
    is not. ``channels: 0`` = none."""
    channels: int = Field(0, ge=0)
    scale: float = Field(64.0, gt=1)
    seed: int = Field(0, ge=0)

    @field_validator("scale")
    @classmethod
    def _exact(cls, v: float) -> float:
        import math

        if 2.0 ** round(math.log2(v)) != v:
            raise ValueError("must be a power of two (so the float model stays the same function, exactly)")
        return v


class Model(Section):
    source: str = Field(min_length=1)
    revision: str = "main"
    # Pickled weights (pytorch_model.bin) can run arbitrary code when loaded: refused unless this says so.
    allow_unsafe_pickle_weights: bool = False
    # Code from the checkpoint's repository is never run unless this says so.
    trust_remote_code: bool = False
    outliers: Outliers = Outliers()


class Tokenizer(Section):
    vocab_size: int = Field(ge=260, le=1 << 20)  # the 256-byte alphabet + 3 special tokens, at least


class Train(Section):
    seed: int = Field(ge=0)
    hidden_size: int = PosInt
    intermediate_size: int = PosInt
    layers: int = PosInt
    heads: int = PosInt
    kv_heads: int = PosInt
    head_dim: int = Field(ge=2, multiple_of=2)
    max_position_embeddings: int = Field(ge=8)
    seq_len: int = Field(ge=8)
    batch_size: int = PosInt
    steps: int = PosInt
    lr: float = Field(gt=0, le=1)
    warmup: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    threads: int = PosInt
    cpu_code_path: Literal["avx2", "portable", "native"]

    @model_validator(mode="after")
    def _shapes(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len ({self.seq_len}) must not exceed max_position_embeddings "
                             f"({self.max_position_embeddings})")
        return self


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


class Export(Section):
    opset: int = Field(ge=14, le=21)
    greedy_tokens: int = PosInt
    max_abs_logit_delta: float = Field(gt=0)


class Fused(Section):
    model_type: str
    opt_level: Literal[0, 1, 2, 99]
    attention: Literal["gqa", "none"]
    greedy_tokens: int = PosInt


class FP16(Section):
    keep_io_types: list[str]
    op_block_list: list[str]
    node_block_list: list[str]
    greedy_tokens: int = PosInt


class Smoothing(Section):
    enabled: bool
    alpha: float = Field(ge=0, le=1)


class Int8Dynamic(Section):
    parent: Literal["export", "fused"]
    format: Literal["matmulnbits", "qoperator"]
    smoothing: Smoothing = Smoothing(enabled=False, alpha=0.5)
    block_size: int
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]]
    per_channel: bool
    quantize_tied: bool
    tied_block_size: int
    nodes_to_exclude: list[str]
    kv_cache: Literal["float32", "int8"] = "float32"  # int8: ORT's quantized GQA cache, scales from the imatrix
    greedy_tokens: int = PosInt

    _block = field_validator("tied_block_size", "block_size")(_power_of_two)

    def inert(self) -> set[str]:
        """Keys (dotted) that change nothing given the others: `pipeline tune` drops them from a recipe."""
        return ({"smoothing.alpha"} if not self.smoothing.enabled else set()) | (
            {"tied_block_size"} if not self.quantize_tied else set()) | (
            {"block_size", "accuracy_level"} if self.format != "matmulnbits" else {"per_channel"})

    @model_validator(mode="after")
    def _smoothing_needs_nbits(self):
        if self.smoothing.enabled and self.format != "matmulnbits":
            raise ValueError("int8_dynamic.smoothing applies to format matmulnbits only (set smoothing.enabled: false)")
        return self


# Algorithms that read the importance matrix (stage imatrix).
CALIBRATED_INT4 = ("imatrix", "awq")


class Int4(Section):
    parent: Literal["export", "fused"]
    # rtn / k_quant: ORT's MatMulNBitsQuantizer; imatrix / awq: pipeline/nbits.py with the importance
    # matrix (awq also scales input channels by it first, folded into the graph)
    algorithm: Literal["rtn", "k_quant", "imatrix", "awq"]
    awq_alpha: float = Field(0.75, ge=0, le=1)
    int8_fraction: float = Field(0.0, ge=0, le=1)  # imatrix/awq: this share of projections, the most sensitive, 8-bit
    block_size: int
    symmetric: bool
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]]
    quantize_tied: bool
    tied_bits: Literal[4, 8] = 4
    nodes_to_exclude: list[str]
    kv_cache: Literal["float32", "int8"] = "float32"  # int8: ORT's quantized GQA cache, scales from the imatrix
    greedy_tokens: int = PosInt

    _block = field_validator("block_size")(_power_of_two)

    def inert(self) -> set[str]:
        """Keys that change nothing given the others (see Int8Dynamic.inert)."""
        return ({"awq_alpha"} if self.algorithm != "awq" else set()) | ({"tied_bits"} if not self.quantize_tied else set())

    @model_validator(mode="after")
    def _ours_symmetric(self):
        if self.algorithm in CALIBRATED_INT4 and not self.symmetric:
            raise ValueError(f"int4.algorithm {self.algorithm} quantizes symmetrically (set symmetric: true)")
        if self.int8_fraction and self.algorithm not in CALIBRATED_INT4:
            raise ValueError("int4.int8_fraction needs algorithm imatrix or awq (it ranks projections by the "
                             "importance matrix)")
        return self


class TextWindows(Section):
    source: str = Field(min_length=1)
    text_column: str = Field(min_length=1)
    samples: int = PosInt
    seq_len: int = Field(ge=8)
    # ranges and statistics rounded to this many mantissa bits (calibration/rounding.py), so another
    # CPU's last bits give the same artifact; 0 = as ORT computed them
    round_bits: int = Field(4, ge=0, le=20)


class Calibration(TextWindows):
    stride: int = PosInt


class Imatrix(Section):
    """The importance matrix: per projection input channel, mean x^2 and max |x| over calibration text."""
    parent: Literal["export", "fused"]
    calibration: TextWindows


class Exclude(Section):
    lm_head: bool
    activation_matmuls: bool
    nodes: list[str]


class SmoothQuant(Section):
    enabled: bool
    alpha: float = Field(ge=0, le=1)


class Int8Static(Section):
    parent: Literal["export", "fused"]
    calibration: Calibration
    method: Literal["MinMax", "Entropy", "Percentile"]
    percentile: float = Field(gt=50, le=100)
    per_channel: bool
    exclude: Exclude
    smoothquant: SmoothQuant
    quantize_tied: bool
    tied_block_size: int
    tied_accuracy_level: Optional[Literal[0, 1, 2, 3, 4]]
    greedy_tokens: int = PosInt

    _block = field_validator("tied_block_size")(_power_of_two)

    def inert(self) -> set[str]:
        """Keys that change nothing given the others (see Int8Dynamic.inert)."""
        return ({"percentile"} if self.method != "Percentile" else set()) | (
            {"smoothquant.alpha"} if not self.smoothquant.enabled else set()) | (
            {"tied_block_size", "tied_accuracy_level"} if not self.quantize_tied else set())


class Gate(Section):
    metrics_dir: str = "metrics"
    max_ppl_regression_pct: float = Field(0.5, ge=0)
    max_drift_regression_pct: float = Field(0.25, ge=0)
    max_size_regression_pct: float = Field(2.0, ge=0)


# The figures a tune budget can bound: the scored ones plus the decode rate tune measures itself.
TUNE_METRICS = ("drift_pct", "kld_mean", "kld_p99", "top1_agreement", "size_ratio", "decode_tok_s")
Knobs = dict[str, list[str | int | float | bool]]


class Tune(Section):
    """`pipeline tune` (pipeline/tune.py): the smallest or fastest recipe for one artifact inside a budget,
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


class CheckpointConfig(Section):
    """The checkpoint stage reads four sections: where the model comes from, the built-in model's
    tokenizer and training, and the held-out scoring."""
    model: Model
    tokenizer: Tokenizer
    train: Train
    eval: Eval


Budgets = dict[str, dict[str, float | bool]]


class ConsumerParams(Section):
    """What `evaluate`, `gate` and `report` read: enough to run on a machine with artifacts and no
    params.yaml (a consumer's), where every section takes its default."""
    eval: Eval = Eval()
    budgets: Budgets = {}
    gate: Gate = Gate()

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, budgets):
        return _check_budgets(budgets)


class Params(ConsumerParams):
    data: Data
    model: Model
    tokenizer: Tokenizer
    train: Train
    eval: Eval
    export: Export
    budgets: Budgets
    fused: Fused
    fp16: FP16
    imatrix: Imatrix
    int8_dynamic: Int8Dynamic
    int4: Int4
    int8_static: Int8Static
    gate: Gate
    tune: Tune = Tune()


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


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that holds the key at ``loc`` (for suggesting valid keys)."""
    model: type[BaseModel] | None = Params
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _message(err: dict, source: str) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        model = _model_at(loc)
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


def validate(params: dict, source: str = "params.yaml", schema: type[BaseModel] = Params):
    """The params as typed objects (``params.int4.block_size``); one PipelineError line for the first problem."""
    try:
        return schema.model_validate(params)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise PipelineError(_message(errors[0], source) + more) from None
