"""One benchmark, one run, one table: every artifact against the peers, on this machine.

    python benchmarks/bench.py [--artifacts artifacts] [--peer-python /tmp/genai-venv/bin/python]
                               [--prompt-tokens 128] [--new-tokens 64] [--repeats 3] [--out benchmarks/results.json]

Engines (each in its own process, so its peak RSS is its own; batch 1, greedy, EOS ignored):

- ``ours``      our reference runtime on every artifact (IO binding, shared KV buffers under GQA);
- ``genai``     onnxruntime-genai's runtime on every artifact, as shipped (its genai_config.json);
- ``optimum``   optimum's ``ORTModelForCausalLM`` on the FP32 export;
- ``torch``     PyTorch eager FP32 (transformers) on the checkpoint;
- ``builder``   onnxruntime-genai's model builder (fp32 / int8 / int4) from the same checkpoint, run by
                genai's runtime. The builder needs transformers 5.x, so it runs from its own venv
                (``--peer-python``; left out, and said so, when that venv is missing):

      python3 -m venv /tmp/genai-venv
      /tmp/genai-venv/bin/pip install onnxruntime-genai==0.18.0 torch==2.13.0 "transformers>=5" onnx onnx-ir

Figures: prefill tok/s (one pass over ``--prompt-tokens``), time to first token and decode tok/s after a
16-token prompt (median of ``--repeats``), peak RSS, and the bandwidth bound: this machine's measured copy
bandwidth / the weight bytes read per token. Writes ``--out`` (read by `pipeline report`) and prints the
table with the ratios the README quotes. Speed targets live here, never in the test suite.

At the top it imports only pipeline/registry.py, which imports nothing: the worker mode also runs
inside the peer venv."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.project import head_commit  # noqa: E402
from pipeline.registry import ONNX as NAMES  # noqa: E402  (every ONNX artifact)

BUILDER = ("fp32", "int8", "int4")


# ------------------------------------------------------------------------------------------------ workers
def _ours(path: str):
    sys.path.insert(0, str(REPO))
    from pipeline.consumer.runtime import Runtime

    rt = Runtime(path)

    def prefill(ids):
        rt.forward([ids])

    def decode(ids, n):
        first = []
        t0 = time.perf_counter()
        rt.generate(ids, n, stop_at_eos=False, on_token=lambda _: first or first.append(time.perf_counter()))
        return first[0] - t0, time.perf_counter() - t0

    return prefill, decode


def _genai(path: str):
    import onnxruntime_genai as og

    model = og.Model(path)

    def run(ids, n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        while not gen.is_done():
            gen.generate_next_token()
        return ttft, time.perf_counter() - t0

    return (lambda ids: run(ids, 1)), run


def _hf(model):
    import torch

    def prefill(ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)

    def decode(ids, n):
        x = torch.tensor([ids])
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, **kw)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        return ttft, time.perf_counter() - t0

    return prefill, decode


def _optimum(path: str):
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(path)
    # optimum-onnx 0.1.0 sizes Qwen3's empty KV cache as hidden_size // heads (64 at 0.6B) where the
    # config says head_dim 128 (huggingface/optimum#2379, open): the documented workaround
    model.embed_size_per_head = getattr(model.config, "head_dim", None) or model.embed_size_per_head
    return _hf(model)


def _torch(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    return _hf(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())


ENGINES = {"ours": _ours, "genai": _genai, "builder": _genai, "optimum": _optimum, "torch": _torch}


def long_worker(engine: str, path: str, ids_file: str, new_tokens: int) -> dict:
    """One long prompt, once: time to first token (the whole prefill), decode tok/s at that depth, peak RSS."""
    ids = json.loads(Path(ids_file).read_text())
    prefill, decode = ENGINES[engine](path)
    decode(ids[:16], 2)  # warm-up
    ttft, total = decode(ids, new_tokens)
    return {"prompt_tokens": len(ids), "ttft_s": round(ttft, 2), "prefill_tok_s": round(len(ids) / ttft, 1),
            "decode_tok_s_at_depth": round((new_tokens - 1) / (total - ttft), 2), "peak_rss_mb": peak_rss_mb()}


def worker(engine: str, path: str, ids_file: str, new_tokens: int, repeats: int) -> dict:
    ids = json.loads(Path(ids_file).read_text())
    t0 = time.perf_counter()
    prefill, decode = ENGINES[engine](path)
    load_s = time.perf_counter() - t0
    decode(ids[:16], 4)  # warm-up
    pre, ttft, dec = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        prefill(ids)
        pre.append(time.perf_counter() - t)
        first, total = decode(ids[:16], new_tokens)
        ttft.append(first)
        dec.append((total - first) / (new_tokens - 1))
    return {"prefill_tok_s": round(len(ids) / statistics.median(pre), 1),
            "ttft_ms": round(1000 * statistics.median(ttft), 2),
            "decode_tok_s": round(1 / statistics.median(dec), 2),
            "decode_ms_per_token": round(1000 * statistics.median(dec), 3),
            "decode_tok_s_runs": [round(1 / d, 2) for d in dec],
            "load_s": round(load_s, 2),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's high-water RSS. VmHWM starts afresh at exec; ru_maxrss would carry the driver's
    RSS over from the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ------------------------------------------------------------------------------------------------ driver
def read_bandwidth_gb_s(threads: int, mb: int = 1024) -> float:
    """Bytes read per second by ``threads`` threads summing their share of one ``mb`` array (numpy
    releases the GIL in the loop), best of 5: what a decode step that streams the weights with that many
    threads can reach. One thread reads less than two here (measured 30.8 vs 35.6 GB/s)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(mb * 2**20 // 8)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))
        best = min(_timed(lambda: list(pool.map(np.sum, parts))) for _ in range(5))
    return round(a.nbytes / best / 1e9, 2)


# The builder's settings, explicit (its CPU defaults for int4 as of 0.18) and recorded with its figures.
BUILDER_OPTIONS = {"int4_block_size": 32, "int4_accuracy_level": 4}


def copy_bandwidth_gb_s(mb: int = 512) -> float:
    """STREAM's Copy convention: bytes read plus bytes written per second (one 512 MB copy, best of 5)."""
    import numpy as np

    src = np.ones(mb * 2**20 // 8)
    dst = np.empty_like(src)
    best = min(_timed(np.copyto, dst, src) for _ in range(5))
    return round(2 * src.nbytes / best / 1e9, 2)


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def decode_read_bytes(directory: Path) -> int:
    """Bytes of weights a decode step reads: every initializer of the graph except tables read only by
    ``Gather`` (an embedding lookup reads one row; the builder keeps its FP32 embedding so, beside a
    separate lm_head), or the checkpoint's safetensors. A tied table shared by GatherBlockQuantized and
    the lm_head's MatMulNBits is read once, as the lm_head."""
    model = directory / "model.onnx"
    if not model.is_file():
        return sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.op_type)
    total = 0
    for t in graph.initializer:
        if readers.get(t.name) == {"Gather"}:
            continue
        info = {e.key: e.value for e in t.external_data}
        total += int(info["length"]) if "length" in info else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def run_worker(python: str, engine: str, path: Path, ids_file: str, args) -> dict | str:
    cmd = [python, str(Path(__file__).resolve()), "--worker", engine, str(path), "--ids", ids_file,
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    env = {**os.environ, "PYTHONPATH": ""} if python != sys.executable else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return f"failed: {lines[-1][:200] if lines else proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_peer(python: str, checkpoint: Path, precision: str, cache: Path) -> Path | str:
    """The builder's model for ``checkpoint`` at ``precision``, cached by the checkpoint's artifact id."""
    ckpt_id = json.loads((checkpoint / "manifest.json").read_text())["artifact_id"]
    out = cache / f"{ckpt_id}-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    extra = [f"{k}={v}" for k, v in BUILDER_OPTIONS.items()] if precision != "fp32" else []
    proc = subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
                           "-p", precision, "-e", "cpu", "-c", str(cache / "hf-cache"),
                           *(["--extra_options", *extra] if extra else [])],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return f"builder failed: {lines[-1][:200] if lines else proc.returncode}"
    return out


def ratios(doc: dict) -> dict:
    """The issue's targets, each as a ratio of two engines measured in this run. ``ours`` is our
    runtime on our artifact; ``graph`` compares graphs under one runtime (onnxruntime-genai's on our
    artifact vs on its builder's)."""
    e = doc["engines"]

    def tok(name):
        r = e.get(name)
        return r["decode_tok_s"] if isinstance(r, dict) else None

    def best(*names):
        return max((t for t in map(tok, names) if t), default=None)

    def ratio(a, b):
        return round(a / b, 2) if a and b else None

    int8 = best("ours:int8-dynamic", "ours:int8-static")
    fp32 = best("ours:export", "ours:fused")
    best_ours = best(*(k for k in e if k.startswith("ours:")))
    bound = doc["bandwidth_bound_tok_s"].get("int8-dynamic")
    return {"best_int8_vs_genai_int8 (ours)": ratio(int8, tok("builder:int8")),
            "best_int8_vs_genai_int8 (graph)": ratio(best("genai:int8-dynamic", "genai:int8-static"), tok("builder:int8")),
            "int8_vs_our_fp32": ratio(int8, fp32),
            "int4_vs_genai_int4 (ours)": ratio(tok("ours:int4"), tok("builder:int4")),
            "int4_vs_genai_int4 (graph)": ratio(tok("genai:int4"), tok("builder:int4")),
            "fp32_vs_genai_fp32 (ours)": ratio(fp32, tok("builder:fp32")),
            "fp32_vs_genai_fp32 (graph)": ratio(best("genai:export", "genai:fused"), tok("builder:fp32")),
            "best_vs_torch_eager": ratio(best_ours, tok("torch:checkpoint")),
            "fp32_vs_torch_eager": ratio(fp32, tok("torch:checkpoint")),
            "int8_dynamic_vs_bandwidth_bound": ratio(tok("ours:int8-dynamic"), bound)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--peer-python", default="/tmp/genai-venv/bin/python")
    ap.add_argument("--peer-cache", default="/tmp/genai-builder-cache")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated engine kinds to run (default: all)")
    ap.add_argument("--out", default="benchmarks/results.json")
    ap.add_argument("--long", default="", help="long-context mode: comma-separated prompt lengths (1024,4096,...)")
    ap.add_argument("--long-artifacts", default="int4,int8-dynamic", help="long mode: our artifacts to run")
    ap.add_argument("--long-peers", default="genai:int4,builder:int4,torch,llama.cpp:Q4_0",
                    help="long mode: peers (genai:<our artifact>, builder:<precision>, torch, llama.cpp:<quant>)")
    ap.add_argument("--llama-bin", default="/tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")
    ap.add_argument("--gguf-dir", default="/tmp/llama-cpp-work", help="<checkpoint id>-<quant>.gguf (benchmarks/llama_cpp.py)")
    ap.add_argument("--timeout", type=int, default=1500, help="long mode: seconds one engine may take per length")
    ap.add_argument("--llama-depth-max", type=int, default=4096,
                    help="long mode: llama.cpp decode at depth up to this length (each costs a second prefill)")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--long-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rederive", action="store_true", help="long mode: recompute the derived figures of --out")
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run = long_worker(*args.worker, args.ids, args.new_tokens) if args.long_worker else worker(
            *args.worker, args.ids, args.new_tokens, args.repeats)
        print(json.dumps(run))
        return
    if args.rederive:
        rederive_long(args)
        return
    if args.long:
        long_context(args)
        return

    sys.path.insert(0, str(REPO))
    from pipeline.consumer.manifest import machine
    from pipeline.consumer.runtime import Runtime

    art = Path(args.artifacts)
    only = set(filter(None, args.only.split(",")))
    text = (art / "data" / "eval.txt").read_text()
    ids = Runtime(art / "export").encode(text)[: args.prompt_tokens]
    threads = os.cpu_count() or 1  # every engine runs ORT's / torch's default: one intra-op thread per core
    copy = copy_bandwidth_gb_s()
    bandwidth = read_bandwidth_gb_s(threads)
    print(f"read bandwidth ({threads} threads) {bandwidth} GB/s, copy (1 thread) {copy} GB/s; "
          f"{len(ids)}-token prompt, {args.new_tokens} new tokens, "
          f"median of {args.repeats}", file=sys.stderr)
    jobs = [("ours", n, art / n) for n in NAMES] + [("genai", n, art / n) for n in NAMES]
    jobs += [("optimum", "export", art / "export"), ("torch", "checkpoint", art / "checkpoint")]
    peer = Path(args.peer_python)
    if peer.is_file():
        for p in BUILDER:
            if not only or "builder" in only:
                print(f"  builder {p} ...", file=sys.stderr, flush=True)
            built = build_peer(str(peer), art / "checkpoint", p, Path(args.peer_cache)) if not only or "builder" in only else None
            jobs.append(("builder", p, built))
    engines, bytes_per_token = {}, {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([int(i) for i in ids], f)
    try:
        for kind, name, path in jobs:
            if only and kind not in only:
                continue
            label = f"{kind}:{name}"
            if isinstance(path, str) or path is None or not Path(path).is_dir():
                engines[label] = path or "missing"
            else:
                python = str(peer) if kind == "builder" else sys.executable
                engines[label] = run_worker(python, kind, Path(path), f.name, args)
                bytes_per_token[label] = decode_read_bytes(Path(path))
            print(f"  {label}: {engines[label]}", file=sys.stderr, flush=True)
    finally:
        os.unlink(f.name)
    if not peer.is_file():
        engines["builder"] = f"left out: no peer venv at {peer} (see this file's docstring)"
    commit = head_commit(REPO)
    doc = {"machine": {**machine(), "provider": "CPUExecutionProvider"}, "commit": commit or None,
           "settings": {"artifacts": str(art), "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
                        "repeats": args.repeats, "statistic": "median",
                        "threads": {"ours": f"{threads} (ORT intra-op default: one per core)",
                                    "genai": f"{threads} (ORT default)", "optimum": f"{threads} (ORT default)",
                                    "torch": f"{threads} (torch.set_num_threads)"},
                        "builder_options": BUILDER_OPTIONS},
           "read_bandwidth_gb_s": bandwidth, "read_bandwidth_threads": threads, "copy_bandwidth_gb_s": copy,
           "weight_bytes_per_token": {k.split(":", 1)[1] if k.startswith("ours:") else k: v
                                      for k, v in bytes_per_token.items() if not k.startswith("genai:")},
           "engines": engines}
    doc["bandwidth_bound_tok_s"] = {k: round(bandwidth * 1e9 / v, 1) for k, v in doc["weight_bytes_per_token"].items()}
    doc["artifacts"] = {k.split(":", 1)[1]: v for k, v in engines.items() if k.startswith("ours:") and isinstance(v, dict)}
    doc["ratios"] = ratios(doc)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))


# ------------------------------------------------------------------------------------------ long context
def llama_long(bins: Path, gguf: Path, threads: int, prompt: int, new: int, timeout: int,
               depth_max: int) -> dict | str:
    """llama-bench ``-p prompt -n 0`` (prefill) and, up to ``depth_max`` tokens, ``-p 0 -n new -d prompt``
    (decode at that depth: llama-bench fills the context first, a second prefill's time), one repeat each,
    its peak RSS read from the kernel (``ru_maxrss`` of the finished child)."""
    out = {}
    runs = [(["-p", str(prompt), "-n", "0"], "prefill_tok_s")]
    if prompt <= depth_max:
        runs.append((["-p", "0", "-n", str(new), "-d", str(prompt)], "decode_tok_s_at_depth"))
    # a fresh interpreter runs llama-bench and reports its child's ru_maxrss: ours would be the maximum
    # over every child this process has had
    wrap = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    for flags, key in runs:
        # past 4k tokens no warm-up: llama-bench's is a whole run of the same length (at 16k, two 9-minute prefills)
        cmd = [sys.executable, "-c", wrap, str(bins / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1",
               "-o", "json", *flags, *(["--no-warmup"] if prompt > 4096 else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"stopped after {timeout} s"
        if proc.returncode != 0:
            return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
        out[key] = round(json.loads(proc.stdout)[0]["avg_ts"], 2)
        rss = int(proc.stderr.strip().splitlines()[-1])
        out["peak_rss_mb"] = max(out.get("peak_rss_mb", 0), round(rss / 1024, 1))
    out["ttft_s"] = round(prompt / out["prefill_tok_s"], 2)
    out["prompt_tokens"] = prompt
    return out


def derive_long(r: dict, path: Path, config: dict, length: int, new_tokens: int, bandwidth: float) -> None:
    """The figures a run is judged by, from the artifact: its KV cache at its dtype, the RSS target
    (model + KV + 1.5 GiB) and the decode bound (weights + KV read per token / read bandwidth)."""
    import onnx

    g = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    kv_type = next(i.type.tensor_type.elem_type for i in g.input if i.name.startswith("past_key_values"))
    itemsize = {onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT8: 1}.get(kv_type, 4)
    from pipeline.consumer.runtime import kv_cache_bytes

    kv = kv_cache_bytes(config, length + new_tokens, itemsize)
    model = sum(p.stat().st_size for p in path.glob("model.onnx*"))
    r.update({"kv_dtype": {2: "float16", 1: "int8"}.get(itemsize, "float32"), "kv_cache_mb": round(kv / 2**20, 1),
              "model_mb": round(model / 2**20, 1), "rss_target_mb": round((model + kv) / 2**20 + 1536, 1),
              "decode_bound_tok_s": round(bandwidth * 1e9 / (decode_read_bytes(path) + kv), 2)})
    r["within_rss_target"] = r["peak_rss_mb"] <= r["rss_target_mb"]
    r["decode_vs_bound"] = round(r["decode_tok_s_at_depth"] / r["decode_bound_tok_s"], 2)


def rederive_long(args) -> None:
    """Recompute :func:`derive_long` for every run of ``--out`` (after a fix to it), with the bandwidth
    that run measured."""
    doc = json.loads(Path(args.out).read_text())
    art = Path(doc["settings"]["artifacts"])
    config = json.loads((art / "checkpoint" / "config.json").read_text())
    for label, r in doc["runs"].items():
        kind, _, rest = label.partition(":")
        name, _, length = rest.rpartition("@")
        if isinstance(r, dict) and kind in ("ours", "genai"):
            derive_long(r, art / name, config, int(length), doc["settings"]["new_tokens"],
                        r.get("read_bandwidth_gb_s", doc["read_bandwidth_gb_s"]))
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


def long_context(args) -> None:
    """TTFT, prefill tok/s, decode tok/s at depth and peak RSS at each prompt length, every engine in its
    own process, one length at a time; the memory target (model + KV at its dtype + 1.5 GB) and the
    decode bandwidth bound (weights + KV read per token / the read bandwidth of the same threads)."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from pipeline.consumer.manifest import machine

    art = Path(args.artifacts)
    lengths = [int(x) for x in args.long.split(",")]
    threads = os.cpu_count() or 1
    config = json.loads((art / "checkpoint" / "config.json").read_text())
    ckpt_id = json.loads((art / "checkpoint" / "manifest.json").read_text())["artifact_id"]
    bandwidth = read_bandwidth_gb_s(threads)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc.update({"machine": {**machine(), "provider": "CPUExecutionProvider"}, "checkpoint_id": ckpt_id,
                "read_bandwidth_gb_s": bandwidth, "read_bandwidth_threads": threads,
                "settings": {"artifacts": str(art), "new_tokens": args.new_tokens, "repeats": 1,
                             "threads": f"{threads} for every engine (ORT intra-op default = cores, torch.set_num_threads, "
                                        f"llama-bench -t {threads})",
                             "prompt": "random token ids (seed 0) below the vocab size: random weights"}})
    runs = doc.setdefault("runs", {})
    jobs = [("ours", a, art / a) for a in filter(None, args.long_artifacts.split(","))]
    peer = Path(args.peer_python)
    for spec in filter(None, args.long_peers.split(",")):
        kind, _, which = spec.partition(":")
        if kind == "genai":
            jobs.append(("genai", which, art / which))
        elif kind == "builder":
            jobs.append(("builder", which, build_peer(str(peer), art / "checkpoint", which, Path(args.peer_cache))
                         if peer.is_file() else f"left out: no peer venv at {peer}"))
        elif kind == "torch":
            jobs.append(("torch", "checkpoint", art / "checkpoint"))
        elif kind == "llama.cpp":
            jobs.append(("llama.cpp", which, Path(args.gguf_dir) / f"{ckpt_id}-{which}.gguf"))
    rng = np.random.default_rng(0)
    for length in lengths:
        ids = [int(i) for i in rng.integers(0, min(int(config["vocab_size"]), 4096), size=length)]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(ids, f)
        try:
            for kind, name, path in jobs:
                label = f"{kind}:{name}@{length}"
                if isinstance(path, str) or not Path(path).exists():
                    runs[label] = path if isinstance(path, str) else f"missing: {path}"
                elif kind == "llama.cpp":
                    runs[label] = llama_long(Path(args.llama_bin), Path(path), threads, length, args.new_tokens,
                                             args.timeout, args.llama_depth_max)
                else:
                    python = str(peer) if kind == "builder" else sys.executable
                    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, str(path), "--ids", f.name,
                           "--new-tokens", str(args.new_tokens), "--long-worker"]
                    env = {**os.environ, "PYTHONPATH": ""} if python != sys.executable else None
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                        runs[label] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                                       f"failed ({proc.returncode}): "
                                       f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}")
                    except subprocess.TimeoutExpired:
                        runs[label] = f"stopped after {args.timeout} s"
                r = runs[label]
                if isinstance(r, dict) and kind in ("ours", "genai"):
                    r["read_bandwidth_gb_s"] = bandwidth  # this invocation's: several may fill one file
                    derive_long(r, Path(path), config, length, args.new_tokens, bandwidth)
                print(f"  {label}: {r}", file=sys.stderr, flush=True)
                commit = head_commit(REPO)
                doc["commit"] = commit
                out.write_text(json.dumps(doc, indent=2) + "\n")  # after every run: a long bench may be cut short
        finally:
            os.unlink(f.name)


def table(doc: dict) -> str:
    rows = ["| engine : model | decode tok/s | TTFT ms | prefill tok/s | peak RSS MB | bound tok/s |",
            "|---|---|---|---|---|---|"]
    bound = doc["bandwidth_bound_tok_s"]
    for label, r in doc["engines"].items():
        if not isinstance(r, dict):
            rows.append(f"| {label} | {r} | | | | |")
            continue
        b = bound.get(label.split(":", 1)[1] if label.startswith(("ours:", "genai:")) else label, "")
        rows.append(f"| {label} | {r['decode_tok_s']} | {r['ttft_ms']} | {r['prefill_tok_s']} | {r['peak_rss_mb']} | {b} |")
    rows.append("")
    rows += [f"- {k}: {v}" for k, v in doc["ratios"].items()]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
