"""The search of `pipeline tune` (the package's docstring says how a run goes): budgets, candidates,
their order, and the strategies that decide what to try next."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from ..schema import TUNE_METRICS
from ..scoring import metrics as metric_table
from ..scoring.evaluate import check_budget

ALIASES = metric_table.ALIASES
HIGHER_IS_BETTER = tuple(m.key for m in metric_table.METRICS if m.better == "higher")


def section_of(artifact: str) -> str:
    return artifact.replace("-", "_")


# ---------------------------------------------------------------------------------------------- budget

def parse_budget(text: str | None) -> dict[str, float]:
    """``kld_mean=0.005,drift_pct=1,top1=0.95`` -> {"max_kld_mean": 0.005, ..., "min_top1_agreement": 0.95}.
    A bare metric is bounded in its natural direction; ``max_`` / ``min_`` prefixes are taken as given."""
    budget: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            raise PipelineError(f"--budget {item!r}: expected metric=number (e.g. kld_mean=0.005)") from None
        if not sep:
            raise PipelineError(f"--budget {item!r}: expected metric=number (e.g. kld_mean=0.005)")
        bound, _, metric = key.partition("_")
        if bound not in ("max", "min"):
            metric = ALIASES.get(key, key)
            bound = metric_table.BY_KEY[metric].bound if metric in metric_table.BY_KEY else "max"
        if metric not in TUNE_METRICS:
            raise PipelineError(f"--budget {item!r}: unknown metric {metric!r} (valid: {', '.join(TUNE_METRICS)}, "
                                f"or {', '.join(ALIASES)})")
        budget[f"{bound}_{metric}"] = number
    return budget


# ------------------------------------------------------------------------------------------ candidates

def fmt(value: Any) -> str:
    """A value as `-S` and params.yaml spell it."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Candidate:
    artifact: str
    overrides: tuple[tuple[str, Any], ...]  # (dotted key under the artifact's section, value), sorted

    @classmethod
    def of(cls, artifact: str, knobs: dict[str, Any]) -> "Candidate":
        return cls(artifact, tuple(sorted(knobs.items())))

    @property
    def knobs(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def name(self) -> str:
        blob = json.dumps([self.artifact, [[k, v] for k, v in self.overrides]]).encode()
        return f"tune-{self.artifact}-{hashlib.sha256(blob).hexdigest()[:8]}"

    def sets(self) -> list[str]:
        """The experiment's `-S` values: the recipe, and its evaluation reported, not failed, against
        budgets.<artifact> (tune judges every candidate against its own budget; one over it is a point on the
        front, not a failed experiment)."""
        section = section_of(self.artifact)
        return [f"{section}.{k}={fmt(v)}" for k, v in self.overrides] + [f"++budgets.{self.artifact}.report_only=true"]

    def label(self) -> str:
        return ", ".join(f"{k}={fmt(v)}" for k, v in self.overrides) or "start recipe (params.yaml)"


@dataclass
class Result:
    candidate: Candidate
    status: str  # success | failed | queued | running | missing
    figures: dict = field(default_factory=dict)
    rev: str | None = None
    error: str | None = None
    decode_tok_s: float | None = None
    round: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "success" and "kld_mean" in self.figures

    def values(self) -> dict:
        return {**self.figures, **({"decode_tok_s": self.decode_tok_s} if self.decode_tok_s else {})}


def check(artifact: str, knobs: dict[str, Any], params_file: Path) -> tuple[set[str], str | None]:
    """(the knobs that change nothing given the others, e.g. awq_alpha without awq; why these overrides
    are not a valid recipe: the schema's one line, or None)."""
    from ..params import load_params

    try:
        params = load_params(params_file, [f"{section_of(artifact)}.{k}={fmt(v)}" for k, v in knobs.items()])
    except PipelineError as exc:
        return set(), str(exc).split(" with -S ", 1)[-1]
    return getattr(params, section_of(artifact)).inert(), None


def start_values(params, artifact: str, knobs) -> dict[str, Any]:
    """The committed value of each knob (dotted below the artifact's section)."""
    node = getattr(params, section_of(artifact)).model_dump()
    out = {}
    for knob in knobs:
        value = node
        for part in knob.split("."):
            if not isinstance(value, dict) or part not in value:
                raise PipelineError(f"tune.space.{artifact}.{knob}: {section_of(artifact)} has no key {knob!r}")
            value = value[part]
        out[knob] = value
    return out


# -------------------------------------------------------------------------------------------- ordering

def objective_key(result: Result, objective: str, start: Result) -> tuple:
    """Lower is better; accuracy (mean KLD) breaks ties."""
    f = result.figures
    if objective == "size":
        return (f["size_bytes"], f["kld_mean"])
    if result.decode_tok_s is None:
        return (float("inf"), f["kld_mean"])
    if objective == "decode":
        return (-result.decode_tok_s, f["kld_mean"])
    # both: relative size x relative time per token, against the start recipe measured alike
    return ((f["size_bytes"] / start.figures["size_bytes"]) * (start.decode_tok_s / result.decode_tok_s),
            f["kld_mean"])


def judge(result: Result, budget: dict) -> dict:
    return check_budget(result.values(), budget)


def in_budget(result: Result, budget: dict) -> bool:
    return result.ok and not judge(result, budget)["violations"]


def pareto(results: list[Result], x: str) -> set[str]:
    """Names on the front of (x, mean KLD), both minimised (decode tok/s maximised)."""
    def point(r):
        v = r.values()
        return (-v[x] if x in HIGHER_IS_BETTER else v[x], v["kld_mean"])
    pts = [(point(r), r.candidate.name) for r in results if r.ok and r.values().get(x) is not None]
    return {n for p, n in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q, _ in pts)}


