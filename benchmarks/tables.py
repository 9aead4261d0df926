"""Every table of figures in the README and docs/, generated from the results files, so that no table
can drift from its data. A table sits between ``<!-- table: KIND FILE -->`` and ``<!-- /table -->``;
this script re-renders each from FILE (relative to the repository root).

    python benchmarks/tables.py            # rewrite the tables in README.md and docs/*.md
    python benchmarks/tables.py --check    # exit 1 if any is stale (the test suite runs this)

Kinds: ``artifacts`` (FILE: a metrics directory, with its ``build/`` run figures), ``bench`` and
``ratios`` (a benchmarks/results*.json), ``stages`` (a benchmarks/real_shapes_*.json),
``extrapolated`` (a benchmarks/real_shapes_extrapolated_*.json), ``repro`` (benchmarks/int8_static_repro.json), ``scoreboard`` (a benchmarks/scoreboard_*.json), ``sweep`` (benchmarks/outlier_sweep.json), ``llama`` (a benchmarks/llama_cpp_*.json), ``long`` and ``longtargets`` (a benchmarks/long_context_*.json), ``untrusted`` (benchmarks/untrusted_costs.json), ``families`` (benchmarks/families_*.json), ``kvmemory``
(FILE: pipeline/checkpoints/shapes.py, whose shapes it tabulates with pipeline/consumer/runtime.py's memory formula)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (\w+) (\S+) -->\n)(.*?)(<!-- /table -->)", re.S)
ORDER = ("checkpoint", "export", "fused", "fp16", "int8-dynamic", "int8-static", "int4")


def _fmt(v, spec: str, dash: str = "—") -> str:
    return dash if v is None else format(v, spec)


def artifacts(directory: Path) -> str:
    rows = ["| artifact | PPL | drift vs reference | KLD mean | KLD p99 | top-1 | model size | vs reference | "
            "build wall | build peak RSS |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ORDER:
        path = directory / f"{name}.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        run_path = directory / "build" / f"{name}.json"
        run = json.loads(run_path.read_text()) if run_path.is_file() else {}
        ppl = m.get("ppl", m.get("heldout_ppl"))
        drift = m.get("drift_pct")
        vs = " vs PyTorch" if m.get("reference") == "checkpoint" else ""
        rows.append(f"| {name} | {_fmt(ppl, '.3f')} | {_fmt(drift, '+.4f')} %{vs} | {_fmt(m.get('kld_mean'), '.1e')} | "
                    f"{_fmt(m.get('kld_p99'), '.1e')} | {_fmt(m.get('top1_agreement'), '.2%')} | "
                    f"{_fmt(m.get('size_bytes') and m['size_bytes'] / 1e6, ',.2f')} MB | {_fmt(m.get('size_ratio'), '.3f')} | "
                    f"{_fmt(run.get('wall_seconds'), '.1f')} s | {_fmt(run.get('peak_rss_mb'), ',.0f')} MB |"
                    if name != "checkpoint" else
                    f"| checkpoint | {_fmt(ppl, '.3f')} (unigram {_fmt(m.get('unigram_ppl'), '.1f')}) | — | — | — | — | "
                    f"— | — | {_fmt(run.get('wall_seconds'), '.1f')} s | {_fmt(run.get('peak_rss_mb'), ',.0f')} MB |")
    return "\n".join(rows)


def _label(key: str) -> str:
    if ":" not in key:
        return key
    kind, _, name = key.partition(":")
    return {"builder": f"genai builder {name} (peer)", "torch": "PyTorch eager fp32",
            "optimum": "optimum `ORTModelForCausalLM` on the export"}.get(kind, name)


def bench(path: Path) -> str:
    doc = json.loads(path.read_text())
    s = doc["settings"]
    head = (f"{s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt, {s['statistic']} of {s['repeats']}; "
            + (f"bound: read bandwidth {doc['read_bandwidth_gb_s']} GB/s ({doc['read_bandwidth_threads']} threads, as the "
               f"engines run) over the bytes a step reads; " if "read_bandwidth_gb_s" in doc else
               f"copy bandwidth {doc['copy_bandwidth_gb_s']} GB/s; ") + f"{doc['machine'].get('cpu')}, {doc['machine'].get('cores')} "
            f"cores, onnxruntime {doc['machine'].get('onnxruntime')}; commit `{(doc.get('commit') or '?')[:8]}`.\n\n")
    rows = ["| model | weights read / token | bandwidth bound tok/s | **ours** decode tok/s | genai runtime on it | "
            "TTFT ms (ours) | prefill tok/s (ours) | peak RSS (ours) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    eng, wb, bound = doc["engines"], doc["weight_bytes_per_token"], doc["bandwidth_bound_tok_s"]
    keys = [k.split(":", 1)[1] for k in eng if k.startswith("ours:")] + [k for k in eng if k.split(":")[0] in
                                                                          ("builder", "torch", "optimum")]
    for key in keys:
        own = eng.get(f"ours:{key}") or eng.get(key)
        genai = eng.get(f"genai:{key}") if ":" not in key else (eng.get(key) if key.startswith("builder:") else None)
        if not isinstance(own, dict):
            rows.append(f"| {_label(key)} | | | {own} | | | | |")
            continue
        ours = own if ":" not in key or not key.startswith("builder:") else None
        rows.append(f"| {_label(key)} | {wb.get(key, 0) / 1e6:,.0f} MB | {_fmt(bound.get(key), ',.1f')} | "
                    f"{'**' + format(ours['decode_tok_s'], ',.1f') + '**' if ours and ':' not in key else (format(ours['decode_tok_s'], ',.1f') if ours else '')} | "
                    f"{format(genai['decode_tok_s'], ',.1f') if isinstance(genai, dict) else ''} | "
                    f"{own['ttft_ms']:,.1f} | {own['prefill_tok_s']:,.1f} | {own['peak_rss_mb']:,.0f} MB |")
    return head + "\n".join(rows)


def ratios(path: Path) -> str:
    doc = json.loads(path.read_text())
    return "\n".join(["| ratio (same run) | value |", "|---|---:|"] +
                     [f"| {k} | {v:.2f}× |" for k, v in doc["ratios"].items()])


def stages(path: Path) -> str:
    doc = json.loads(path.read_text())
    fp32 = doc["fp32_weight_bytes"]
    half = doc.get("checkpoint_dtype", "float32") != "float32"
    head = (f"{doc['shape']}: {fp32 / 1e9:.2f} GB FP32 weights"
            + (f" ({doc['checkpoint_bytes'] / 1e9:.2f} GB stored as {doc['checkpoint_dtype']})" if half else "")
            + f", {doc['layers']} layers; "
            f"{doc['eval_windows']} eval windows, {doc['calibration_samples']} calibration windows; "
            f"{doc.get('run', 'benchmarks/real_shapes.py')}"
            + (f"; whole DAG {doc['dag_wall_s']:,} s" if doc.get("dag_wall_s") else "")
            + (f"; commit `{doc['commit']}`" if doc.get("commit") else "") + f"; {doc.get('date', '')}.\n\n")
    rows = ["| stage | wall | peak RSS | anon / file (sampled) | × FP32 | ≤ 2×FP32 + 1 GB | ≤ FP32 + 2 GB | artifact | "
            "drift vs export |", "|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in doc["stages"]:
        s = r.get("sampled_gb")
        split = f"{s['anon']:.2f} / {s['file']:.2f} GB" if s else "—"
        within = r["peak_rss_gb"] * 1e9 <= fp32 + 2e9
        rows.append(f"| {r['stage']} | {_fmt(r.get('wall_s'), ',.0f')} s | {r['peak_rss_gb']:.2f} GB | {split} | "
                    f"{r['peak_vs_fp32']:.2f} | {'yes' if r['within_target'] else '**no**'} | "
                    f"{'yes' if within else '**no**'} | {r['size_mb']:,} MB | {_fmt(r.get('drift_pct'), '+.3f')} % |")
    d = doc.get("disk")
    tail = ("" if not d else
            f"\n\nDisk ({d['filesystem']}, {d['mount_options'].split(',')[0]}): artifacts {d['artifacts_gb']:.1f} GB, "
            f"DVC cache {d['dvc_cache_gb']:.1f} GB (apparent sizes); the filesystem has {d['filesystem_used_gb']:.1f} GB "
            "in use.")
    return head + "\n".join(rows) + tail


def extrapolated(path: Path) -> str:
    doc = json.loads(path.read_text())
    rows = [f"{doc['layers']} layers, from {' and '.join(f'`{p}`' for p in doc['from'])}: "
            f"{doc['fp32_weight_bytes'] / 1e9:.1f} GB FP32 weights, target {doc['target_gb']} GB.\n",
            "| stage | peak RSS, by depth | per layer | artifact |", "|---|---:|---:|---:|"]
    for r in doc["stages"]:
        peak = "falls with depth" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.1f} GB"
        rows.append(f"| {r['stage']} | {peak} | {r['per_layer_rss_gb'] * 1e3:,.0f} MB | {r['size_mb']:,} MB |")
    return "\n".join(rows)


def projected(path: Path) -> str:
    """What Qwen3-8B and 14B need (benchmarks/real_shapes.py --project): the memory model's peak per
    stage, wall time and artifact size on the measured slopes, disk, and the machine."""
    doc = json.loads(path.read_text())
    shapes = doc["shapes"]
    rows = [f"From {', '.join(f'`{p}`' for p in doc['from'])} and `{doc['memory_model']}`.\n",
            "| stage | " + " | ".join(f"{s['shape'][6:].upper()}: peak RSS / wall / artifact" for s in shapes) + " |",
            "|---|" + "---:|" * len(shapes)]
    for i, r in enumerate(shapes[0]["stages"]):
        cells = []
        for s in shapes:
            x = s["stages"][i]
            peak = "not modelled" if x["peak_rss_gb"] is None else f"{x['peak_rss_gb']:.1f} GB"
            cells.append(f"{peak} / {_fmt(x['wall_s'] and x['wall_s'] / 60, '.0f')} min / {x['size_gb']:.1f} GB")
        rows.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    rows.append("| **whole DAG** | " + " | ".join(
        f"largest {s['max_peak_gb']:.1f} GB → a **{s['machine_gb']} GB** machine; ~{s['dag_wall_s'] / 60:.0f} min on "
        f"2 cores; disk {s['disk_gb']['reflink']:.0f} GB (reflink) / {s['disk_gb']['copy']:.0f} GB (copy)"
        for s in shapes) + " |")
    return "\n".join(rows)


def longacc(path: Path) -> str:
    """Long-context accuracy (benchmarks/long_eval.py): each artifact at each window length against its
    reference, beside its own short-window figures."""
    doc = json.loads(path.read_text())
    rows = ["| artifact | KV cache | vs | window (scored) | drift | KLD mean | KLD p99 | top-1 | at 128 (its build): KLD / top-1 |",
            "|---|---|---|---|---:|---:|---:|---:|---:|"]
    earlier = sorted({r["earlier"] for r in doc["runs"] if r.get("earlier")})
    for r in doc["runs"]:
        # the build's own figures are against the export; the fused graph is the export to 1e-12 (docs/long-context.md)
        short = doc["short_window"].get(r["artifact_id"]) or doc["short_window"].get(r["artifact"], {})
        s = short if r["reference"] in ("export", "fused") else {}
        at128 = f"{s['kld_mean']:.2e} / {s['top1_agreement']:.1%}" if s.get("kld_mean") is not None else "—"
        length = f"{r['ctx'] // 1024}k" if r["ctx"] >= 1024 else str(r["ctx"])
        name = f"{r['artifact']} †" if r.get("earlier") else r["artifact"]
        rows.append(f"| {name} | {r['kv_dtype']} | {r['reference']} | {length} "
                    f"({r['tokens_scored']:,} in {r['windows']}) | {r['drift_pct']:+.3f} % | {r['kld_mean']:.2e} | "
                    f"{r['kld_p99']:.2e} | {r['top1_agreement']:.1%} | {at128} |")
    if earlier:
        rows.append(f"\n† measured earlier ({', '.join(earlier)}), not re-run; every other row is from {doc['date']}. "
                    f"Each row's artifact id is in the results file: one id, one artifact, whichever day measured it.")
    return "\n".join(rows)


def memorymodel(path: Path) -> str:
    """The stages' measured memory model (pipeline/ops/memory_model.json) and what it says at each
    published Qwen3 shape."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from real_shapes import shape_config

    from pipeline.ops.memory import estimate, fp32_weight_bytes

    shapes = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b")
    doc = json.loads(path.read_text())
    rows = [f"`{doc['source']}`\n", "| stage | a (× layer weights) | b (× table) | c | worst fit | "
            + " | ".join(f"{s[6:].upper()} ({fp32_weight_bytes(shape_config(s))['total'] / 1e9:.1f} GB FP32)" for s in shapes)
            + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(shapes)]
    for name, f in doc["stages"].items():
        need = [estimate(name, shape_config(s))["bytes"] / 1e9 for s in shapes]
        rows.append(f"| {name} | {f['a']:.3f} | {f['b']:.3f} | {f['c'] / 1e9:.2f} GB | {f['max_residual']:.0%} | "
                    + " | ".join(f"{n:.1f} GB" for n in need) + " |")
    return "\n".join(rows)


