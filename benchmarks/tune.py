"""`pipeline tune` measured: a fresh project (this repo's tracked files, with ``--set`` overrides such as the
outlier model or a real shape) built by `dvc repro` for the tuned artifact, then the same search with 1 and
with 2 DVC queue workers, each from nothing (no experiments, an empty run-cache, no recorded outputs).

    python benchmarks/tune.py --work /tmp/tune-builtin --label builtin --budget kld_mean=0.005
    python benchmarks/tune.py --work /tmp/tune-outliers --label outliers --budget kld_mean=0.005 \\
        --set model.outliers.channels=4 --set model.outliers.scale=64
    python benchmarks/tune.py --work /tmp/tune-06 --label qwen3-0.6b --budget kld_mean=0.01 \\
        --set model.source=random:qwen3-0.6b --set eval.max_windows=8 --space "{block_size: [64, 128], tied_bits: [4, 8]}"

Writes ``benchmarks/tune_<label>.json``: candidates, wall time per worker count, the winner against the
start recipe (size, KLD), the budget, the space and the machine. `python benchmarks/tables.py` renders the
docs table."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline import project as vcs  # noqa: E402
from pipeline.project import head_commit  # noqa: E402


def git(*args: str, cwd: Path) -> None:
    vcs.git("-c", "user.email=bench@example.com", "-c", "user.name=bench", *args, cwd=cwd)


def project(work: Path, sets: list[str], target: str, reuse: bool = False) -> float:
    """This repo's tracked files with ``sets`` applied, committed and built up to ``target``; seconds.
    ``reuse``: a project made here before (a failed build, say) gets ``sets`` applied and is built again,
    DVC re-running only what they change."""
    from pipeline.params import set_dotted

    if reuse and (work / ".git").is_dir():
        params = yaml.safe_load((work / "params.yaml").read_text())
        for item in sets:
            set_dotted(params, item)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        t0 = time.perf_counter()
        vcs.dvc("repro", target, cwd=work, timeout=None)
        git("add", "-A", cwd=work)
        git("commit", "-q", "--allow-empty", "-m", "built", cwd=work)
        return time.perf_counter() - t0
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for f in vcs.git("ls-files", cwd=REPO).split():
        if (REPO / f).is_file() and not f.startswith(("metrics/", "reports/")) and f != "dvc.lock":
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for item in sets:
        set_dotted(params, item)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-qm", "project", cwd=work)
    t0 = time.perf_counter()
    vcs.dvc("repro", target, cwd=work, timeout=None)
    seconds = time.perf_counter() - t0
    git("add", "-A", cwd=work)
    git("commit", "-qm", "built", cwd=work)
    return seconds


def fresh(work: Path) -> None:
    """No experiment, no run-cache entry, no recorded outputs: the search starts from nothing."""
    vcs.dvc("queue", "remove", "--all", cwd=work, check=False)
    vcs.dvc("exp", "remove", "-A", cwd=work, check=False)
    shutil.rmtree(work / ".dvc" / "cache" / "runs", ignore_errors=True)
    shutil.rmtree(work / "artifacts" / ".outputs", ignore_errors=True)
    shutil.rmtree(work / "reports" / "tune", ignore_errors=True)
    time.sleep(65)  # DVC's idle queue workers leave after 60 s: each run starts its own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--artifact", default="int4")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="params override of the project")
    ap.add_argument("--space", default=None, help="tune.space.<artifact> as YAML (default: params.yaml's)")
    ap.add_argument("--objective", default="size", choices=["size", "decode", "both"])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--reuse", action="store_true", help="build on a project --work already holds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = args.out or REPO / "benchmarks" / f"tune_{args.label}.json"
    from pipeline.consumer.manifest import machine

    work = args.work.resolve()
    repro_s = project(work, args.sets, f"evaluate@{args.artifact}", args.reuse)
    print(f"project built in {repro_s:.0f} s", flush=True)
    tune_sets = ["-S", f"tune.space.{args.artifact}={args.space}"] if args.space else []
    runs = []
    for workers in (int(w) for w in args.workers.split(",")):
        fresh(work)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--artifact", args.artifact, "--budget",
                               args.budget, "--objective", args.objective, "--workers", str(workers), *tune_sets],
                              cwd=work, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            raise SystemExit(f"pipeline tune failed ({proc.returncode})")
        result = json.loads((work / "reports/tune/result.json").read_text())
        rows = json.loads((work / "reports/tune/candidates.json").read_text())
        runs.append({"workers": workers, "wall_s": round(wall, 1), "candidates": result["candidates"],
                     "queued": result["queued_this_run"], "winner": result["winner"]})
        print(f"workers {workers}: {result['candidates']} candidates in {wall:.0f} s, winner {result['winner']}",
              flush=True)
        # written after every run: a later one that fails or is stopped leaves the earlier figures
        by_name = {r["name"]: r for r in rows}
        win, start = by_name[result["winner"]], by_name[result["start"]]
        keep = ("recipe", "round", "status", "error", "size_ratio", "size_bytes", "kld_mean", "kld_p99", "drift_pct",
                "top1_agreement", "decode_tok_s", "in_budget", "front_size", "front_decode", "winner", "start")
        record = {"label": args.label, "artifact": args.artifact, "project_overrides": args.sets,
                  "budget": result["budget"], "space": yaml.safe_load(args.space) if args.space else
                  yaml.safe_load((work / "params.yaml").read_text())["tune"]["space"][args.artifact],
                  "strategy": result["strategy"], "objective": result["objective"], "repro_seconds": round(repro_s, 1), "project_reused": args.reuse,
                  "runs": runs, "start": {k: start[k] for k in keep if k in start},
                  "winner": {k: win[k] for k in keep if k in win},
                  "size_vs_start": round(win["size_bytes"] / start["size_bytes"], 4),
                  "candidates": [{k: r[k] for k in keep if k in r} for r in rows],
                  "machine": machine(), "cores": __import__("os").cpu_count(),
                  "commit": head_commit(REPO, short=True)}
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}: winner {win['recipe']} size {win['size_ratio']:.3f}x (start {start['size_ratio']:.3f}x), "
              f"KLD {win['kld_mean']:.3g} (start {start['kld_mean']:.3g})")


if __name__ == "__main__":
    main()
