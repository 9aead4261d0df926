"""The one table of figures an artifact is judged by: each metric's key (as ``metrics/<artifact>.json``
and the manifest hold it), label, format, which way is better, how a budget bounds it, and where it is
shown. Budgets (pipeline/schema.py), the gate and the report (pipeline/gate.py), the model card, the
closing lines of `pipeline evaluate` and of every ONNX stage, and `pipeline tune`'s budgets and
objectives all read it. A metric scored against a reference on held-out text is computed from its row
too (a reduction of a per-position quantity, or a function of the figures before it; pipeline/scoring/outputs.py
feeds it the windows), so adding one is one row here, and a budget for it in params.yaml."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


def kl_divergence(ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) per position, from log-probabilities over the last axis. Clamped at 0:
    a divergence is never negative, but the rounding of two near-equal distributions can make the sum so."""
    return np.maximum((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1), 0.0)


# What is measured at each scored position, from the candidate's and the reference's log-probabilities
# (positions x vocab) and the target tokens; the reference's may be None (perplexity alone). Each is
# computed once per window and shared by the metrics that reduce it.
def _nll(lp, rlp, tgt):
    return -lp[np.arange(len(tgt)), tgt]


def _ref_nll(lp, rlp, tgt):
    return -rlp[np.arange(len(tgt)), tgt]


def _agree(lp, rlp, tgt):
    return rlp.argmax(-1) == lp.argmax(-1)


def _delta_p(lp, rlp, tgt):
    """The change in the probability of the right token (llama.cpp's perplexity tool: Δp)."""
    i = np.arange(len(tgt))
    return np.exp(lp[i, tgt]) - np.exp(rlp[i, tgt])


PER_POSITION = {"nll": (_nll, False), "ref_nll": (_ref_nll, True), "kld": (lambda lp, rlp, tgt: kl_divergence(rlp, lp), True),
                "agree": (_agree, True), "delta_p": (_delta_p, True)}


def _exp_mean(v):
    return float(np.exp(v.mean()))


def _mean(v):
    return float(v.mean())


def _p99(v):
    return float(np.percentile(v, 99))


def _rms_pct(v):
    return float(np.sqrt(np.mean(np.square(v))) * 100.0)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    spec: str                    # format spec of the shown value (after ``scale``)
    better: str = "lower"        # "lower" | "higher": the direction a budget bounds (max_ / min_)
    by_magnitude: bool = False   # budgets and baselines compare |value| (a drift either way is a change)
    alias: str = ""              # short name (`pipeline tune --budget top1=0.95`)
    scored: bool = False         # computed against a reference on held-out text (evaluate, the card's table)
    column: bool = False         # a column of the gate / report table
    required: bool = False       # every ONNX artifact's budget must bound it
    tune: bool = False           # `pipeline tune` can bound it and optimise against it
    budget: bool = True          # a budgets.<artifact> key may bound it
    scale: float = 1.0
    unit: str = ""
    header: str = ""             # its column's header, where the unit goes there (default: the label)
    on_request: str = ""         # measured only when asked for (its params section): an absent figure is not
                                 # a budget violation, the budget's status says it was not applied
    # how a scored metric is computed: a reduction of a per-position quantity (PER_POSITION), or a
    # function of the figures computed before it
    of: str = ""
    reduce: Callable | None = None
    derive: Callable | None = None

    @property
    def bound(self) -> str:
        """The budget key's prefix in its natural direction: ``max`` for lower-is-better."""
        return "min" if self.better == "higher" else "max"

    def show(self, value) -> str:
        """The value inline: ``drift +0.0407 %``."""
        if value is None:
            return "—"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return str(value)[:24]  # shown as it is; not_finite fails it
        return format(value * self.scale, self.spec) + self.unit

    def cell(self, value) -> str:
        """The value in its column (a header with the unit, a bare number)."""
        return self.show(value).removesuffix(self.unit) if self.header else self.show(value)


