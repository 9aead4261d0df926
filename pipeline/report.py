"""`pipeline report`: reports/summary.md, summary.json and size_vs_drift.png from the gate's rows, with
the benchmark's decode speed beside them only where it was measured on this code."""

from __future__ import annotations

from pathlib import Path

from . import project


def summary_json(rows: list[dict]) -> dict:
    return {"artifacts": {r["artifact"]: r.get("metrics") for r in rows if r.get("metrics")},
            "status": {r["artifact"]: r["status"] for r in rows}}


# What makes the artifacts and their speed: a benchmark from a commit where these are unchanged still holds.
BENCH_CODE = ("pipeline", "stages", "benchmarks/bench.py", "params.yaml", "dvc.yaml")


def bench_for_plot(doc: dict | None, cwd: str | Path = ".") -> tuple[dict | None, str]:
    """The benchmark's per-artifact figures if they were measured on this code, and the label saying where;
    else (None, why they are left out). A result without its commit, or from a commit whose artifact and
    runtime code differ from the checkout's, is never drawn beside drift measured now."""
    if not doc or not doc.get("artifacts"):
        return None, "no benchmark results (python benchmarks/bench.py)"
    commit = doc.get("commit")
    if not commit:
        return None, "throughput left out: the benchmark results name no commit (re-run python benchmarks/bench.py)"
    head = project.head_commit(cwd)
    if commit != head:
        same = project.unchanged_since(commit, BENCH_CODE, cwd)
        if not same:
            return None, (f"throughput left out: measured on commit {commit[:8]}, whose pipeline code differs from "
                          f"this checkout's ({head[:8] or 'no git'}); re-run python benchmarks/bench.py")
    m = doc.get("machine", {})
    where = f"{m.get('cpu', m.get('processor', '?'))}, {m.get('cores', m.get('cpu_count', '?'))} cores"
    return doc["artifacts"], f"{where}, commit {commit[:8]}" + ("" if commit == head else " (code unchanged since)")


def plot(rows: list[dict], out_png: Path, bench: dict | None = None, bench_label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [r for r in rows if r.get("metrics") and "size_ratio" in r["metrics"]]
    panels = 2 if bench else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    for i, r in enumerate(have):
        m = r["metrics"]
        x, y = m["size_ratio"], m.get("drift_pct", 0.0)
        ax.scatter(x, y, s=60, color="tab:green" if r["status"].startswith("pass") else "tab:red")
        ax.annotate(r["artifact"], (x, y), textcoords="offset points", xytext=(6, 5 if i % 2 else -13), fontsize=9)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("size vs FP32 export")
    ax.set_ylabel("perplexity drift vs FP32 export (%)")
    ax.set_title("size vs PPL drift")
    ax.grid(alpha=0.3)
    if not bench and bench_label:
        fig.text(0.01, 0.01, bench_label, fontsize=7, color="grey")
    if bench:
        ax2 = axes[0][1]
        names = [n for n in (r["artifact"] for r in have) if n in bench]
        ax2.bar(names, [bench[n]["decode_tok_s"] for n in names], color="tab:blue")
        ax2.set_ylabel("decode tokens/s (CPU, batch 1)")
        ax2.set_title(f"throughput\n{bench_label}", fontsize=9)
        ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
