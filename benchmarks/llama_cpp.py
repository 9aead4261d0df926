"""llama.cpp, the CPU peer the field compares against, on the same checkpoint, in one run with ours.

    python benchmarks/llama_cpp.py --llama DIR --checkpoint CKPT --data DATA --ours int4=DIR int8-dynamic=DIR \\
        [--peer-python /tmp/genai-venv/bin/python] [--threads 2] [--out benchmarks/llama_cpp_qwen3-0.6b.json]

``--llama``: a llama.cpp source tree with ``build/bin/llama-{bench,perplexity,quantize}`` built, e.g. the
``llama-cpp-python`` sdist's ``vendor/llama.cpp`` (``pip download --no-binary :all: --no-deps
llama-cpp-python``, then ``cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j2
--target llama-bench llama-perplexity llama-quantize``: ~10 min on 2 cores). ``--peer-python``: an
interpreter with torch, transformers, sentencepiece and llama.cpp's ``gguf-py`` for its converter.

What runs: the checkpoint converted to an F32 GGUF (``convert_hf_to_gguf.py``), quantized to Q8_0, Q4_0
and Q4_K_M (``llama-quantize``); ``llama-bench`` decode (``-n``) and prefill (``-p``) with ``--threads``
threads; ``llama-perplexity --kl-divergence`` of each quant against the F32 GGUF on the eval split
(windows of ``--ctx``, second half scored, as ours). Then our runtime decodes each ``--ours`` artifact
(benchmarks/bench.py's worker, the same threads) in the same run, so the ratios compare engines measured
back to back on one machine.

Tokenizer: llama.cpp's converter recognises pre-tokenizers by a hash of known ones; the built-in
byte-level BPE is none of them, so the conversion names it ``gpt-2`` (the byte-level regex it uses).
llama.cpp's KLD is then over its own tokenization of the same text: comparable as a figure, not token
for token with ours."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.project import head_commit  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))

QUANTS = ("Q8_0", "Q4_0", "Q4_K_M")
CONVERT = """
import sys
sys.path.insert(0, {tree!r})
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # see benchmarks/llama_cpp.py
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{Path(cmd[0]).name} failed ({proc.returncode}): " + " | ".join(tail))
    return proc


def convert(tree: Path, python: str, checkpoint: Path, out: Path) -> None:
    code = CONVERT.format(tree=str(tree), script=str(tree / "convert_hf_to_gguf.py"),
                          args=[str(checkpoint), "--outfile", str(out), "--outtype", "f32"])
    _run([python, "-c", code], env={**os.environ, "PYTHONPATH": ""})


def llama_bench(binary: Path, model: Path, threads: int, prompt: int, new: int, repeats: int) -> dict:
    proc = _run([str(binary), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(new),
                 "-r", str(repeats), "-o", "json"])
    out = {}
    for r in json.loads(proc.stdout):
        kind = "decode" if r["n_gen"] else "prefill"
        out[f"{kind}_tok_s"] = round(r["avg_ts"], 2)
        out[f"{kind}_tok_s_stddev"] = round(r["stddev_ts"], 2)
        out["model_size_bytes"] = r["model_size"]
        out["threads"] = r["n_threads"]
    return out


