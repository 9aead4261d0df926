"""Throughput of every artifact on this machine, through the reference runtime (ONNX Runtime, CPU EP).

    python benchmarks/bench.py [--artifacts artifacts] [--prompt-tokens 128] [--new-tokens 64] [--repeats 3]

Prefill: one forward pass over a prompt; decode: greedy tokens with the KV cache (EOS ignored).
Best of ``--repeats`` runs. Writes benchmarks/results.json (read by `pipeline report`) and prints a
markdown table. Speed targets live here, never in the test suite."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.manifest import machine  # noqa: E402
from pipeline.runtime import Runtime  # noqa: E402

NAMES = ("export", "fused", "fp16", "int8-dynamic", "int8-static", "int4")


def bench(directory: Path, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    rt = Runtime(directory)
    load_s = time.perf_counter() - t0
    text = (Path("artifacts/data/eval.txt").read_text() if Path("artifacts/data/eval.txt").is_file()
            else "The for statement is used to iterate over the elements of a sequence. " * 40)
    ids = np.asarray(rt.encode(text)[:prompt_tokens])
    rt.generate(list(ids[:16]), 4, stop_at_eos=False)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        rt.forward(ids[None])
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = rt.generate(list(ids[:16]), new_tokens, stop_at_eos=False)
        decode.append((time.perf_counter() - t) / len(out))
    size = sum(p.stat().st_size for p in directory.glob("model.onnx*"))
    return {"prefill_tok_s": round(len(ids) / min(prefill), 1), "decode_tok_s": round(1 / min(decode), 1),
            "decode_ms_per_token": round(1000 * min(decode), 3), "session_load_s": round(load_s, 3),
            "model_mb": round(size / 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results.json")
    args = ap.parse_args()
    results = {}
    for name in NAMES:
        d = Path(args.artifacts) / name
        if (d / "model.onnx").is_file():
            results[name] = bench(d, args.prompt_tokens, args.new_tokens, args.repeats)
            print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    doc = {"machine": {**machine(), "provider": "CPUExecutionProvider"}, "commit": commit,
           "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats},
           "artifacts": results}
    peer_file = Path(args.out).with_name("genai_peer.json")
    if peer_file.is_file():  # onnxruntime-genai, measured from its own venv (benchmarks/genai_peer.py)
        doc["peers"] = json.loads(peer_file.read_text())
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("| artifact | size MB | prefill tok/s | decode tok/s | ms/token | load s |\n|---|---|---|---|---|---|")
    for name, r in {**results, **doc.get("peers", {})}.items():
        print(f"| {name} | {r['model_mb']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | "
              f"{r['decode_ms_per_token']} | {r.get('session_load_s', '—')} |")


if __name__ == "__main__":
    main()
