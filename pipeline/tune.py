"""`pipeline tune`: the smallest (or fastest) recipe for one artifact whose accuracy stays inside a budget.

A *candidate* is a set of overrides of one artifact's params (``int4.block_size=64``, ...). Each is an
ordinary DVC experiment: queued with ``dvc exp run --queue -S ... evaluate@<artifact>``, run by DVC's own
queue workers (``dvc queue start -j N``) and read back from ``dvc exp show --json``. No scheduler or
thread of ours: the search only decides what to queue next. A candidate costs one build and one scoring
pass: the reference's outputs are recorded once and shared by every experiment's workspace
(``PIPELINE_OUTPUTS_DIR``, pipeline/outputs.py), so no second model is ever loaded. A candidate this
commit already has as an experiment (same name = same overrides) is not queued again; one run on another
commit is restored from DVC's run-cache when it is queued.

Strategies (reasoning about the knobs, the way llama.cpp's quant mixes and Olive's search do, rather
than enumerating blindly):

- ``greedy``: round 1 runs the start recipe (params.yaml as committed) and each knob's other values
  alone; round 2 combines the moves that improved the objective, cumulatively, best first (inside the
  budget before outside); round 3 takes the best recipes still over budget and keeps their most
  sensitive projections at 8 bits (``tune.promote``, ordered by the importance matrix) until it holds;
- ``grid``: every combination (refused past ``max_candidates``); ``random``: ``max_candidates`` draws.

Across machines, ``--slice K/N`` runs every N-th candidate of each round starting at the K-th, and
``--remote R`` shares them: ``dvc exp push R`` (the experiment's git ref to that git remote, its
artifacts to the DVC remote) after a round, ``dvc exp pull R`` before one. A round with candidates
still missing from other slices stops with a message; ``--collect`` only pulls and reports.

The decode objective is measured here, after each round, one artifact at a time (``dvc get`` of the
candidate, our runtime, best of 3): figures taken while the queue's workers share the CPU, or on
another machine, would rank noise.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError
from .evaluate import check_budget
from .log import info
from .memory import available_memory
from . import metrics as metric_table
from .schema import TUNE_METRICS

OUT = Path("reports/tune")
FIGURES = ("kld_mean", "kld_p99", "drift_pct", "top1_agreement", "size_ratio", "size_bytes", "ppl")
# the reference outputs, shared by every experiment's workspace (an efficiency only: a worker started
# without it records them again)
OUTPUTS_DIR = "PIPELINE_OUTPUTS_DIR"
ALIASES = metric_table.ALIASES
HIGHER_IS_BETTER = tuple(m.key for m in metric_table.METRICS if m.better == "higher")
POLL_S = 5  # `dvc exp show` costs a second of CPU: polled no more often than this
DVC_TIMEOUT_S = 600  # no DVC call of ours takes minutes on a working queue; one that does is stuck
SHOW_TIMEOUT_S = 120  # `dvc exp show` waits on the experiments' lock: a poll that long is retried
# Candidates all still queued this long after the last change, with a worker said to be alive: DVC's
# worker has stopped taking tasks (treeverse/dvc#10562, #10829); its workers are stopped and started again.
STALL_S = 180


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
    from .params import load_params

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


# --------------------------------------------------------------------------------------------- DVC

def dvc(*args: str, cwd: Path, env: dict | None = None, check: bool = True,
        timeout: float = DVC_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"dvc {' '.join(args[:3])} did not answer in {timeout:.0f} s (a DVC lock held by a "
                            f"stuck queue worker? `dvc queue status`, `dvc queue stop --kill`)") from None
    if check and proc.returncode != 0:
        last = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise PipelineError(f"dvc {' '.join(args[:3])} failed: {last[-1] if last else proc.returncode}")
    return proc


def git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def check_workspace(root: Path, artifact: str) -> str:
    """HEAD's sha, once the workspace is a committed, built DVC project: every candidate is HEAD plus its
    overrides, and its other stages must come from the cache, not be rebuilt."""
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        raise PipelineError(f"tune runs in a DVC project (no dvc.yaml / .dvc in {root})")
    try:
        head = git("rev-parse", "HEAD", cwd=root).strip()
    except PipelineError:
        raise PipelineError("tune needs a git commit: the experiments' baseline is HEAD") from None
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no", cwd=root).splitlines()
             if not ln[3:].startswith(str(OUT))]
    if dirty:
        raise PipelineError(f"tune: uncommitted changes to {', '.join(dirty[:4])}{' ...' if len(dirty) > 4 else ''}: "
                            f"every candidate is HEAD plus its overrides, so commit or stash them first")
    status = json.loads(dvc("status", "--json", f"evaluate@{artifact}", cwd=root).stdout or "{}")
    if status:
        raise PipelineError(f"tune: the pipeline is not built at HEAD ({', '.join(sorted(status))} changed): "
                            f"run `dvc repro` and commit dvc.lock first")
    return head


def experiments(root: Path, head: str, artifact: str) -> dict[str, dict]:
    """This commit's experiments from `dvc exp show --json`: name -> {state, rev, figures, log}."""
    for attempt in range(5):
        # a worker removing its finished workspace while `exp show` walks them fails the read, and a
        # worker holding the experiments' lock stalls it: read again
        try:
            proc = dvc("exp", "show", "--json", cwd=root, check=attempt == 4, timeout=SHOW_TIMEOUT_S)
        except PipelineError:
            if attempt == 4:
                raise
            continue
        if proc.returncode == 0:
            break
        time.sleep(1 + attempt)
    shown = json.loads(proc.stdout or "[]")
    out = {}
    for base in shown:
        if base.get("rev") != head:
            continue
        for exp in base.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            data = rev.get("data") or {}
            executor = exp.get("executor") or {}
            state = executor.get("state") or ("failed" if rev.get("error") else "success")
            metrics = data.get("metrics") or {}
            out[exp.get("name") or rev.get("name")] = {
                "state": state, "rev": rev.get("rev"), "log": (executor.get("local") or {}).get("log"),
                "figures": (metrics.get(f"metrics/{artifact}.json") or {}).get("data") or {},
                "build": (metrics.get(f"metrics/build/{artifact}.json") or {}).get("data") or {}}
    return out