# ------------------------------------------------------------------------------------------- strategies

class Search:
    """Yields rounds of candidates; each round sees every result so far (``self.results``)."""

    def __init__(self, artifact: str, space: dict, promote: dict, start: dict, objective: str, budget: dict,
                 strategy: str, max_candidates: int, seed: int, params_file: Path):
        self.artifact, self.space, self.promote, self.start = artifact, space, promote, start
        self.objective, self.budget, self.strategy = objective, budget, strategy
        self.max_candidates, self.seed, self.params_file = max_candidates, seed, params_file
        self.results: dict[str, Result] = {}
        self.skipped: list[str] = []

    def candidate(self, knobs: dict) -> Candidate | None:
        knobs = {k: v for k, v in knobs.items() if self.start.get(k, object()) != v}
        inert, why = check(self.artifact, knobs, self.params_file)
        cand = Candidate.of(self.artifact, {k: v for k, v in knobs.items() if k not in inert})
        if why:
            self.skipped.append(f"{cand.label()}: {why}")
            return None
        return cand

    def unique(self, knob_sets) -> list[Candidate]:
        seen, out = set(self.results), []
        for knobs in knob_sets:
            cand = self.candidate(knobs)
            if cand and cand.name not in seen:
                seen.add(cand.name)
                out.append(cand)
        return out

    def key(self, r: Result) -> tuple:
        return objective_key(r, self.objective, self.results[Candidate.of(self.artifact, {}).name])

    def rounds(self):
        if self.strategy == "grid":
            combos = [dict(zip(self.space, vals)) for vals in itertools.product(*self.space.values())]
            if len(combos) > self.max_candidates:
                raise PipelineError(f"tune: the grid has {len(combos)} candidates, more than tune.max_candidates="
                                    f"{self.max_candidates}: use strategy greedy or random, or fewer values")
            yield self.unique([{}] + combos)
            return
        if self.strategy == "random":
            combos = [dict(zip(self.space, vals)) for vals in itertools.product(*self.space.values())]
            random.Random(self.seed).shuffle(combos)
            yield self.unique([{}] + combos)[: self.max_candidates]
            return
        # greedy, round 1: the start recipe and each move alone
        yield self.unique([{}] + [{k: v} for k, vals in self.space.items() for v in vals])
        start = self.results[Candidate.of(self.artifact, {}).name]
        if not start.ok:
            raise PipelineError(f"tune: the start recipe failed ({start.error or start.status}); fix params.yaml first")
        singles = [r for r in self.results.values() if r.ok and len(r.candidate.overrides) == 1
                   and self.key(r) < self.key(start)]
        singles.sort(key=lambda r: (not in_budget(r, self.budget), self.key(r)))
        # round 2: the improving moves combined cumulatively (one value per knob, the best first)
        combos, acc = [], {}
        for r in singles:
            (knob, value), = r.candidate.overrides
            if knob in acc:
                continue
            acc = {**acc, knob: value}
            if len(acc) >= 2:
                combos.append(dict(acc))
        yield self.unique(combos)
        # round 3: the best recipes over budget that beat the best inside it, promoted step by step
        inside = [r for r in self.results.values() if in_budget(r, self.budget)]
        best = min(inside, key=self.key) if inside else None
        over = sorted((r for r in self.results.values() if r.ok and not in_budget(r, self.budget)
                       and (best is None or self.key(r) < self.key(best))), key=self.key)[:2]
        yield self.unique({**r.candidate.knobs, k: v} for r in over for k, vals in self.promote.items()
                          for v in vals if k not in r.candidate.knobs)


@dataclass
class Options:
    artifact: str
    objective: str
    strategy: str
    budget: dict
    space: dict
    promote: dict
    max_candidates: int
    workers: int
    seed: int
    decode_tokens: int
    slice: tuple[int, int] = (1, 1)
    remote: str | None = None
    collect: bool = False
