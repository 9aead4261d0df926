"""Every family on a trained model: the built-in recipe trained with each family's architecture
(``builtin:<family>-tiny``) and its function-preserving outlier copy, through every stage with default
params, each artifact then judged by `pipeline evaluate` against its own model's FP32 export (budgets of
params.yaml). One results file for docs/stages.md's table:

    python benchmarks/families_trained.py [--families llama,qwen2,...] [--work DIR] [--out FILE]

It runs the `pipeline` verbs a user would (scratch under --work, removed unless --keep)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import families  # noqa: E402
from pipeline.project import head_commit  # noqa: E402

DATA = REPO / "artifacts" / "data"
PRECISION = ("fused", "fp16", "int8-dynamic", "int8-static", "int4")
OUTLIERS = ("-S", "model.outliers.channels=4", "-S", "model.outliers.scale=64")  # docs/choices.md's copy


def pipeline(*args: str, log: Path) -> int:
    with log.open("a") as f:
        f.write(f"$ pipeline {' '.join(args)}\n")
        f.flush()
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=f, stderr=f).returncode


def build(w: Path, source: str, extra: tuple[str, ...], log: Path) -> dict:
    """Every stage into ``w``; returns the figures of each artifact and its budget status."""
    w.mkdir(parents=True, exist_ok=True)
    ref, data = ["--reference", str(w / "export"), "--data", str(DATA)], str(DATA)
    steps = {
        "checkpoint": ["checkpoint", "--source", source, "--data", data, *extra],
        "export": ["export", "--checkpoint", str(w / "checkpoint"), "--data", data],
        "fused": ["fuse", "--input", str(w / "export"), *ref],
        "imatrix": ["imatrix", "--input", str(w / "fused")],
        "fp16": ["fp16", "--input", str(w / "fused"), *ref],
        "int8-dynamic": ["quantize", "--mode", "dynamic", "--input", str(w / "fused"), "--imatrix", str(w / "imatrix"), *ref],
        "int8-static": ["quantize", "--mode", "static", "--input", str(w / "fused"), *ref],
        "int4": ["quantize", "--mode", "int4", "--input", str(w / "fused"), "--imatrix", str(w / "imatrix"), *ref],
    }
    out = {}
    for stage, args in steps.items():
        rc = pipeline(*args, "--out", str(w / stage), "--run-metrics", str(w / f"m_{stage}.json"), log=log)
        if rc != 0:
            out[stage] = {"built": False}
            continue
        run = json.loads((w / f"m_{stage}.json").read_text())
        row = {"built": True, "wall_s": run["wall_seconds"], "peak_rss_mb": run["peak_rss_mb"],
               "machine": run["machine"]}
        if stage in PRECISION or stage == "export":
            reference = w / ("checkpoint" if stage == "export" else "export")
            pipeline("evaluate", "--artifact", str(w / stage), "--reference", str(reference), "--data", data,
                     "--name", stage, "--out", str(w / f"e_{stage}.json"), log=log)
            m = json.loads((w / f"e_{stage}.json").read_text())
            row.update({k: m.get(k) for k in ("drift_pct", "kld_mean", "top1_agreement", "task_acc", "task_acc_drop",
                                              "size_ratio")})
            row["budget"] = m["budget"]["status"]
            row["violations"] = m["budget"]["violations"]
        if stage == "checkpoint":
            row["heldout_ppl"] = json.loads((w / stage / "manifest.json").read_text())["metrics"].get("heldout_ppl")
        out[stage] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(f for f in families.all_families() if f != "qwen3"),
                    help="families to train (qwen3, the built-in model, is dvc repro's)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/families-trained"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "families_trained.json")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    results = {"commit": head_commit(REPO, short=True), "params": "params.yaml defaults", "families": {}}
    log = args.work / "log.txt"
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.families.split(","):
        t0 = time.perf_counter()
        w = args.work / name
        trained = build(w / "trained", f"builtin:{name}-tiny", (), log)
        copy = build(w / "outliers", str(w / "trained" / "checkpoint"), OUTLIERS, log)
        results["families"][name] = {"trained": trained, "outliers 4 x64": copy}
        print(f"{name}: {time.perf_counter() - t0:.0f} s; " + ", ".join(
            f"{v} {sum(1 for r in rows.values() if r.get('budget', 'pass').startswith('pass'))}/{len(rows)} in budget"
            for v, rows in results["families"][name].items()), flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