def failure(log: str | None) -> str:
    """The stage's own `error:` line from the experiment's log."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines() if log else []
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error:")]
    return errors[-1].removeprefix("error: ") if errors else "the experiment failed (dvc queue logs NAME)"


def result_of(cand: Candidate, shown: dict) -> Result:
    exp = shown.get(cand.name)
    if exp is None:
        return Result(cand, "missing")
    res = Result(cand, exp["state"], rev=exp["rev"],
                 figures={k: exp["figures"][k] for k in FIGURES if k in exp["figures"]})
    if exp["state"] == "failed":
        res.error = failure(exp["log"])
    elif exp["state"] == "success" and "kld_mean" not in res.figures:
        res.status, res.error = "failed", f"no figures in metrics/{cand.artifact}.json"
    return res


def queue_status(root: Path) -> str:
    """`dvc queue status`'s worker line ("Worker status: N active, M idle"), or why there is none."""
    try:
        text = dvc("queue", "status", cwd=root, check=False, timeout=SHOW_TIMEOUT_S).stdout
    except PipelineError as exc:
        return str(exc)
    return next((ln.strip() for ln in text.splitlines() if ln.startswith("Worker status:")), "no worker status")


def queue_workers(root: Path) -> int:
    """Active workers, from `dvc queue status`."""
    line = queue_status(root)
    nums = [int(t) for t in line.replace(",", " ").split() if t.isdigit()] if line.startswith("Worker") else []
    return nums[0] if nums else 0


# ------------------------------------------------------------------------------------------------ run

