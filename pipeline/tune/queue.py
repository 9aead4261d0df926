"""`pipeline tune` on DVC's experiment queue: every git / dvc call it makes, the workers, the wait,
the decode measurement, and the run loop (:func:`tune`)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ..errors import PipelineError
from ..log import info
from ..ops.memory import available_memory
from ..project import dvc, dvc_detached, git
from .report import OUT, report
from .search import Candidate, Options, Result, Search, in_budget, judge, start_values

FIGURES = ("kld_mean", "kld_p99", "drift_pct", "top1_agreement", "size_ratio", "size_bytes", "ppl")
# the reference outputs, shared by every experiment's workspace (an efficiency only: a worker started
# without it records them again)
OUTPUTS_DIR = "PIPELINE_OUTPUTS_DIR"
POLL_S = 5  # `dvc exp show` costs a second of CPU: polled no more often than this
SHOW_TIMEOUT_S = 120  # `dvc exp show` waits on the experiments' lock: a poll that long is retried
# Candidates all still queued this long after the last change, with a worker said to be alive: DVC's
# worker has stopped taking tasks (treeverse/dvc#10562, #10829); its workers are stopped and started again.
STALL_S = 180


# --------------------------------------------------------------------------------------------- DVC

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
    from ..consumer.runtime import Runtime

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
    if stop_first:  # workers that are alive but take no task: none is running one, so none is lost
        dvc_detached("queue", "stop", cwd=root, env=env)
    if dvc_detached("queue", "start", "-j", str(workers), cwd=root, env=env):
        raise PipelineError("dvc queue start failed (run it by hand to see why)")


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
