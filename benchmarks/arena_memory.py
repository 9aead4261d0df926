"""Peak memory of a long prompt through a graph whose KV cache is concatenated (the export), with ONNX
Runtime's CPU memory arena on and off (pipeline/consumer/runtime.py turns it off for such graphs): each variant
in a fresh process scores the last position of one window of ``--ctx`` tokens through the runtime's
chunked prefill (the peaks of pipeline/ops/memory.py's sampler, every 0.05 s), beside what past + present
(two copies of the cache at its last step) and the weights come to.

    python benchmarks/arena_memory.py ARTIFACT_DIR --ctx 8192 [--out benchmarks/arena_memory_<shape>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(artifact: str, ctx: int, arena: bool) -> dict:
    """One variant, in this process."""
    import numpy as np

    from pipeline.consumer.runtime import Runtime, make_session, model_path
    from pipeline.ops.memory import Sampler

    sampler = Sampler(os.getpid(), every_s=0.05).start()
    rt = Runtime(artifact)
    if arena != rt.session.get_session_options().enable_cpu_mem_arena:  # the other variant: same graph, same IO
        rt.session = make_session(model_path(rt.dir), arena=arena)
    ids = np.random.default_rng(0).integers(0, 4000, ctx)
    t0 = time.perf_counter()
    rt.logits(ids, last=1)
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    return {"arena": arena, "wall_s": round(wall, 1), "chunk": rt.chunk_for(ctx),
            "peak_gb": {k: round(peak[k] / 1e9, 2) for k in ("anon", "file", "total")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--out")
    ap.add_argument("--arena", choices=["on", "off"], help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    if args.arena:
        print(json.dumps(measure(args.artifact, args.ctx, args.arena == "on")))
        return
    from session_memory import record, variants

    from pipeline.consumer.runtime import kv_cache_bytes, model_file_bytes

    rows = variants(__file__, [args.artifact, "--ctx", str(args.ctx)], "--arena", ("on", "off"))
    config = json.loads((Path(args.artifact) / "config.json").read_text())
    kv = kv_cache_bytes(config, args.ctx, 4)
    weights = model_file_bytes(Path(args.artifact) / "model.onnx")
    record(args.artifact, args.out, rows, ctx=args.ctx, weights_gb=round(weights / 1e9, 2),
           kv_cache_gb=round(kv / 1e9, 2), weights_plus_two_caches_gb=round((weights + 2 * kv) / 1e9, 2))

if __name__ == "__main__":
    main()
