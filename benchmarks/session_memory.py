"""What an ONNX Runtime session over an FP32 artifact holds, with ORT's weight prepacking on and off
(pipeline/runtime.py turns it off where the weights exceed half the memory available): load time, the
time of a 128-token window, and the anonymous and file-backed resident memory, each variant in a fresh
process (the peaks of pipeline/memory.py's sampler, every 0.05 s).

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

    from pipeline.memory import Sampler, tree_rss
    from pipeline.runtime import GraphIO, make_session

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--out")
    ap.add_argument("--variant", choices=["packed", "in-place"], help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.artifact, args.variant == "packed")))
        return
    import onnxruntime

    from pipeline.runtime import weight_bytes

    rows = []
    for variant in ("packed", "in-place"):
        proc = subprocess.run([sys.executable, __file__, args.artifact, "--variant", variant], check=True,
                              capture_output=True, text=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(variant, rows[-1], file=sys.stderr)
    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    result = {"artifact": manifest.get("artifact_id"), "source": (manifest.get("source") or {}).get("model"),
              "weights_bytes": weight_bytes(Path(args.artifact) / "model.onnx"),
              "onnxruntime": onnxruntime.__version__, "threads": f"intra-op {os.cpu_count()} (every core)",
              "date": time.strftime("%Y-%m-%d"), "variants": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