def kld(binary: Path, model: Path, base_logits: Path, text: Path, ctx: int, threads: int, base: bool,
        chunks: int) -> dict:
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "-t", str(threads),
           "--chunks", str(chunks),
           "--kl-divergence-base", str(base_logits)]
    proc = _run(cmd + ([] if base else ["--kl-divergence"]))
    log = proc.stdout + proc.stderr
    if base:
        m = re.search(r"Final estimate: PPL = ([\d.]+)", log)
        return {"ppl": float(m.group(1)) if m else None}
    fig = {}
    for key, pattern in (("ppl", r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), ("ref_ppl", r"Mean PPL\(base\)\s*:\s*([\d.]+)"),
                         ("kld_mean", r"Mean\s+KLD:\s*([-\d.e]+)"), ("kld_p99", r"99\.0%\s+KLD:\s*([-\d.e]+)"),
                         ("top1_agreement", r"Same top p:\s*([\d.]+)")):
        m = re.search(pattern, log)
        fig[key] = float(m.group(1)) if m else None
    if fig.get("top1_agreement") is not None:
        fig["top1_agreement"] /= 100.0  # llama.cpp prints a percentage
    if fig.get("ppl") and fig.get("ref_ppl"):
        fig["drift_pct"] = round((fig["ppl"] / fig["ref_ppl"] - 1) * 100, 4)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the data artifact (its eval.txt)")
    ap.add_argument("--ours", nargs="*", default=[], metavar="NAME=DIR")
    ap.add_argument("--peer-python", default="/tmp/genai-venv/bin/python")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8, help="llama-perplexity --chunks (ours: eval.max_windows)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llama-cpp-work")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import bench

    from pipeline.consumer.manifest import machine
    from pipeline.scoring.evaluate import encoder

    bins = args.llama / "build" / "bin"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt_id = json.loads((args.checkpoint / "manifest.json").read_text())["artifact_id"]
    f32 = work / f"{ckpt_id}-F32.gguf"
    if not f32.is_file():
        print("converting to GGUF (F32) ...", file=sys.stderr, flush=True)
        convert(args.llama, args.peer_python, args.checkpoint, f32)
    models = {"F32": f32}
    for q in QUANTS:
        models[q] = work / f"{ckpt_id}-{q}.gguf"
        if not models[q].is_file():
            _run([str(bins / "llama-quantize"), str(f32), str(models[q]), q, str(args.threads)])
    text = args.data / "eval.txt"
    base_logits = work / f"{ckpt_id}-kld-base-{args.ctx}.bin"
    rows = {}
    for name, path in models.items():
        print(f"llama.cpp {name} ...", file=sys.stderr, flush=True)
        r = llama_bench(bins / "llama-bench", path, args.threads, args.prompt_tokens, args.new_tokens, args.repeats)
        r.update(kld(bins / "llama-perplexity", path, base_logits, text, args.ctx, args.threads, base=name == "F32",
                     chunks=args.chunks))
        r["file_bytes"] = path.stat().st_size
        rows[f"llama.cpp {name}"] = r
        print(f"  {json.dumps(r)}", file=sys.stderr, flush=True)
    ids = encoder(args.checkpoint)(text.read_text())[: args.prompt_tokens]
    timing = argparse.Namespace(new_tokens=args.new_tokens, repeats=args.repeats)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([int(i) for i in ids], f)
    try:
        for spec in args.ours:
            name, _, directory = spec.partition("=")
            r = bench.run_worker(sys.executable, "ours", Path(directory), f.name, timing)
            m = json.loads((Path(directory) / "manifest.json").read_text())
            ev = m.get("metrics", {}).get("eval", {})
            rows[f"ours {name}"] = {**({k: r[k] for k in ("decode_tok_s", "prefill_tok_s", "decode_tok_s_runs")}
                                       if isinstance(r, dict) else {"decode_tok_s": r}),
                                    "file_bytes": bench.decode_read_bytes(Path(directory)), "artifact_id": m["artifact_id"],
                                    **{k: ev.get(k) for k in ("kld_mean", "kld_p99", "top1_agreement", "drift_pct")}}
            print(f"  ours {name}: {json.dumps(rows[f'ours {name}'])}", file=sys.stderr, flush=True)
    finally:
        os.unlink(f.name)
    bandwidth = bench.read_bandwidth_gb_s(args.threads)

    def tok(key):
        r = rows.get(key)
        return r.get("decode_tok_s") if isinstance(r, dict) else None

    def ratio(a, b):
        return round(a / b, 2) if a and b else None

    bound = {k: round(bandwidth * 1e9 / r["file_bytes"], 1) for k, r in rows.items() if r.get("file_bytes")}
    commit = head_commit(REPO)
    doc = {"machine": machine(), "commit": commit, "checkpoint_id": ckpt_id,
           "settings": {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                        "repeats": args.repeats, "ctx": args.ctx, "chunks": args.chunks, "llama_cpp": str(args.llama),
                        "llama_bench": f"-t {args.threads} -p {args.prompt_tokens} -n {args.new_tokens} -r {args.repeats}",
                        "ours": "our runtime (benchmarks/bench.py worker), ORT intra-op threads = cores",
                        "kld": "llama-perplexity --kl-divergence vs the F32 GGUF; ours vs the FP32 export"},
           "read_bandwidth_gb_s": bandwidth, "bandwidth_bound_tok_s": bound, "engines": rows,
           "ratios": {"ours int4 / llama.cpp Q4_0 (decode)": ratio(tok("ours int4"), tok("llama.cpp Q4_0")),
                      "ours int4 / llama.cpp Q4_K_M (decode)": ratio(tok("ours int4"), tok("llama.cpp Q4_K_M")),
                      "ours int8-dynamic / llama.cpp Q8_0 (decode)": ratio(tok("ours int8-dynamic"), tok("llama.cpp Q8_0")),
                      "ours int4 / its bandwidth bound": ratio(tok("ours int4"), bound.get("ours int4")),
                      "llama.cpp Q4_0 / its bandwidth bound": ratio(tok("llama.cpp Q4_0"), bound.get("llama.cpp Q4_0")),
                      "ours int8-dynamic / its bandwidth bound": ratio(tok("ours int8-dynamic"),
                                                                     bound.get("ours int8-dynamic"))}}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["ratios"], indent=1))


if __name__ == "__main__":
    main()