def fit_workers(root: Path, artifact: str, wanted: int) -> int:
    """As many workers as asked, and as the memory allows: each holds one candidate's build, which peaks at
    what the committed build of this artifact measured (metrics/build/<artifact>.json), plus DVC's own."""
    try:
        peak = json.loads((root / "metrics" / "build" / f"{artifact}.json").read_text())["peak_rss_mb"] * 2**20
    except (OSError, KeyError, ValueError):
        return wanted
    free = available_memory()
    per = peak + 0.3e9
    if free is None or wanted * per <= 0.8 * free:
        return wanted
    fit = max(1, int(0.8 * free // per))
    info(f"tune: {wanted} workers would need {wanted * per / 1e9:.1f} GB ({artifact}'s build peaked at "
         f"{peak / 1e9:.1f} GB, metrics/build/{artifact}.json); {free / 1e9:.1f} GB is available: running {fit}")
    return fit


def measure_decode(root: Path, result: Result, tokens: int) -> float:
    """Decode tok/s of a candidate's artifact on this machine: fetched with `dvc get` at its experiment's
    revision, our runtime with every core, best of 3 after a 16-token prompt."""
    from .runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="tune-decode-") as tmp:
        dest = Path(tmp) / result.candidate.artifact
        dvc("get", ".", f"artifacts/{result.candidate.artifact}", "--rev", result.rev, "-o", str(dest), cwd=root)
        rt = Runtime(dest, threads=os.cpu_count())
        prompt = rt.encode("The for statement in Python iterates over the items of any sequence")[:16]
        rt.greedy(prompt, 4)  # warm-up
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            rt.greedy(prompt, tokens)
            best = max(best, tokens / (time.perf_counter() - t0))
        del rt
    return round(best, 1)


def line(r: Result, budget: dict) -> str:
    if not r.ok:
        return f"{r.candidate.name} {r.candidate.label()}: {r.status}: {r.error or ''}".rstrip(": ")
    f = r.figures
    verdict = "in budget" if in_budget(r, budget) else "over: " + "; ".join(judge(r, budget)["violations"])
    decode = f", {r.decode_tok_s:.1f} tok/s" if r.decode_tok_s else ""
    return (f"{r.candidate.name} {r.candidate.label()}: size {f['size_ratio']:.3f}x, KLD {f['kld_mean']:.3g}, "
            f"drift {f['drift_pct']:+.3f} %, top-1 {f['top1_agreement']:.2%}{decode} [{verdict}]")


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


def tune(root: Path, params_file: Path, params, opts: Options) -> dict:
    """Run the search in the DVC project at ``root``; write reports/tune/ and return the summary."""
    root = root.resolve()
    t0 = time.perf_counter()
    head = check_workspace(root, opts.artifact)
    start = start_values(params, opts.artifact, list(opts.space) + list(opts.promote))
    search = Search(opts.artifact, opts.space, opts.promote, start, opts.objective, opts.budget, opts.strategy,
                    opts.max_candidates, opts.seed, params_file)
    env = {**os.environ, OUTPUTS_DIR: str((root / "artifacts" / ".outputs").resolve())}
    needs_decode = opts.objective != "size" or any(key.endswith("decode_tok_s") for key in opts.budget)
    workers = fit_workers(root, opts.artifact, opts.workers)
    queued = reused = 0
    k, n = opts.slice
    waiting = None
    for number, batch in enumerate(search.rounds(), 1):
        if not batch:
            continue
        if len(search.results) + len(batch) > opts.max_candidates and opts.strategy == "greedy":
            batch = batch[: max(0, opts.max_candidates - len(search.results))]
            info(f"tune: tune.max_candidates={opts.max_candidates} reached; round {number} cut to {len(batch)}")
        if opts.remote:
            dvc("exp", "pull", opts.remote, "--rev", head, cwd=root, check=False)
        shown = experiments(root, head, opts.artifact)
        mine = [c for i, c in enumerate(batch) if i % n == k - 1] if not opts.collect else []
        todo = [c for c in mine if c.name not in shown]
        known = sum(c.name in shown for c in batch)
        reused += known
        info(f"tune round {number}: {len(batch)} candidates, {known} already run"
             + (f"; slice {k}/{n} queues {len(todo)}" if n > 1 else f"; queueing {len(todo)}")
             + (" on DVC's queue" if todo else ""))
        for cand in todo:
            dvc("exp", "run", "--queue", "-n", cand.name, *[a for s in cand.sets() for a in ("-S", s)],
                f"evaluate@{opts.artifact}", cwd=root)
        queued += len(todo)
        # what this run queued, and what an interrupted run left queued or running
        unfinished = todo + [c for c in batch if shown.get(c.name, {}).get("state") in ("queued", "running")]
        if unfinished:
            start_workers(root, workers, env)
            _wait(root, head, opts.artifact, unfinished, number, opts.budget,
                  lambda stop_first: start_workers(root, workers, env, stop_first))
        if opts.remote and todo:
            states = experiments(root, head, opts.artifact)
            done = [c.name for c in todo if states.get(c.name, {}).get("state") == "success"]
            if done:
                dvc("exp", "push", opts.remote, *done, cwd=root)
        if opts.remote:
            dvc("exp", "pull", opts.remote, "--rev", head, cwd=root, check=False)
        shown = experiments(root, head, opts.artifact)
        for cand in batch:
            res = result_of(cand, shown)
            res.round = number
            search.results[cand.name] = res
        missing = [c for c in batch if search.results[c.name].status == "missing"]
        if missing:
            waiting = (number, len(missing))
            break
        if needs_decode:
            for res in search.results.values():
                if res.ok and res.decode_tok_s is None:  # each candidate once: results persist across rounds
                    res.decode_tok_s = measure_decode(root, res, opts.decode_tokens)
                    info(f"  decode {res.candidate.name}: {res.decode_tok_s} tok/s")
    summary = report(root, head, opts, search, time.perf_counter() - t0, queued, reused, waiting, workers)
    return summary


def start_workers(root: Path, workers: int, env: dict, stop_first: bool = False) -> None:
    # the workers it spawns keep the fds they were given until they leave: not our pipes
    run = functools.partial(subprocess.run, cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=DVC_TIMEOUT_S)
    try:
        if stop_first:  # workers that are alive but take no task: none is running one, so none is lost
            run(["dvc", "queue", "stop"])
        if run(["dvc", "queue", "start", "-j", str(workers)]).returncode:
            raise PipelineError("dvc queue start failed (run it by hand to see why)")
    except subprocess.TimeoutExpired:
        raise PipelineError(f"dvc queue start/stop did not answer in {DVC_TIMEOUT_S} s (`dvc queue status`)") from None


RESTARTS = 3


def _wait(root: Path, head: str, artifact: str, todo: list[Candidate], number: int, budget: dict,
          restart) -> None:
    """Poll `dvc exp show` until every queued candidate has finished; a line for each as it does.
    DVC's worker leaves when its idle check (a 1 s ping, every 60 s) goes unanswered, which a busy CPU
    can cause with tasks still queued, or stays alive and takes no task: in both cases the workers are
    started again (stopped first in the second), up to RESTARTS times in all."""
    pending = {c.name: c for c in todo}
    started = changed = time.perf_counter()
    idle_polls = restarts = 0
    last: dict[str, str | None] = {}
    while pending:
        time.sleep(POLL_S)
        shown = experiments(root, head, artifact)
        for name in list(pending):
            state = shown.get(name, {}).get("state")
            if state in ("success", "failed"):
                res = result_of(pending.pop(name), shown)
                done = len(todo) - len(pending)
                info(f"  [{number}.{done}/{len(todo)}] {line(res, budget)} ({time.perf_counter() - started:.0f} s)")
        now = {n: shown.get(n, {}).get("state") for n in pending}
        if now != last:
            last, changed = now, time.perf_counter()
        if not pending:
            break
        running = "running" in now.values()
        workers = 0 if running else queue_workers(root)
        idle_polls = 0 if running or workers else idle_polls + 1
        stalled = not running and workers and time.perf_counter() - changed >= STALL_S
        if (idle_polls >= 2 or stalled) and restarts < RESTARTS:
            restarts += 1
            why = (f"have taken no task in {time.perf_counter() - changed:.0f} s ({queue_status(root)})"
                   if stalled else "left")
            info(f"tune: DVC's queue workers {why} with {len(pending)} candidates queued; starting them again")
            restart(stalled)
            idle_polls, changed = 0, time.perf_counter()
        elif idle_polls * POLL_S >= 60 or stalled:
            raise PipelineError(f"tune: DVC's queue stopped with {len(pending)} candidates not run "
                                f"(`dvc queue status`, `dvc queue logs NAME`); run tune again to resume")


# --------------------------------------------------------------------------------------------- report

def report(root: Path, head: str, opts: Options, search: Search, seconds: float, queued: int, reused: int,
           waiting, workers: int) -> dict:
    results = list(search.results.values())
    start_name = Candidate.of(opts.artifact, {}).name
    start = search.results.get(start_name)
    fronts = {"size_ratio": pareto(results, "size_ratio"), "decode_tok_s": pareto(results, "decode_tok_s")}
    inside = [r for r in results if in_budget(r, opts.budget)]
    winner = min(inside, key=search.key) if inside and start and start.ok else None
    rows = []
    for r in sorted(results, key=lambda r: (not r.ok, r.figures.get("size_bytes", 0), r.figures.get("kld_mean", 0))):
        rows.append({"name": r.candidate.name, "recipe": r.candidate.label(), "round": r.round, "status": r.status,
                     "error": r.error, "rev": r.rev, **r.values(), "in_budget": in_budget(r, opts.budget),
                     "violations": "; ".join(judge(r, opts.budget)["violations"]) if r.ok else "",
                     "front_size": r.candidate.name in fronts["size_ratio"],
                     "front_decode": r.candidate.name in fronts["decode_tok_s"],
                     "start": r.candidate.name == start_name, "winner": winner is not None and r is winner})
    from .manifest import machine

    summary = {"artifact": opts.artifact, "objective": opts.objective, "strategy": opts.strategy,
               "budget": opts.budget, "baseline_commit": head, "candidates": len(results),
               "queued_this_run": queued, "reused": reused, "skipped_invalid": search.skipped,
               "workers": workers, "slice": f"{opts.slice[0]}/{opts.slice[1]}", "wall_seconds": round(seconds, 1),
               "complete": waiting is None, "machine": machine(),
               "start": start_name, "winner": winner.candidate.name if winner else None,
               "winner_recipe": winner.candidate.knobs if winner else None,
               "recipes": {r.candidate.name: r.candidate.knobs for r in results}}
    out = root / OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary, rows))
    plot(out / "front.png", rows, opts)
    if winner is not None:
        write_recipe(out / "recipe.yaml", opts, winner, summary)
    if waiting is not None:
        info(f"tune: round {waiting[0]} is waiting for {waiting[1]} candidates from other slices: run tune again "
             f"once they are pushed (`--collect` reports what is there)")
    if winner is None and waiting is None:
        raise PipelineError(f"tune: none of {len(results)} candidates is inside the budget {opts.budget} "
                            f"(reports/tune/summary.md lists them)")
    if winner is not None:
        f, s = winner.figures, start.figures
        info(f"tune: {len(results)} candidates ({queued} run now, {reused} reused) in {seconds:.0f} s; winner "
             f"{winner.candidate.name} ({winner.candidate.label()}): size {f['size_ratio']:.3f}x vs start "
             f"{s['size_ratio']:.3f}x, KLD {f['kld_mean']:.3g} vs {s['kld_mean']:.3g}"
             + (f", {winner.decode_tok_s} vs {start.decode_tok_s} tok/s" if winner.decode_tok_s else "")
             + f"; recipe in {OUT / 'recipe.yaml'} (`pipeline tune --apply`)")
    return summary