METRICS = (
    Metric("ppl", "PPL", ".4f", scored=True, column=True, of="nll", reduce=_exp_mean),
    Metric("ref_ppl", "reference PPL", ".4f", scored=True, of="ref_nll", reduce=_exp_mean),
    Metric("drift_pct", "drift", "+.4f", by_magnitude=True, alias="drift", scored=True, column=True, tune=True,
           unit=" %", header="drift %", derive=lambda f: (f["ppl"] - f["ref_ppl"]) / f["ref_ppl"] * 100.0),
    Metric("kld_mean", "KLD mean", ".2e", alias="kld", scored=True, column=True, required=True, tune=True,
           of="kld", reduce=_mean),
    Metric("kld_p99", "KLD p99", ".2e", scored=True, required=True, tune=True, of="kld", reduce=_p99),
    Metric("top1_agreement", "top-1", ".2%", better="higher", alias="top1", scored=True, column=True, required=True,
           tune=True, of="agree", reduce=_mean),
    Metric("delta_p_rms", "RMS Δp", ".3f", scored=True, of="delta_p", reduce=_rms_pct, unit=" %"),
    # lm-evaluation-harness through our runtime (pipeline/scoring/tasks.py): the mean of each task's figure
    Metric("task_acc", "task accuracy", ".2%", better="higher", on_request="tasks"),
    Metric("task_acc_drop", "task accuracy drop", "+.2%", on_request="tasks"),
    Metric("size_bytes", "size", ".2f", column=True, budget=False, scale=1e-6, unit=" MB"),
    Metric("size_ratio", "vs FP32", ".3f", alias="size", column=True, tune=True),
    Metric("decode_tok_s", "decode", ".1f", better="higher", alias="decode", tune=True, budget=False, unit=" tok/s"),
    # the checkpoint's own figures
    Metric("heldout_ppl", "held-out PPL", ".3f"),
    Metric("ppl_ratio_vs_unigram", "PPL / unigram PPL", ".3f"),
    # the stage's parity check with its parent (pipeline/scoring/evaluate.py's parity_metrics)
    Metric("parity_max_abs_logit_delta", "max |dlogit|", ".2e"),
    Metric("parity_greedy_prefix_match", "greedy prefix match", ".0%", better="higher"),
    Metric("parity_batch_rows_prefix_match", "batch prefix match", ".0%", better="higher"),
    Metric("parity_decode_max_abs_logit_delta", "decode max |dlogit|", ".2e"),
    Metric("parity_decode_kld_mean", "decode KLD", ".2e"),
    Metric("parity_decode_top1_agreement", "decode top-1", ".2%", better="higher"),
)
BY_KEY = {m.key: m for m in METRICS}
# the keys a budget can bound (max_<key> / min_<key>)
BUDGETED = tuple(m.key for m in METRICS if m.budget)
# what every ONNX artifact's budget must hold: its distribution, not only its mean log-likelihood
REQUIRED_BOUNDS = tuple(f"{m.bound}_{m.key}" for m in METRICS if m.required)
TUNED = tuple(m.key for m in METRICS if m.tune)
ALIASES = {m.alias: m.key for m in METRICS if m.alias}
SCORED = tuple(m for m in METRICS if m.scored)
ON_REQUEST = tuple(m for m in METRICS if m.on_request)
COLUMNS = tuple(m for m in METRICS if m.column)


def not_finite(figures: dict) -> list[str]:
    """One line for each figure of the table that is not a finite number. A NaN compares false with every
    bound, so a check that meets one must fail on it, not let it through (an fp16 overflow, a broken
    kernel, a tampered metrics file)."""
    bad = []
    for key, value in figures.items():
        if key not in BY_KEY or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad.append(f"{key} is {str(value)[:40]!r}: not a number")
        elif not math.isfinite(value):
            bad.append(f"{key} is {value}: not a finite figure")
    return bad


def score(windows, with_reference: bool) -> dict:
    """The scored metrics over ``windows``: (candidate log-probs, reference log-probs or None, targets) per
    window. Without a reference, only those that need none (perplexity)."""
    wanted = {m.of for m in SCORED if m.of and (with_reference or not PER_POSITION[m.of][1])}
    values: dict = {q: [] for q in wanted}
    for lp, rlp, tgt in windows:
        for q in wanted:
            values[q].append(PER_POSITION[q][0](lp, rlp, tgt))
    values = {q: np.concatenate(v) for q, v in values.items()}
    out: dict = {}
    for m in SCORED:
        if m.of in values:
            out[m.key] = m.reduce(values[m.of])
        elif m.derive and with_reference:
            out[m.key] = m.derive(out)
    return out


def summary(figures: dict, metrics=None) -> str:
    """``ppl 122.557, drift +0.0000 %, KLD mean 2.85e-13, ...`` of the figures present."""
    return ", ".join(f"{m.label} {m.show(figures[m.key])}" for m in (metrics or SCORED)
                     if figures.get(m.key) is not None)
