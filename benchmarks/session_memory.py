"""What an ONNX Runtime session over an FP32 artifact holds, with ORT's weight prepacking on and off
(pipeline/consumer/runtime.py turns it off where the weights exceed half the memory available): load time, the
time of a 128-token window, and the anonymous and file-backed resident memory, each variant in a fresh
process (the peaks of pipeline/ops/memory.py's sampler, every 0.05 s).

    python benchmarks/session_memory.py ARTIFACT_DIR [--out benchmarks/session_memory_<name>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(artifact: str, prepack: bool) -> dict:
    """One variant, in this process."""
    import numpy as np

    from pipeline.consumer.runtime import GraphIO, make_session
    from pipeline.ops.memory import Sampler, tree_rss

    sampler = Sampler(os.getpid(), every_s=0.05).start()
    path = Path(artifact) / "model.onnx"
    config = json.loads((Path(artifact) / "config.json").read_text())
    t0 = time.perf_counter()
    session = make_session(path, threads=None, prepack=prepack)
    load_s = time.perf_counter() - t0
    loaded = tree_rss(os.getpid())
    io = GraphIO.from_onnx(path, config)
    ids = np.random.default_rng(0).integers(0, 1000, (1, 128))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        session.run(["logits"], io.feeds(ids))
        times.append(time.perf_counter() - t0)
    time.sleep(0.2)
    peak = sampler.stop()
    gb = lambda b: round(b / 1e9, 2)  # noqa: E731
    return {"prepack": prepack, "load_s": round(load_s, 2), "window_128_s": round(min(times), 3),
            "after_load_gb": {"anon": gb(loaded["anon"]), "file": gb(loaded["file"])},
            "peak_gb": {"anon": gb(peak["anon"]), "file": gb(peak["file"]), "total": gb(peak["total"])}}


def variants(script: str, argv: list[str], flag: str, values: tuple[str, ...]) -> list[dict]:
    """Each variant in a fresh process (``script *argv flag value``), whose last line out is its figures."""
    rows = []
    for value in values:
        proc = subprocess.run([sys.executable, script, *argv, flag, value], check=True, capture_output=True, text=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{flag.lstrip('-')} {value}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def record(artifact: str, out: str | None, rows: list[dict], **figures) -> None:
    """The variants' figures beside the artifact's identity and this machine's ORT, printed and written."""
    import onnxruntime

    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    result = {"artifact": manifest.get("artifact_id"), "stage": manifest.get("stage"),
              "source": (manifest.get("source") or {}).get("model"), **figures,
              "onnxruntime": onnxruntime.__version__, "threads": f"intra-op {os.cpu_count()} (every core)",
              "date": time.strftime("%Y-%m-%d"), "variants": rows}
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--out")
    ap.add_argument("--variant", choices=["packed", "in-place"], help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.artifact, args.variant == "packed")))
        return
    from pipeline.consumer.runtime import model_file_bytes

    rows = variants(__file__, [args.artifact], "--variant", ("packed", "in-place"))
    record(args.artifact, args.out, rows, weights_bytes=model_file_bytes(Path(args.artifact) / "model.onnx"))

if __name__ == "__main__":
    main()