def markdown(summary: dict, rows: list[dict]) -> str:
    head = (f"# pipeline tune: {summary['artifact']}, objective {summary['objective']}, strategy {summary['strategy']}\n\n"
            f"Budget: {', '.join(f'{k} {v:g}' for k, v in summary['budget'].items())}. "
            f"{summary['candidates']} candidates, baseline commit `{summary['baseline_commit'][:10]}`; "
            f"winner: `{summary['winner']}`.\n\n"
            "| candidate | recipe | round | size ratio | mean KLD | drift % | top-1 | decode tok/s | budget | front |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        if r["status"] != "success":
            body.append(f"| `{r['name']}` | {r['recipe']} | {r['round']} | | | | | | {r['status']}: {r['error']} | |")
            continue
        mark = " **winner**" if r["winner"] else (" (start)" if r["start"] else "")
        front = "size" if r["front_size"] else ""
        front += ("+" if front and r["front_decode"] else "") + ("decode" if r["front_decode"] else "")
        body.append(f"| `{r['name']}`{mark} | {r['recipe']} | {r['round']} | {r['size_ratio']:.3f} | "
                    f"{r['kld_mean']:.3g} | {r['drift_pct']:+.3f} | {r['top1_agreement']:.2%} | "
                    f"{r.get('decode_tok_s') or ''} | {'in' if r['in_budget'] else 'over'} | {front} |")
    return head + "\n".join(body) + "\n"


def plot(path: Path, rows: list[dict], opts: Options) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "success"]
    panels = [("size_ratio", "size (x the export)")] + (
        [("decode_tok_s", "decode tok/s (here)")] if any(r.get("decode_tok_s") for r in ok) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    limit = opts.budget.get("max_kld_mean")
    for ax, (x, label) in zip(axes[0], panels):
        pts = [r for r in ok if r.get(x)]
        ax.scatter([r[x] for r in pts], [r["kld_mean"] for r in pts],
                   c=["tab:green" if r["in_budget"] else "tab:gray" for r in pts], s=22)
        front = sorted((r for r in pts if r["front_" + ("size" if x == "size_ratio" else "decode")]), key=lambda r: r[x])
        ax.plot([r[x] for r in front], [r["kld_mean"] for r in front], "-", color="tab:blue", lw=1, label="Pareto front")
        for r, marker, name in [(r, "*", "winner") for r in pts if r["winner"]] + \
                               [(r, "s", "start") for r in pts if r["start"]]:
            ax.scatter([r[x]], [r["kld_mean"]], marker=marker, s=140, facecolors="none", edgecolors="k", label=name)
        if limit:
            ax.axhline(limit, ls="--", color="tab:red", lw=1, label="budget")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mean KLD vs export")
        ax.legend(fontsize=8)
    fig.suptitle(f"pipeline tune: {opts.artifact} ({len(ok)} candidates, green = inside the budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_recipe(path: Path, opts: Options, winner: Result, summary: dict) -> None:
    recipe: dict = {}
    section = section_of(opts.artifact)
    for knob, value in winner.candidate.overrides:
        node = recipe.setdefault(section, {})
        *parents, leaf = knob.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    recipe["budgets"] = {opts.artifact: {**opts.budget, "report_only": False}}
    f = winner.figures
    header = (f"# pipeline tune ({opts.artifact}, objective {opts.objective}, {summary['candidates']} candidates, "
              f"baseline {summary['baseline_commit'][:10]}): {winner.candidate.name}\n"
              f"# size {f['size_ratio']:.4f}x, mean KLD {f['kld_mean']:.4g}, drift {f['drift_pct']:+.4f} %, "
              f"top-1 {f['top1_agreement']:.4f}\n"
              f"# apply: `pipeline tune --apply` (writes these into params.yaml), then `dvc repro` (DVC restores the\n"
              f"# artifact from its run-cache) and `pipeline gate`. (`dvc exp apply {winner.candidate.name}` restores\n"
              f"# the experiment itself, whose budgets.{opts.artifact} is report-only.)\n")
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def apply(recipe: Path, params_file: Path) -> dict[str, Any]:
    """Write a recipe's values into params.yaml (DVC's round-trip YAML editing: comments and order kept);
    checked against the schema first."""
    from dvc.utils.serialize import modify_yaml

    from .params import load_params

    if not recipe.is_file():
        raise PipelineError(f"no recipe at {recipe}: run `pipeline tune` first")
    values = flatten(yaml.safe_load(recipe.read_text()) or {})
    if not values:
        raise PipelineError(f"{recipe} sets nothing")
    load_params(params_file, [f"{k}={fmt(v)}" for k, v in values.items()])
    with modify_yaml(params_file) as data:
        for key, value in values.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return values
