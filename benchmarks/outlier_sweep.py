"""Where each method breaks: the built-in checkpoint with ever harder outlier channels (``model.outliers``:
more channels, larger scales), every precision's mean KLD against that model's FP32 export.

    python benchmarks/outlier_sweep.py [--artifacts artifacts] [--out benchmarks/outlier_sweep.json]

Each setting is built with the pipeline's own stages (checkpoint from ``artifacts/checkpoint`` with
the outliers moved in, export, fused, imatrix, then each method), scored on the eval split, and removed
before the next. ``python benchmarks/tables.py`` renders the docs table."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.project import head_commit  # noqa: E402

SETTINGS = [(0, 64), (4, 64), (4, 256), (16, 256), (4, 1024), (32, 1024)]  # (channels per layer, scale)
METHODS = {
    "int8-dynamic (smoothing)": ("int8-dynamic", []),
    "int8-dynamic, no smoothing": ("int8-dynamic", ["int8_dynamic.smoothing.enabled=false"]),
    "int8-static (SmoothQuant)": ("int8-static", []),
    "int4 (awq, b128, 8-bit table)": ("int4", []),
    "int4 awq, b32, 4-bit table": ("int4", ["int4.block_size=32", "int4.tied_bits=4"]),
    "int4 rtn (ORT), b32, 4-bit table": ("int4", ["int4.algorithm=rtn", "int4.block_size=32", "int4.tied_bits=4"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "outlier_sweep.json")
    args = ap.parse_args()

    from pipeline.consumer.manifest import machine
    from pipeline.params import load_params
    from pipeline.runner import run_stage
    from pipeline.scoring.evaluate import Scoring

    art = args.artifacts.resolve()
    data = art / "data"
    cal = str(data / "calibration.txt")
    text = (data / "eval.txt").read_text()
    rows = []
    for channels, scale in SETTINGS:
        base = [f"model.source={art / 'checkpoint'}", f"model.outliers.channels={channels}",
                f"model.outliers.scale={scale}", f"imatrix.calibration.source={cal}",
                f"int8_static.calibration.source={cal}"]
        p = load_params(REPO / "params.yaml", base)
        with tempfile.TemporaryDirectory(prefix="outlier-sweep-") as tmp:
            w = Path(tmp)
            run_stage("checkpoint", p, data, w / "checkpoint")
            run_stage("export", p, w / "checkpoint", w / "export", Scoring(text, w / "checkpoint", p.eval))
            run_stage("fused", p, w / "export", w / "fused")
            im = run_stage("imatrix", p, w / "fused", w / "imatrix").manifest["metrics"]
            row = {"channels": channels, "scale": scale, "max_outlier_ratio": im["max_outlier_ratio"],
                   "median_outlier_ratio": im["median_outlier_ratio"], "methods": {}}
            for name, (stage, overrides) in METHODS.items():
                q = load_params(REPO / "params.yaml", base + overrides)
                built = run_stage(stage, q, w / "fused", w / "candidate", Scoring(text, w / "export", q.eval),
                                  {"imatrix": w / "imatrix"} if stage != "int8-static" else None)
                ev = built.manifest["metrics"]["eval"]
                row["methods"][name] = {k: ev[k] for k in ("kld_mean", "kld_p99", "top1_agreement", "drift_pct")}
                shutil.rmtree(w / "candidate")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    commit = head_commit(REPO)
    doc = {"commit": commit, "machine": machine(), "model": "builtin:qwen3-tiny (artifacts/checkpoint)",
           "how": "model.outliers: `channels` hidden and intermediate channels per layer scaled by `scale` (function "
                  "unchanged); each method with default params, scored against that model's FP32 export on the "
                  "built-in eval split (80 windows of 128)", "settings": rows}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"outlier sweep: {len(rows)} settings x {len(METHODS)} methods -> {args.out}")


if __name__ == "__main__":
    main()
