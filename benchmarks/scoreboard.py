"""The scoreboard, like llama.cpp's: every precision and INT4 method on one model, with size, PPL change,
mean / p99 KLD and top-1 against the FP32 export, and decode speed, plus onnxruntime-genai's builder
int8 / int4 graphs from the same checkpoint scored by the same evaluator, all in one run.

    python benchmarks/scoreboard.py --work DIR --label builtin [--windows 0] [--out benchmarks/scoreboard_builtin.json]

``DIR`` holds ``data``, ``checkpoint``, ``export`` and ``fused`` artifacts (from `dvc repro`, or
benchmarks/real_shapes.py for a real shape; for the outlier model, a checkpoint built with
``-S model.outliers.channels=4``). Each variant is built with the pipeline's own stages (params.yaml
plus the variant's overrides), scored, timed (decode after a 16-token prompt, median of ``--repeats``,
our runtime, ORT's default threads) and removed before the next: one model on disk and in memory at a
time. ``python benchmarks/tables.py`` renders the docs table from the results file."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.project import head_commit  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))

# name -> (stage, overrides): the defaults first, then what they are measured against.
VARIANTS = {
    "fp16": ("fp16", []),
    "int8-dynamic (default: smoothing)": ("int8-dynamic", []),
    "int8-dynamic, no smoothing": ("int8-dynamic", ["int8_dynamic.smoothing.enabled=false"]),
    "int8-static (SmoothQuant QDQ)": ("int8-static", []),
    "int4 (default: awq, b128, 8-bit table)": ("int4", []),
    "int4 rtn (ORT), b32, 4-bit table": ("int4", ["int4.algorithm=rtn", "int4.block_size=32", "int4.tied_bits=4"]),
    "int4 k_quant (ORT), b32, 4-bit table": ("int4", ["int4.algorithm=k_quant", "int4.block_size=32", "int4.tied_bits=4"]),
    "int4 imatrix, b32, 4-bit table": ("int4", ["int4.algorithm=imatrix", "int4.block_size=32", "int4.tied_bits=4"]),
    "int4 awq, b32, 4-bit table": ("int4", ["int4.block_size=32", "int4.tied_bits=4"]),
    "int4 awq, b32, 4-bit table, 25 % projections 8-bit": ("int4", ["int4.block_size=32", "int4.tied_bits=4",
                                                                    "int4.int8_fraction=0.25"]),
    "int4 awq, b32, 8-bit table": ("int4", ["int4.block_size=32"]),
    "int4 rtn (ORT), b128, 4-bit table": ("int4", ["int4.algorithm=rtn", "int4.tied_bits=4"]),
    "int4 rtn (ORT), b128, 8-bit table": ("int4", ["int4.algorithm=rtn"]),
    "int4 awq, b128, 4-bit table": ("int4", ["int4.tied_bits=4"]),
    "int4 gptq, b128, 8-bit table": ("int4", ["int4.algorithm=gptq"]),
    "int4 gptq, b32, 4-bit table": ("int4", ["int4.algorithm=gptq", "int4.block_size=32", "int4.tied_bits=4"]),
}
# GPTQ against what it is measured against: the default and the same-size rows (benchmarks/scoreboard_gptq_*.json)
GPTQ = ("int4 (default: awq, b128, 8-bit table)", "int4 gptq, b128, 8-bit table", "int4 rtn (ORT), b32, 4-bit table",
        "int4 awq, b32, 4-bit table", "int4 gptq, b32, 4-bit table")
# what a real shape is measured on (each build there takes minutes)
REAL_SHAPE = ("int8-dynamic (default: smoothing)", "int8-dynamic, no smoothing", "int4 (default: awq, b128, 8-bit table)",
              "int4 rtn (ORT), b32, 4-bit table", "int4 awq, b32, 4-bit table", "int4 rtn (ORT), b128, 4-bit table")
FIGURES = ("drift_pct", "kld_mean", "kld_p99", "top1_agreement", "size_ratio", "ppl", "ref_ppl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--windows", type=int, default=0, help="eval.max_windows (0 = every window)")
    ap.add_argument("--calibration", type=int, default=32, help="calibration samples (imatrix, int8-static)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--only", default="", help="';'-separated variant names, 'real-shape' or 'gptq' (default: all)")
    ap.add_argument("--peer-python", default="/tmp/genai-venv/bin/python")
    ap.add_argument("--peer-cache", default="/tmp/genai-builder-cache")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = args.out or REPO / "benchmarks" / f"scoreboard_{args.label}.json"

    import bench

    from pipeline.consumer.manifest import machine
    from pipeline.consumer.runtime import Runtime
    from pipeline.params import load_params
    from pipeline.runner import run_stage
    from pipeline.scoring.evaluate import Scoring, encoder, make_windows, model_bytes, score

    work = args.work.resolve()
    cal = str(work / "data" / "calibration.txt")
    common = [f"eval.max_windows={args.windows}", f"imatrix.calibration.samples={args.calibration}",
              f"imatrix.calibration.source={cal}", f"int8_static.calibration.samples={args.calibration}",
              f"int8_static.calibration.source={cal}"]
    text = (work / "data" / "eval.txt").read_text()
    params = load_params(REPO / "params.yaml", common)
    scoring = Scoring(text, work / "export", params.eval)
    t0 = time.perf_counter()
    run_stage("imatrix", params, work / "fused", work / "imatrix")
    imatrix_s = round(time.perf_counter() - t0, 1)
    ids = encoder(work / "export")(text)[:128]  # the tokenizer alone: no model held by this process
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([int(i) for i in ids], f)
    timing = argparse.Namespace(new_tokens=args.new_tokens, repeats=args.repeats)
    rows: dict = {}
    only = {"real-shape": set(REAL_SHAPE), "gptq": set(GPTQ)}.get(args.only, set(filter(None, args.only.split(";"))))
    export_bytes = model_bytes(work / "export")
    try:
        for name, (stage, overrides) in VARIANTS.items():
            if only and name not in only:
                continue
            print(f"== {name}", file=sys.stderr, flush=True)
            dest = work / "scoreboard-artifact"
            t0 = time.perf_counter()
            built = run_stage(stage, load_params(REPO / "params.yaml", common + overrides), work / "fused", dest,
                              scoring, {"imatrix": work / "imatrix"} if stage in ("int4", "int8-dynamic") else None)
            build_s = round(time.perf_counter() - t0, 1)
            ev = built.manifest["metrics"]["eval"]
            speed = bench.run_worker(sys.executable, "ours", dest, f.name, timing)
            rows[name] = {"stage": stage, "overrides": overrides, **{k: ev[k] for k in FIGURES},
                          "size_bytes": model_bytes(dest), "size_vs_export": round(model_bytes(dest) / export_bytes, 4),
                          "decode_tok_s": speed.get("decode_tok_s") if isinstance(speed, dict) else speed,
                          "decode_tok_s_runs": speed.get("decode_tok_s_runs") if isinstance(speed, dict) else None,
                          "build_seconds": build_s, "build_peak_rss_mb": built.run["peak_rss_mb"]}
            print(f"   {json.dumps(rows[name])}", file=sys.stderr, flush=True)
            shutil.rmtree(dest)
        peer = Path(args.peer_python)
        peers: dict = {}
        with_peers = not only or args.only == "real-shape"  # a run of some of our rows measures no peer
        if with_peers and not peer.is_file():
            peers["left out"] = f"no peer venv at {peer} (benchmarks/bench.py's docstring says how to make it)"
        elif with_peers:
            windows = make_windows(encoder(work / "export")(text), params.eval.ctx, params.eval.max_windows)
            for precision in ("int8", "int4"):
                built = bench.build_peer(str(peer), work / "checkpoint", precision, Path(args.peer_cache))
                if isinstance(built, str):
                    peers[f"builder {precision}"] = built
                    continue
                if not (built / "config.json").is_file():  # our runtime reads the model's shape from it
                    shutil.copy2(work / "checkpoint" / "config.json", built / "config.json")
                figures = score(Runtime(built), windows, Runtime(work / "export"), label=f"builder {precision}")
                speed = bench.run_worker(str(peer), "builder", built, f.name, timing)
                size = model_bytes(built)
                peers[f"onnxruntime-genai builder {precision}"] = {
                    **{k: figures[k] for k in FIGURES if k in figures}, "size_bytes": size,
                    "size_vs_export": round(size / export_bytes, 4),
                    "decode_tok_s": speed.get("decode_tok_s") if isinstance(speed, dict) else speed,
                    "decode_tok_s_runs": speed.get("decode_tok_s_runs") if isinstance(speed, dict) else None,
                    "engine": "onnxruntime-genai runtime", "options": {"precision": precision, "execution_provider": "cpu",
                                                                       **bench.BUILDER_OPTIONS}}
                print(f"   {precision}: {json.dumps(peers[f'onnxruntime-genai builder {precision}'])}", file=sys.stderr)
    finally:
        os.unlink(f.name)
    im = json.loads((work / "imatrix" / "manifest.json").read_text())["metrics"]
    commit = head_commit(REPO)
    ckpt = json.loads((work / "checkpoint" / "manifest.json").read_text())
    doc = {"label": args.label, "commit": commit, "machine": machine(),
           "model": {"source": ckpt["source"].get("model"), "outliers": ckpt["source"].get("outliers"),
                     "checkpoint_id": ckpt["artifact_id"], "imatrix": {**im, "build_seconds": imatrix_s}},
           "settings": {"eval_windows": args.windows, "ctx": params.eval.ctx, "calibration_samples": args.calibration,
                        "decode": f"{args.new_tokens} tokens after a 16-token prompt, median of {args.repeats}",
                        "threads": f"{os.cpu_count()} (ORT intra-op default, every engine)",
                        "reference": "FP32 export (our runtime)"},
           "variants": rows, "peers": peers}
    if only and out.is_file():  # a partial run updates the rows it measured
        old = json.loads(out.read_text())
        old["variants"].update(rows)
        doc = {**old, "commit": commit}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"scoreboard: {len(rows)} variants and {len(peers)} peer rows on {args.label} -> {out}")


if __name__ == "__main__":
    main()