def repro(path: Path) -> str:
    doc = json.loads(path.read_text())
    rows = ["| other code path | round_bits | activation scales differing | max relative difference | same artifact |",
            "|---|---:|---:|---:|---|"]
    for name, r in doc.items():
        for key in (k for k in r if k.startswith("round_bits")):
            c = r[key]
            rows.append(f"| {name} (vs onnxruntime {r['shipped_onnxruntime']}) | {key.split()[1]} | "
                        f"{c['differing']} of {c['activation_scales']} | {c['max_relative_difference']:.1e} | "
                        f"{'yes' if c['same_artifact'] else '**no**'} (`{c['ids'][0]}` / `{c['ids'][1]}`) |")
    return "\n".join(rows)


def scoreboard(path: Path) -> str:
    """llama.cpp-style scoreboard (benchmarks/scoreboard.py): every precision and INT4 method, then the peer."""
    doc = json.loads(path.read_text())
    m, st = doc["machine"], doc["settings"]
    outl = doc["model"].get("outliers")
    what = (f"{doc['model']['source']}" + (f" with {outl['channels']} outlier channels x{outl['scale']:g} per layer"
                                           if outl else ""))
    im = doc["model"]["imatrix"]
    rows = [f"{what}; imatrix: largest channel {im['max_outlier_ratio']}x the median; eval windows "
            f"{st['eval_windows'] or 'all'} of {st['ctx']}, reference {st['reference']}; decode: {st['decode']}, "
            f"{st['threads']}; {m.get('cpu')}, {m.get('cores')} cores, onnxruntime {m.get('onnxruntime')}; "
            f"commit `{doc['commit'][:8]}`.\n",
            "| artifact / method | size MB | vs FP32 | ΔPPL | KLD mean | KLD p99 | top-1 | decode tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in [*doc["variants"].items(), *doc["peers"].items()]:
        if not isinstance(r, dict):
            rows.append(f"| {name} | {r} | | | | | | |")
            continue
        tok = r.get("decode_tok_s")
        rows.append(f"| {name} | {r['size_bytes'] / 1e6:,.1f} | {r['size_vs_export']:.3f} | {r['drift_pct']:+.3f} % | "
                    f"{r['kld_mean']:.2e} | {r['kld_p99']:.2e} | {r['top1_agreement']:.2%} | "
                    f"{tok if isinstance(tok, (int, float)) else '—'} |")
    return "\n".join(rows)


def sweep(path: Path) -> str:
    """benchmarks/outlier_sweep.py: mean KLD of each method as the outliers get harder."""
    doc = json.loads(path.read_text())
    methods = list(doc["settings"][0]["methods"])
    rows = [f"{doc['model']}; {doc['how']}; commit `{doc['commit'][:8]}`.\n",
            "| outlier channels x scale | largest / median channel | " + " | ".join(methods) + " |",
            "|---|---:|" + "---:|" * len(methods)]
    for r in doc["settings"]:
        what = "none" if not r["channels"] else f"{r['channels']} x{r['scale']:g}"
        cells = [f"{r['methods'][m]['kld_mean']:.1e}" for m in methods]
        rows.append(f"| {what} | {r['max_outlier_ratio']:g}x / {r['median_outlier_ratio']:g}x | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def llama(path: Path) -> str:
    """benchmarks/llama_cpp.py: llama.cpp's quants and ours, decode and KLD, one run."""
    doc = json.loads(path.read_text())
    st, m = doc["settings"], doc["machine"]
    rows = [f"`llama-bench {st['llama_bench']}` and our runtime back to back, {m.get('cpu')}, {m.get('cores')} cores; "
            f"read bandwidth ({st['threads']} threads) {doc['read_bandwidth_gb_s']} GB/s; KLD: {st['kld']}, "
            f"{st['chunks']} windows of {st['ctx']}; commit `{doc['commit'][:8]}`.\n",
            "| engine : model | file MB | decode tok/s | prefill tok/s | bandwidth bound tok/s | of bound | KLD mean | KLD p99 | top-1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in doc["engines"].items():
        b = doc["bandwidth_bound_tok_s"].get(name)
        tok = r.get("decode_tok_s")
        rows.append(f"| {name} | {r['file_bytes'] / 1e6:,.0f} | {_fmt(tok, '.1f')} | {_fmt(r.get('prefill_tok_s'), '.0f')} | "
                    f"{_fmt(b, '.1f')} | {_fmt(tok / b if tok and b else None, '.0%')} | {_fmt(r.get('kld_mean'), '.2e')} | "
                    f"{_fmt(r.get('kld_p99'), '.2e')} | {_fmt(r.get('top1_agreement'), '.1%')} |")
    rows.append("")
    rows += [f"- {k}: {_fmt(v, '.2f')}×" for k, v in doc["ratios"].items()]
    return "\n".join(rows)


def tune(path: Path) -> str:
    """benchmarks/tune.py: one search, its wall time per worker count, every candidate."""
    doc = json.loads(path.read_text())
    m = doc["machine"]
    walls = ", ".join(f"{r['workers']} worker{'s' if r['workers'] > 1 else ''} {r['wall_s']:.0f} s" for r in doc["runs"])
    budget = ", ".join(f"{k} {v:g}" for k, v in doc["budget"].items())
    win, start = doc["winner"], doc["start"]
    decode = any(r.get("decode_tok_s") for r in doc["candidates"])
    rows = [f"{doc['label']} ({', '.join(doc['project_overrides']) or 'params.yaml'}), `{doc['artifact']}`, strategy "
            f"{doc['strategy']}, objective {doc['objective']}; budget {budget}; {doc['runs'][0]['candidates']} candidates: "
            f"{walls} ({m.get('cpu')}, {doc['cores']} cores; " + ("project built earlier" if doc.get("project_reused") else
            f"project built in {doc['repro_seconds']:.0f} s") + "); commit "
            f"`{doc['commit'][:8]}`. Winner: **{win['recipe']}**, {win['size_ratio']:.3f}× the export "
            f"({doc['size_vs_start']:.2f}× the start recipe's size), mean KLD {win['kld_mean']:.2e} "
            f"(start {start['kld_mean']:.2e}).\n",
            "| recipe | round | size ratio | mean KLD | KLD p99 | drift | top-1 |" + (" decode tok/s |" if decode else "")
            + " budget | front |",
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if decode else "") + "---|---|"]
    for r in doc["candidates"]:
        if r["status"] != "success":
            rows.append(f"| {r['recipe']} | {r['round']} | | | | | |{' |' if decode else ''} {r['status']}: {r.get('error')} | |")
            continue
        name = f"**{r['recipe']}**" if r["winner"] else r["recipe"]
        front = "+".join(w for w, k in (("size", "front_size"), ("decode", "front_decode")) if r.get(k))
        rows.append(f"| {name} | {r['round']} | {r['size_ratio']:.3f} | {r['kld_mean']:.2e} | {r['kld_p99']:.2e} | "
                    f"{r['drift_pct']:+.3f} % | {r['top1_agreement']:.2%} |"
                    + (f" {_fmt(r.get('decode_tok_s'), '.1f')} |" if decode else "")
                    + f" {'inside' if r['in_budget'] else 'over'} | {front} |")
    return "\n".join(rows)


def long(path: Path) -> str:
    """benchmarks/bench.py --long: per prompt length, every engine."""
    doc = json.loads(path.read_text())  # render() passes REPO / FILE
    runs = doc["runs"]
    rows = ["| prompt tokens | engine : model | TTFT | prefill tok/s | decode tok/s at depth | peak RSS | "
            "RSS target (model + KV + 1.5 GiB) | decode vs bound |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    lengths = sorted({int(k.rsplit("@", 1)[1]) for k in runs})
    for n in lengths:
        for key, r in runs.items():
            label, _, at = key.rpartition("@")
            if int(at) != n:
                continue
            if not isinstance(r, dict):
                rows.append(f"| {n:,} | {label} | {r} | | | | | |")
                continue
            target = r.get("rss_target_mb")
            rows.append(f"| {n:,} | {label} | {r['ttft_s']:.1f} s | {r['prefill_tok_s']:.1f} | "
                        f"{_fmt(r.get('decode_tok_s_at_depth'), '.2f')} | "
                        f"{_fmt(r.get('peak_rss_mb'), ',.0f')}{' MB' if r.get('peak_rss_mb') else ''} | "
                        f"{_fmt(target, ',.0f')}{' MB' if target else ''}"
                        f"{' ✓' if r.get('within_rss_target') else (' ✗' if target else '')} | "
                        f"{_fmt(r.get('decode_vs_bound'), '.0%')} |")
    m = doc["machine"]
    rows.append("")
    # several invocations may fill one file, each measuring the bandwidth its own rows' bound uses
    seen = sorted({r["read_bandwidth_gb_s"] for r in doc["runs"].values() if isinstance(r, dict)
                   and r.get("read_bandwidth_gb_s")} or {doc["read_bandwidth_gb_s"]}, reverse=True)
    bw = " / ".join(f"{b}" for b in seen) + " GB/s" + (", one per invocation" if len(seen) > 1 else "")
    rows.append(f"Machine: {m.get('cpu', '?')}, {doc['settings']['threads']}; read bandwidth "
                f"{bw} ({doc['read_bandwidth_threads']} threads); "
                f"{doc['settings']['new_tokens']} new tokens; commit {str(doc.get('commit'))[:7]}.")
    return "\n".join(rows)


def longtargets(path: Path) -> str:
    """benchmarks/bench.py --long, judged: per prompt length, the issue's targets as ratios of two engines of
    the same results file (ours = our runtime on our int4 artifact). A peer stopped at its time limit
    gives a lower bound on its ratio."""
    doc = json.loads(path.read_text())  # render() passes REPO / FILE
    runs = doc["runs"]

    def over(peer: str, ours: str, n: int, key: str, invert: bool = False) -> str:
        a, b = runs.get(f"{peer}@{n}"), runs.get(f"{ours}@{n}")
        if not isinstance(b, dict):
            return "—"
        if isinstance(a, dict):
            return f"{(b[key] / a[key]) if invert else (a[key] / b[key]):.2f}×"
        m = re.match(r"stopped after (\d+) s", a or "")
        # prefill tok/s is prompt / TTFT: either way, the stopped peer's ratio is over limit / our TTFT
        return f"> {int(m.group(1)) / b['ttft_s']:.1f}×" if m else "—"

    rows = ["| prompt tokens | prefill tok/s: ours / llama.cpp Q4_0 | TTFT: genai on our int4 / ours | "
            "TTFT: genai's builder int4 / ours | TTFT: PyTorch eager / ours | decode at depth vs bound (ours) | "
            "our runs inside model + KV + 1.5 GiB |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({int(k.rsplit("@", 1)[1]) for k in runs}):
        ours = [r for k, r in runs.items() if k.startswith("ours:") and k.endswith(f"@{n}") and isinstance(r, dict)]
        mine = runs.get(f"ours:int4@{n}")
        rows.append(f"| {n:,} | {over('llama.cpp:Q4_0', 'ours:int4', n, 'prefill_tok_s', invert=True)} | "
                    f"{over('genai:int4', 'ours:int4', n, 'ttft_s')} | {over('builder:int4', 'ours:int4', n, 'ttft_s')} | "
                    f"{over('torch:checkpoint', 'ours:int4', n, 'ttft_s')} | "
                    f"{_fmt(mine.get('decode_vs_bound') if isinstance(mine, dict) else None, '.0%')} | "
                    f"{sum(r['within_rss_target'] for r in ours)} of {len(ours)} |")
    return "\n".join(rows)


def kvmemory(path: Path) -> str:
    """The memory formula (pipeline/consumer/runtime.py request_memory) at the published shapes (FILE: the module
    that declares them), one sequence, default prefill chunk, per KV dtype."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from pipeline.checkpoints.shapes import QWEN3_SHAPES, QWEN3_VOCAB
    from pipeline.consumer.runtime import prefill_chunk, request_memory

    rows = ["| shape | context | KV float32 | KV float16 | KV int8 | attention workspace (chunk) | logits: last position "
            "/ every position |", "|---|---:|---:|---:|---:|---:|---:|"]
    gib = 2**30
    for name in ("qwen3-0.6b", "qwen3-4b"):
        cfg = {"head_dim": 128, "vocab_size": QWEN3_VOCAB, **QWEN3_SHAPES[name]}
        for ctx in (8192, 32768, 131072, 262144):
            chunk = prefill_chunk(cfg, ctx)
            kv = {d: request_memory(cfg, d, 1, ctx, chunk)["kv_cache"] / gib for d in (np.float32, np.float16, np.int8)}
            m = request_memory(cfg, np.float32, 1, ctx, chunk)
            every = ctx * cfg["vocab_size"] * 4 / gib
            rows.append(f"| {name} | {ctx // 1024}k | {kv[np.float32]:.2f} GiB | {kv[np.float16]:.2f} GiB | "
                        f"{kv[np.int8]:.2f} GiB | {m['workspace'] / gib:.2f} GiB ({chunk}) | "
                        f"{m['logits'] / 2**20:.1f} MiB / {every:,.1f} GiB |")
    return "\n".join(rows)


def sessions(path: Path) -> str:
    """benchmarks/session_memory.py: one ORT session, prepacking on and off; the fused stage before and
    after its optimizer stopped holding the weights."""
    d = json.loads(path.read_text())
    out = [f"`{d['source']}` fused artifact `{d['artifact']}` ({d['weights_bytes'] / 1e9:.2f} GB), onnxruntime "
           f"{d['onnxruntime']}, {d['threads']}, {d['date']}.", "",
           "| session | load | 128-token window | anon / file after load | peak anon / file / total |",
           "|---|---:|---:|---:|---:|"]
    for v in d["variants"]:
        a, pk = v["after_load_gb"], v["peak_gb"]
        out.append(f"| prepacking {'on' if v['prepack'] else 'off (weights read in place)'} | {v['load_s']:.1f} s | "
                   f"{v['window_128_s']:.2f} s | {a['anon']:.2f} / {a['file']:.2f} GB | "
                   f"{pk['anon']:.2f} / {pk['file']:.2f} / {pk['total']:.2f} GB |")
    if d.get("fused_stage"):
        out += ["", "| fused stage | build | wall | peak RSS | sampled anon / file |", "|---|---:|---:|---:|---:|"]
        for row in d["fused_stage"]:
            r = row["run_metrics"]
            mb = lambda x: x * 2**20 / 1e9  # noqa: E731
            out.append(f"| {row['label']} | {r['build_seconds']:.0f} s | {r['wall_seconds']:.0f} s | "
                       f"{mb(r['peak_rss_mb']):.2f} GB | {mb(r['sampled_rss_mb']['anon']):.2f} / "
                       f"{mb(r['sampled_rss_mb']['file']):.2f} GB |")
    return "\n".join(out) + "\n"


def phases(path: Path) -> str:
    """A stage's phases from its timeline (benchmarks/timeline.py phases --into): peak and its make-up."""
    doc = json.loads(path.read_text())
    out = []
    for stage, rows in doc["phases"].items():
        out += [f"{stage} of `{path.relative_to(REPO).as_posix()}`, by phase (benchmarks/timeline.py; GB):", "",
                "| phase | from – to | peak (anon + file) | anon peak | file peak |", "|---|---:|---:|---:|---:|"]
        out += [f"| {r['phase']} | {r['from_s']:.0f} – {r['to_s']:.0f} s | {r['peak_gb']:.2f} "
                f"({r['anon_at_peak_gb']:.2f} + {r['file_at_peak_gb']:.2f}) | {r['max_anon_gb']:.2f} | "
                f"{r['max_file_gb']:.2f} |" for r in rows]
    return "\n".join(out) + "\n"


def untrusted(path: Path) -> str:
    """benchmarks/untrusted_costs.json: what the untrusted-input checks cost at the 0.6B shape."""
    r = json.loads(path.read_text())
    rows = ["| check | at | cost | beside |", "|---|---|---:|---|"]
    for c in r["calibration_one_line"]:
        cost = (f"{c['wall_s']:.1f} s, peak RSS {c['peak_rss_mb']:,} MB" if "wall_s" in c else
                f"failed: `{c['failed']}` (exit {c['exit']})")
        rows.append(f"| calibration text of one 200 MB line, {c['reader']} | {c['reader'] == 'bounded' and 'pipeline/text/reader.py' or 'before'} | {cost} | |")
    s = r["signing"]
    rows.append(f"| `pipeline sign` (model-signing) | {s['artifact_gb']} GB artifact | {s['sign_s']:.2f} s | integrity check of the same files {s['integrity_check_s']:.2f} s |")
    rows.append(f"| `verify --key` (the signature alone) | {s['artifact_gb']} GB artifact | {s['check_signature_s']:.2f} s | integrity check {s['integrity_check_s']:.2f} s |")
    o = r["outputs_cache"]
    rows.append(f"| recorded outputs' sha256 check | {o['entry_gb']} GB entry (0.6B, 38 windows) | {o['check_s']:.2f} s | reading it and its log-softmax {o['read_and_log_softmax_s']:.2f} s |")
    m = r["machine"]
    return "\n".join(rows) + f"\n\n{m['cpu']}, {m['cores']} cores, one run."


def families(path: Path) -> str:
    """benchmarks/families_*.json (benchmarks/families_collect.py): each family's stages at its real width."""
    r = json.loads(path.read_text())
    rows = ["| shape | stage | size | wall | peak RSS | max \\|Δlogit\\| vs parent | KLD vs reference | top-1 |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    cpu = None
    for name, stages in r.items():
        for stage, m in stages.items():
            cpu = m["machine"]["cpu"]
            rows.append(f"| {name if stage == 'checkpoint' else ''} | {stage} | {m['size_mb']:,.1f} MB | {m['wall_s']:.0f} s | "
                        f"{m['peak_rss_mb'] / 1024:.2f} GB | {_fmt(m.get('max_abs_logit_delta'), '.1e')} | "
                        f"{_fmt(m.get('kld_mean'), '.1e')} | {_fmt(m.get('top1_agreement'), '.1%')} |")
    return "\n".join(rows) + f"\n\n{cpu}, 2 cores (each library's default threads), one run each; random weights (top-1 of a random model's flat distributions means little)."


def trained(path: Path) -> str:
    """benchmarks/families_trained.json: every family trained with the built-in recipe, and its outlier copy,
    through every stage with default params; each artifact judged by its budgets."""
    r = json.loads(path.read_text())
    stages = ("fused", "fp16", "int8-dynamic", "int8-static", "int4")
    rows = ["| family | model | held-out PPL | " + " | ".join(stages) + " |", "|---|---|---:|" + "---:|" * len(stages)]
    cpu, failed = None, []
    for family, variants in r["families"].items():
        for variant, m in variants.items():
            cells = []
            for stage in stages:
                a = m.get(stage, {})
                cpu = (a.get("machine") or {}).get("cpu", cpu)
                if not a.get("built"):
                    cells.append("not built")
                    continue
                ok = str(a.get("budget", "")).startswith("pass")
                if not ok:
                    failed.append(f"{family} {variant} {stage}: {'; '.join(a.get('violations') or [])}")
                drop = a.get("task_acc_drop")
                cells.append(f"{_fmt(a.get('kld_mean'), '.1e')}, {_fmt(a.get('top1_agreement'), '.1%')}"
                             + (f", {drop * 100:+.1f} pt" if isinstance(drop, (int, float)) else "")
                             + (" ✓" if ok else " ✗"))
            ppl = m.get("checkpoint", {}).get("heldout_ppl")
            rows.append(f"| {family} | {variant} | {_fmt(ppl, '.1f')} | " + " | ".join(cells) + " |")
    note = (f"\n\nEach cell: mean KLD and top-1 against that model's FP32 export, the task accuracy lost "
            f"(cloze + next_word, points), ✓ inside every budget of params.yaml. {cpu}, 2 cores; commit "
            f"`{r['commit']}`.")
    if failed:
        note += "\n\nOutside a budget: " + "; ".join(failed) + "."
    return "\n".join(rows) + note


def gqadecode(path: Path) -> str:
    """benchmarks/gqa_decode.json: one decode step of attention at depth, GroupQueryAttention against the
    grouped graph of plain ops, over the same in-place KV buffers."""
    r = json.loads(path.read_text())
    rows = ["| layer | query / KV heads | GroupQueryAttention | grouped graph | grouped / GQA speed | KV read: GQA | KV read: grouped |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for x in r["runs"]:
        by.setdefault((x["shape"], x["q_heads"], x["kv_heads"]), {})[x["way"]] = x
    for (shape, nh, kvh), w in by.items():
        g, o = w["gqa"], w["grouped"]
        rows.append(f"| {shape} | {nh} / {kvh} | {g['ms_per_layer']:.2f} ms | {o['ms_per_layer']:.2f} ms | "
                    f"{g['ms_per_layer'] / o['ms_per_layer']:.2f}× | {g['of_read_bound']:.0%} of the bound | "
                    f"{o['of_read_bound']:.0%} of the bound |")
    m = r["machine"]
    return "\n".join(rows) + (f"\n\n{r['depth']:,} positions deep, head_dim {r['head_dim']}, float32 cache, {r['threads']} threads, "
                              f"median of {r['median_of']}; the bound is the cache's bytes over the read bandwidth measured in "
                              f"the same process ({r['read_gb_s']} GB/s). {m['cpu']}, {m['cores']} cores, onnxruntime "
                              f"{m.get('onnxruntime', '?')}.")


def groupeddecode(path: Path) -> str:
    """benchmarks/grouped_decode*.json: decode tok/s at depth, the artifact's GroupQueryAttention at every step
    against the runtime's grouped decode branch, same artifact, same process."""
    r = json.loads(path.read_text())
    rows = ["| artifact | depth | KV cache | kernel tok/s | grouped tok/s | grouped / kernel | bound tok/s | kernel / bound | grouped / bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["runs"]:
        rows.append(f"| {x['artifact']} | {x['depth']:,} | {x['kv_mb']:,.0f} MB | {x['kernel_tok_s']:.2f} | {x['grouped_tok_s']:.2f} | "
                    f"{x['speedup']:.2f}× | {x['bound_tok_s']:.2f} | {x['kernel_tok_s'] / x['bound_tok_s']:.0%} | "
                    f"{x['grouped_tok_s'] / x['bound_tok_s']:.0%} |")
    m, c = r["machine"], r["model"]
    return "\n".join(rows) + (f"\n\n`{r['source']}`: {c['num_hidden_layers']} layers, {c['num_attention_heads']} query heads over "
                              f"{c['num_key_value_heads']} KV heads. Median of {r['steps']} decode steps at each depth, "
                              f"{r['threads']} threads; bound = (weights + KV cache) / read bandwidth measured in the same "
                              f"process ({r['read_gb_s']} GB/s). {m['cpu']}, {m['cores']} cores; commit `{r['commit']}`.")


KINDS = {"groupeddecode": groupeddecode, "gqadecode": gqadecode, "trained": trained, "families": families, "untrusted": untrusted, "sessions": sessions, "projected": projected, "longacc": longacc, "memorymodel": memorymodel, "long": long, "longtargets": longtargets, "kvmemory": kvmemory, "tune": tune, "scoreboard": scoreboard, "sweep": sweep, "llama": llama, "artifacts": artifacts, "repro": repro, "bench": bench, "ratios": ratios, "stages": stages, "extrapolated": extrapolated, "phases": phases}


def render(text: str) -> str:
    def one(m):
        kind, src = m.group(2), REPO / m.group(3)
        if kind not in KINDS:
            raise SystemExit(f"unknown table kind {kind!r} (kinds: {', '.join(KINDS)})")
        return m.group(1) + KINDS[kind](src).rstrip() + "\n" + m.group(5)
    return BLOCK.sub(one, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a table differs from its results file")
    ap.add_argument("files", nargs="*", type=Path, help="only these markdown files [default: README.md, docs/*.md]")
    args = ap.parse_args()
    stale = []
    for path in [p.resolve() for p in args.files] or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path.relative_to(REPO).as_posix())
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale tables in {', '.join(stale)}: run python benchmarks/tables.py", file=sys.stderr)
        return 1
    print(("tables up to date" if args.check else f"rewrote tables in {len(stale)} file(s)") +
          (f": {', '.join(stale)}" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
