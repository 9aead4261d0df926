"""The whole DAG at a real Qwen3 shape (random weights), stage by stage, with each stage's wall time,
peak RSS (anonymous and file-backed apart) and artifact size, against the memory targets: peak RSS <=
2x the FP32 weights + 1 GB (the real-size issue), and <= the FP32 weights + 2 GB (the full-4B issue).

    python benchmarks/real_shapes.py --shape qwen3-1.7b --work /tmp/r17 [--windows 4] [--calibration 8]
    python benchmarks/real_shapes.py --shape "qwen3-4b?layers=2" --work /tmp/r4b2 --stages checkpoint,export,fused
    python benchmarks/real_shapes.py --shape qwen3-0.6b --work /tmp/r06 --collect   # figures of a finished run
    python benchmarks/real_shapes.py --shape "qwen3-4b?dtype=bfloat16" --repo CLONE   # a finished `dvc exp run`
    python benchmarks/real_shapes.py --extrapolate A.json B.json --layers 36   # two depths of one width -> N layers
    python benchmarks/real_shapes.py --project A.json B.json C.json   # full-depth runs -> Qwen3-8B / 14B needs

Each stage runs as `pipeline <verb>` with the arguments dvc.yaml gives it, plus the ``-S`` overrides
below, in its own process; the figures are those the stage records in its own manifest
(``peak_rss_mb``: the process's peak resident memory, MiB; ``wall_seconds``). Artifacts go under ``--work``
(about 4.5x the FP32 weights of disk). Writes ``benchmarks/real_shapes_<shape>.json`` and prints the
README's table."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.project import head_commit  # noqa: E402
from pipeline.registry import STAGES as ALL  # noqa: E402

STAGES = tuple(n for n in ALL if n != "data")  # every stage after the text split, in DAG order (pipeline/registry.py)


def commands(a: Path) -> dict[str, list[str]]:
    ev = ["--reference", str(a / "export"), "--data", str(a / "data")]
    return {
        "data": ["data", "--out", str(a / "data")],  # every command also gets --run-metrics (see main)
        "checkpoint": ["checkpoint", "--data", str(a / "data"), "--out", str(a / "checkpoint")],
        "export": ["export", "--checkpoint", str(a / "checkpoint"), "--out", str(a / "export"), "--data", str(a / "data")],
        "fused": ["fuse", "--input", str(a / "export"), "--out", str(a / "fused"), *ev],
        "fp16": ["fp16", "--input", str(a / "fused"), "--out", str(a / "fp16"), *ev],
        "imatrix": ["imatrix", "--input", str(a / "fused"), "--out", str(a / "imatrix"),
                    "-S", f"imatrix.calibration.source={a / 'data' / 'calibration.txt'}"],
        "int8-dynamic": ["quantize", "--mode", "dynamic", "--input", str(a / "fused"), "--out", str(a / "int8-dynamic"),
                         *ev, "--imatrix", str(a / "imatrix")],
        "int4": ["quantize", "--mode", "int4", "--input", str(a / "fused"), "--out", str(a / "int4"), *ev,
                 "--imatrix", str(a / "imatrix")],
        "int8-static": ["quantize", "--mode", "static", "--input", str(a / "fused"), "--out", str(a / "int8-static"),
                        *ev, "-S", f"int8_static.calibration.source={a / 'data' / 'calibration.txt'}"],
    }


def figures(a: Path, stage: str, fp32_bytes: int, build: Path | None = None) -> dict:
    m = json.loads((a / stage / "manifest.json").read_text())
    met = m["metrics"]
    # the run's figures, outside the artifact (DVC's metrics/build/ in a repo)
    run = json.loads(((build or a / "build") / f"{stage}.json").read_text())
    # the weights' bytes as the manifest lists them (the files may be gone since)
    files = {f["path"]: f["size"] for f in m.get("files", [])}
    size = sum(v for k, v in files.items() if k.startswith("model.onnx")) or sum(
        v for k, v in files.items() if k.endswith(".safetensors"))
    peak = (run.get("peak_rss_mb") or 0) * 2**20  # in MiB (ru_maxrss / 1024)
    target = 2 * fp32_bytes + 1e9
    row = {"stage": stage, "artifact_id": m["artifact_id"], "wall_s": run.get("wall_seconds"),
           "peak_rss_gb": round(peak / 1e9, 2), "peak_vs_fp32": round(peak / fp32_bytes, 2),
           "size_mb": round(size / 1e6, 1), "target_gb": round(target / 1e9, 2), "within_target": peak <= target}
    sampled = run.get("sampled_rss_mb")  # the process tree's peaks, sampled (pipeline/ops/supervise.py)
    if sampled:
        row["sampled_gb"] = {k: round(sampled[k] * 2**20 / 1e9, 2) for k in ("anon", "file", "shmem", "total")}
    ev = met.get("eval") or {}
    if ev:
        row.update({k: ev.get(k) for k in ("drift_pct", "kld_mean", "top1_agreement")})
    sq = (m.get("quant_policy") or {}).get("smoothquant")
    if sq:
        row["smoothquant"] = {k: sq[k] for k in ("groups", "folded", "mul_inserted")}
    return row


def disk(repo: Path) -> dict:
    """What a DVC workspace holds: the artifacts' and the cache's apparent bytes, and what the
    filesystem has in use (with reflinks, ``dvc commit`` shares the blocks: used < artifacts + cache)."""
    import shutil

    def apparent(root: Path) -> int:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())

    mount = max((line.split() for line in Path("/proc/mounts").read_text().splitlines()
                 if repo.resolve().is_relative_to(line.split()[1])), key=lambda f: len(f[1]))
    return {"artifacts_gb": round(apparent(repo / "artifacts") / 1e9, 2),
            "dvc_cache_gb": round(apparent(repo / ".dvc" / "cache") / 1e9, 2),
            "filesystem_used_gb": round(shutil.disk_usage(repo).used / 1e9, 2),
            "filesystem": mount[2], "mount_options": mount[3]}


def extrapolate(paths: list[Path], layers: int) -> dict:
    """Each stage's wall time, peak RSS and size at ``layers`` layers, on the line through two runs of
    the same width at two depths (every figure here grows linearly with the layer count: the weights do)."""
    a, b = (json.loads(Path(p).read_text()) for p in paths)
    if a["hidden_size"] != b["hidden_size"] or a["layers"] == b["layers"]:
        raise SystemExit("--extrapolate needs two runs of one width at two depths")
    span = b["layers"] - a["layers"]
    at = lambda x, y: x + (y - x) * (layers - a["layers"]) / span  # noqa: E731
    fp32 = at(a["fp32_weight_bytes"], b["fp32_weight_bytes"])
    rows = []
    rb = {r["stage"]: r for r in b["stages"]}
    for ra in a["stages"]:
        r2 = rb.get(ra["stage"])
        if r2 is None:
            continue
        falls = r2["peak_rss_gb"] < ra["peak_rss_gb"]  # set by the table and logits, not the layers: no slope
        rows.append({"stage": ra["stage"],
                     "wall_s": round(at(ra["wall_s"], r2["wall_s"])) if r2["wall_s"] >= ra["wall_s"] else None,
                     "peak_rss_gb": None if falls else round(at(ra["peak_rss_gb"], r2["peak_rss_gb"]), 1),
                     "size_mb": round(at(ra["size_mb"], r2["size_mb"])),
                     "per_layer_rss_gb": round((r2["peak_rss_gb"] - ra["peak_rss_gb"]) / span, 3)})
    return {"from": [str(p) for p in paths], "layers": layers, "fp32_weight_bytes": round(fp32),
            "target_gb": round((2 * fp32 + 1e9) / 1e9, 1), "stages": rows}


# Larger published Qwen3 shapes, for --project only (their config.json files on the hub; not built
# here: Qwen3-8B is 32.8 GB of FP32 weights). Unlike 0.6B-4B, their lm_head is a matrix of its own.
LARGER = {
    "qwen3-8b": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False},
    "qwen3-14b": {"hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40, "num_attention_heads": 40,
                  "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False},
}
MACHINES_GB = (16, 24, 32, 48, 64, 96, 128, 192, 256)  # RAM sizes machines come in


def project(paths: list[Path], shapes=("qwen3-8b", "qwen3-14b")) -> dict:
    """What each stage needs at a larger shape: peak RSS by the measured memory model
    (pipeline/ops/memory_model.json), wall time on a line through the full-depth runs given (time per FP32
    byte, least squares with an intercept), artifact size by the ratio to the FP32 weights the largest
    run measured, disk for the DAG's artifacts (one copy with reflinks, two with DVC's copy), and the
    smallest usual machine whose RAM holds the largest peak with 10 % to spare."""
    import numpy as np

    from pipeline.ops.memory import estimate, fp32_weight_bytes

    runs = [json.loads(Path(p).read_text()) for p in paths]
    largest = max(runs, key=lambda r: r["fp32_weight_bytes"])
    out = {"from": [str(p) for p in paths], "memory_model": "pipeline/ops/memory_model.json", "shapes": []}
    for name in shapes:
        cfg = LARGER[name]
        fp32 = fp32_weight_bytes(cfg)["total"]
        rows, artifacts = [], 0.0
        for ref in largest["stages"]:
            stage = ref["stage"]
            pts = [(r["fp32_weight_bytes"] / 1e9, row["wall_s"]) for r in runs for row in r["stages"]
                   if row["stage"] == stage and row.get("wall_s")]
            wall = None
            if len(pts) >= 2:
                (k, c), *_ = np.linalg.lstsq(np.array([[x, 1.0] for x, _ in pts]), np.array([y for _, y in pts]),
                                             rcond=None)
                wall = round(float(k * fp32 / 1e9 + c))
            est = estimate(stage, cfg)
            size = ref["size_mb"] * 1e6 / largest["fp32_weight_bytes"] * fp32
            artifacts += size
            rows.append({"stage": stage, "peak_rss_gb": round(est["bytes"] / 1e9, 1) if est else None,
                         "wall_s": wall, "size_gb": round(size / 1e9, 2)})
        peak = max(r["peak_rss_gb"] or 0 for r in rows)
        out["shapes"].append({"shape": name, "fp32_weight_bytes": fp32, "layers": cfg["num_hidden_layers"],
                              "stages": rows, "dag_wall_s": sum(r["wall_s"] or 0 for r in rows),
                              "disk_gb": {"reflink": round(artifacts / 1e9, 1), "copy": round(2 * artifacts / 1e9, 1)},
                              "max_peak_gb": peak,
                              "machine_gb": next((m for m in MACHINES_GB if m * 2**30 >= 1.1 * peak * 1e9), None)})
    return out


def shape_config(shape: str, layers: int | None = None) -> dict:
    """config.json's sizes for ``random:<shape>`` (what stages/checkpoint.py writes: transformers'
    Qwen3Config defaults head_dim to 128, the vocab is the real one, the table is tied)."""
    from pipeline.checkpoints.shapes import QWEN3_SHAPES, QWEN3_VOCAB

    name = shape.partition("?")[0]
    config = {"head_dim": 128, **QWEN3_SHAPES[name], "vocab_size": QWEN3_VOCAB, "tie_word_embeddings": True}
    if layers:
        config["num_hidden_layers"] = layers
    return config


def fit(paths: list[Path]) -> dict:
    """The memory model the stages check themselves against (pipeline/ops/memory.py): per stage, peak RSS =
    a x layer weights + b x embedding table + c (FP32 bytes), non-negative least squares over the runs
    given; a stage needs three runs of differing shapes to be modelled. A half-precision checkpoint's run
    counts for every stage after the checkpoint (they all hold FP32 graphs). A later file's run of a
    shape replaces an earlier one's, stage by stage (a re-run of the stages whose code changed)."""
    import numpy as np
    from scipy.optimize import nnls

    from pipeline.ops.memory import fp32_weight_bytes

    points: dict[str, dict] = {}
    for path in paths:
        run = json.loads(Path(path).read_text())
        w = fp32_weight_bytes(shape_config(run["shape"], run["layers"]))
        half = run.get("checkpoint_dtype", "float32") != "float32"
        for row in run["stages"]:
            if half and row["stage"] == "checkpoint":
                continue  # it holds the half-precision bytes: not the FP32 model this fit is in
            if row.get("peak_rss_gb"):
                points.setdefault(row["stage"], {})[run["shape"]] = (
                    w["total"] - w["table"], w["table"], row["peak_rss_gb"] * 1e9)
    stages = {}
    for stage, by_shape in points.items():
        if len(by_shape) < 3:
            continue
        pts = list(by_shape.values())
        x = np.array([[a / 1e9, b / 1e9, 1.0] for a, b, _ in pts])
        y = np.array([p[2] / 1e9 for p in pts])
        coef, _ = nnls(x, y)
        worst = float(np.max(np.abs(x @ coef - y) / y))
        stages[stage] = {"a": round(float(coef[0]), 4), "b": round(float(coef[1]), 4), "c": round(float(coef[2]) * 1e9),
                         "max_residual": round(worst, 3), "runs": list(by_shape)}
    return {"source": "benchmarks/real_shapes.py --fit " + " ".join(str(Path(p)) for p in paths),
            "model": "peak RSS = a x (FP32 weights - embedding table) + b x embedding table + c bytes",
            "stages": stages}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extrapolate", nargs=2, type=Path, metavar="JSON")
    ap.add_argument("--fit", nargs="+", type=Path, metavar="JSON",
                    help="fit the stages' memory model (pipeline/ops/memory_model.json) to these runs")
    ap.add_argument("--project", nargs="+", type=Path, metavar="JSON",
                    help="full-depth runs: what Qwen3-8B and 14B need (memory model, wall and size slopes)")
    ap.add_argument("--layers", type=int, default=36, help="with --extrapolate: the depth to extrapolate to")
    analysis = bool({"--extrapolate", "--fit", "--project"} & set(sys.argv))  # of results files: no run
    ap.add_argument("--shape", required=not analysis, help="qwen3-0.6b | qwen3-1.7b | qwen3-4b, optionally ?layers=N")
    ap.add_argument("--work", required=not analysis and "--repo" not in sys.argv, type=Path)
    ap.add_argument("--windows", type=int, default=4, help="eval.max_windows")
    ap.add_argument("--calibration", type=int, default=8, help="int8_static.calibration.samples")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--collect", action="store_true", help="only read the figures of a finished run")
    ap.add_argument("--repo", type=Path, help="only read the figures of a finished `dvc exp run` / `dvc repro` in "
                    "this workspace (artifacts/, metrics/build/), and its disk use")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.fit:
        model = fit(args.fit)
        out = args.out or REPO / "pipeline" / "ops" / "memory_model.json"
        out.write_text(json.dumps(model, indent=2) + "\n")
        for stage, f in model["stages"].items():
            print(f"{stage}: {f['a']:.3f} x layers + {f['b']:.3f} x table + {f['c'] / 1e9:.2f} GB "
                  f"(worst fit {f['max_residual']:.0%} over {len(f['runs'])} runs)")
        print(f"wrote {out}")
        return 0
    if args.project:
        pr = project(args.project)
        out = args.out or REPO / "benchmarks" / "real_shapes_projected.json"
        out.write_text(json.dumps(pr, indent=2) + "\n")
        for sh in pr["shapes"]:
            print(f"{sh['shape']}: {sh['fp32_weight_bytes'] / 1e9:.1f} GB FP32, largest stage {sh['max_peak_gb']} GB "
                  f"-> a {sh['machine_gb']} GB machine; DAG ~{sh['dag_wall_s'] / 60:.0f} min, disk "
                  f"{sh['disk_gb']['reflink']} GB (reflink) / {sh['disk_gb']['copy']} GB (copy)")
        print(f"wrote {out}")
        return 0
    if args.extrapolate:
        ex = extrapolate(args.extrapolate, args.layers)
        out = args.out or REPO / "benchmarks" / f"real_shapes_extrapolated_{args.layers}_layers.json"
        out.write_text(json.dumps(ex, indent=2) + "\n")
        print(f"{args.layers} layers: {ex['fp32_weight_bytes'] / 1e9:.1f} GB FP32 weights, target {ex['target_gb']} GB\n")
        print("| stage | wall | peak RSS | per layer | artifact |")
        print("|---|---:|---:|---:|---:|")
        for r in ex["stages"]:
            peak = "falls with depth" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.1f} GB"
            wall = "—" if r["wall_s"] is None else f"{r['wall_s']:,} s"
            print(f"| {r['stage']} | {wall} | {peak} | {r['per_layer_rss_gb'] * 1e3:.0f} MB | "
                  f"{r['size_mb']:,} MB |")
        print(f"\nwrote {out}")
        return 0
    stages = [s for s in args.stages.split(",") if s]
    a = args.repo / "artifacts" if args.repo else args.work / "a"
    build = args.repo / "metrics" / "build" if args.repo else None
    overrides = ["-S", f"model.source=random:{args.shape}", "-S", f"eval.max_windows={args.windows}",
                 "-S", f"int8_static.calibration.samples={args.calibration}", "-S", "int8_static.calibration.stride=4",
                 "-S", f"imatrix.calibration.samples={args.calibration}"]
    cmds = commands(a)
    if not (args.collect or args.repo):
        for stage in (["data"] if not (a / "data").is_dir() else []) + stages:
            cmd = ["pipeline", cmds[stage][0], *overrides, *cmds[stage][1:],
                   "--run-metrics", str(a / "build" / f"{stage}.json")]
            print(f"== {stage}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO)
            if proc.returncode:
                print(f"== {stage} failed (exit {proc.returncode}) after {time.perf_counter() - t0:.0f} s", flush=True)
                return proc.returncode
    from pipeline.ops.memory import fp32_weight_bytes

    config = json.loads((a / "checkpoint" / "config.json").read_text())
    fp32 = fp32_weight_bytes(config)["total"]  # the weights in FP32, whatever dtype the checkpoint stores
    rows = [figures(a, s, fp32, build) for s in stages if (a / s / "manifest.json").is_file()]
    result = {"shape": args.shape, "fp32_weight_bytes": fp32,
              "checkpoint_dtype": config.get("torch_dtype") or config.get("dtype") or "float32",
              "checkpoint_bytes": sum(f["size"] for f in json.loads((a / "checkpoint" / "manifest.json").read_text())["files"]
                                if f["path"].endswith(".safetensors")),
              "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
              "eval_windows": args.windows, "calibration_samples": args.calibration,
              "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                          "python": sys.version.split()[0]},
              "date": time.strftime("%Y-%m-%d"), "stages": rows,
              "dag_wall_s": round(sum(r["wall_s"] or 0 for r in rows)),  # the stages' own wall times, summed
              "commit": head_commit(REPO, short=True) or None}
    if args.repo:
        result["disk"] = disk(args.repo)
    out = args.out or REPO / "benchmarks" / f"real_shapes_{args.shape.replace('?', '_').replace('=', '')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.shape}: {fp32 / 1e9:.2f} GB FP32 weights; target peak RSS <= {(2 * fp32 + 1e9) / 1e9:.1f} GB\n")
    print("| stage | wall | peak RSS | × FP32 weights | within target | artifact | vs FP32 | drift vs export |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        drift = "—" if r.get("drift_pct") is None else f"{r['drift_pct']:+.3f} %"
        print(f"| {r['stage']} | {r['wall_s']:.0f} s | {r['peak_rss_gb']:.2f} GB | "
              f"{r['peak_vs_fp32']:.2f} | {'yes' if r['within_target'] else '**no**'} | "
              f"{r['size_mb']:,.1f} MB | {r['size_mb'] * 1e6 / fp32:.3f} | {drift} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
