"""Peer: onnxruntime-genai's model builder + runtime on the same checkpoint, measured like bench.py.

onnxruntime-genai 0.18 needs transformers 5.x, so it lives in its own venv, never in ours:

    python3 -m venv /tmp/genai-venv
    /tmp/genai-venv/bin/pip install onnxruntime-genai==0.18.0 torch==2.13.0 "transformers>=5" onnx onnx-ir
    /tmp/genai-venv/bin/python -m onnxruntime_genai.models.builder -i artifacts/checkpoint -o /tmp/genai-int4 \\
        -p int4 -e cpu -c /tmp/genai-cache
    /tmp/genai-venv/bin/python benchmarks/genai_peer.py /tmp/genai-int4 --name genai-int4

Writes benchmarks/genai_peer.json (merged into the README's benchmark table). Imports nothing of ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    import onnxruntime_genai as og

    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--name", default="genai-int4")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/genai_peer.json")
    args = ap.parse_args()
    model = og.Model(args.model_dir)
    tok = og.Tokenizer(model)
    text = Path("artifacts/data/eval.txt").read_text()
    ids = list(tok.encode(text))[: args.prompt_tokens]

    def run(prompt, n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(prompt)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        made = 0
        while not gen.is_done():
            gen.generate_next_token()
            made += 1
        return prefill, (time.perf_counter() - t) / max(made, 1)

    run(ids[:16], 4)
    prefill = min(run(ids, 1)[0] for _ in range(args.repeats))
    decode = min(run(ids[:16], args.new_tokens)[1] for _ in range(args.repeats))
    size = sum(p.stat().st_size for p in Path(args.model_dir).glob("model.onnx*"))
    result = {args.name: {"prefill_tok_s": round(len(ids) / prefill, 1), "decode_tok_s": round(1 / decode, 1),
                          "decode_ms_per_token": round(1000 * decode, 3), "model_mb": round(size / 1e6, 2),
                          "runtime": f"onnxruntime-genai {og.__version__}"}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
