"""Decode speed at depth with and without the grouped decode branch (pipeline/graph/decode.py), same artifact,
same process: our runtime's session as the artifact ships it (ORT's GroupQueryAttention at every step)
against the rewritten one (each KV group read once), tokens per second at each depth, each against its
bandwidth bound (the weights plus the KV cache read once a token, over the read bandwidth measured in the
same process).

The KV buffers are the runtime's own (SharedKV), bound in place and held at the depth by the mask, so no
prompt is prefilled: a decode step reads every position the mask admits whatever the values are, and the
time of a step does not depend on them. They are filled first (a page never written is the shared zero
page: reading it costs no memory bandwidth, and a first run without the fill measured decode above the
bound). The logits of the two sessions are compared on the first
step at each depth.

    python benchmarks/grouped_decode.py artifacts/int4 --depths 256,1024,4096,16384 --out benchmarks/grouped_decode.json
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench import peak_rss_mb, read_bandwidth_gb_s  # noqa: E402

from pipeline.consumer.manifest import machine  # noqa: E402
from pipeline.consumer.runtime import Runtime, SharedKV, kv_cache_bytes, model_file_bytes  # noqa: E402
from pipeline.project import head_commit  # noqa: E402


def rss_mb() -> float:
    """This process's resident memory now (the two sessions are opened one after the other)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def steps_per_second(rt: Runtime, depth: int, steps: int) -> tuple[float, np.ndarray]:
    cache = SharedKV(rt.session, rt.io, 1, depth + steps + 1, rt.device)
    for host in cache._host:  # written, so every page is the process's own: a page never written is the
        host.fill(0.01)       # kernel's shared zero page, read from cache at no cost to the bandwidth
    ids = np.array([[1]], dtype=np.int64)
    first = np.array(cache.step(ids, np.ones((1, depth + 1), dtype=np.int64))[0, -1], dtype=np.float32)
    times = []
    for i in range(steps):
        mask = np.ones((1, depth + 2 + i), dtype=np.int64)
        t = time.perf_counter()
        cache.step(ids, mask)
        times.append(time.perf_counter() - t)
    return 1 / float(np.median(times)), first


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--depths", default="256,1024,4096,16384")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    bandwidth = read_bandwidth_gb_s(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bandwidth} GB/s")
    rows = []
    for artifact in args.artifacts:
        manifest = json.loads((artifact / "manifest.json").read_text())
        weights = model_file_bytes(artifact / "model.onnx")
        for depth in depths:
            figures, firsts, rss = {}, {}, {}
            for way, grouped_from in (("kernel", None), ("grouped", 1)):
                rt = Runtime(artifact, threads=args.threads, grouped_from=grouped_from)
                kv = kv_cache_bytes(rt.config, depth, np.dtype(rt.io.kv.dtype).itemsize)
                figures[way], firsts[way] = steps_per_second(rt, depth, args.steps)
                rss[way] = rss_mb()
                layers = rt.grouped_layers
                del rt
                gc.collect()
            bound = bandwidth * 1e9 / (weights + kv)
            diff = float(np.abs(firsts["kernel"] - firsts["grouped"]).max())
            row = {"artifact": manifest["stage"], "artifact_id": manifest["artifact_id"], "depth": depth,
                   "kernel_tok_s": round(figures["kernel"], 3), "grouped_tok_s": round(figures["grouped"], 3),
                   "speedup": round(figures["grouped"] / figures["kernel"], 3), "bound_tok_s": round(bound, 3),
                   "weights_mb": round(weights / 1e6, 1), "kv_mb": round(kv / 1e6, 1), "grouped_layers": layers,
                   "max_abs_logit_diff": diff, "rss_mb_kernel": rss["kernel"], "rss_mb_grouped": rss["grouped"]}
            rows.append(row)
            print(f"{manifest['stage']:13s} depth {depth:6d}: kernel {figures['kernel']:7.2f} tok/s "
                  f"({figures['kernel'] / bound:.0%} of bound), grouped {figures['grouped']:7.2f} tok/s "
                  f"({figures['grouped'] / bound:.0%}), x{row['speedup']:.2f}; logits apart {diff:.1e}")
    if args.out:
        config = json.loads((args.artifacts[0] / "config.json").read_text())
        args.out.write_text(json.dumps({
            "model": {k: config.get(k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                 "num_key_value_heads", "head_dim", "vocab_size")},
            "source": json.loads((args.artifacts[0] / "manifest.json").read_text()).get("source", {}).get("model"),
            "threads": args.threads, "steps": args.steps, "read_gb_s": bandwidth, "machine": machine(),
            "commit": head_commit(), "peak_rss_mb": peak_rss_mb(), "runs": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
