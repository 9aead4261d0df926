"""What `pipeline tune` leaves: the report (markdown, JSON, the plot), the recipe, and `--apply`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import PipelineError
from ..log import info
from .search import Candidate, Options, Result, Search, fmt, in_budget, judge, pareto, section_of

OUT = Path("reports/tune")


# --------------------------------------------------------------------------------------------- report

def report(root: Path, head: str, opts: Options, search: Search, seconds: float, queued: int, reused: int,
           waiting, workers: int) -> dict:
    results = list(search.results.values())
    start_name = Candidate.of(opts.artifact, {}).name
    start = search.results.get(start_name)
    fronts = {"size_ratio": pareto(results, "size_ratio"), "decode_tok_s": pareto(results, "decode_tok_s")}
    inside = [r for r in results if in_budget(r, opts.budget)]
    winner = min(inside, key=search.key) if inside and start and start.ok else None
    rows = []
    for r in sorted(results, key=lambda r: (not r.ok, r.figures.get("size_bytes", 0), r.figures.get("kld_mean", 0))):
        rows.append({"name": r.candidate.name, "recipe": r.candidate.label(), "round": r.round, "status": r.status,
                     "error": r.error, "rev": r.rev, **r.values(), "in_budget": in_budget(r, opts.budget),
                     "violations": "; ".join(judge(r, opts.budget)["violations"]) if r.ok else "",
                     "front_size": r.candidate.name in fronts["size_ratio"],
                     "front_decode": r.candidate.name in fronts["decode_tok_s"],
                     "start": r.candidate.name == start_name, "winner": winner is not None and r is winner})
    from ..consumer.manifest import machine

    summary = {"artifact": opts.artifact, "objective": opts.objective, "strategy": opts.strategy,
               "budget": opts.budget, "baseline_commit": head, "candidates": len(results),
               "queued_this_run": queued, "reused": reused, "skipped_invalid": search.skipped,
               "workers": workers, "slice": f"{opts.slice[0]}/{opts.slice[1]}", "wall_seconds": round(seconds, 1),
               "complete": waiting is None, "machine": machine(),
               "start": start_name, "winner": winner.candidate.name if winner else None,
               "winner_recipe": winner.candidate.knobs if winner else None,
               "recipes": {r.candidate.name: r.candidate.knobs for r in results}}
    out = root / OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary, rows))
    plot(out / "front.png", rows, opts)
    if winner is not None:
        write_recipe(out / "recipe.yaml", opts, winner, summary)
    if waiting is not None:
        info(f"tune: round {waiting[0]} is waiting for {waiting[1]} candidates from other slices: run tune again "
             f"once they are pushed (`--collect` reports what is there)")
    if winner is None and waiting is None:
        raise PipelineError(f"tune: none of {len(results)} candidates is inside the budget {opts.budget} "
                            f"(reports/tune/summary.md lists them)")
    if winner is not None:
        f, s = winner.figures, start.figures
        info(f"tune: {len(results)} candidates ({queued} run now, {reused} reused) in {seconds:.0f} s; winner "
             f"{winner.candidate.name} ({winner.candidate.label()}): size {f['size_ratio']:.3f}x vs start "
             f"{s['size_ratio']:.3f}x, KLD {f['kld_mean']:.3g} vs {s['kld_mean']:.3g}"
             + (f", {winner.decode_tok_s} vs {start.decode_tok_s} tok/s" if winner.decode_tok_s else "")
             + f"; recipe in {OUT / 'recipe.yaml'} (`pipeline tune --apply`)")
    return summary


def markdown(summary: dict, rows: list[dict]) -> str:
    head = (f"# pipeline tune: {summary['artifact']}, objective {summary['objective']}, strategy {summary['strategy']}\n\n"
            f"Budget: {', '.join(f'{k} {v:g}' for k, v in summary['budget'].items())}. "
            f"{summary['candidates']} candidates, baseline commit `{summary['baseline_commit'][:10]}`; "
            f"winner: `{summary['winner']}`.\n\n"
            "| candidate | recipe | round | size ratio | mean KLD | drift % | top-1 | decode tok/s | budget | front |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        if r["status"] != "success":
            body.append(f"| `{r['name']}` | {r['recipe']} | {r['round']} | | | | | | {r['status']}: {r['error']} | |")
            continue
        mark = " **winner**" if r["winner"] else (" (start)" if r["start"] else "")
        front = "size" if r["front_size"] else ""
        front += ("+" if front and r["front_decode"] else "") + ("decode" if r["front_decode"] else "")
        body.append(f"| `{r['name']}`{mark} | {r['recipe']} | {r['round']} | {r['size_ratio']:.3f} | "
                    f"{r['kld_mean']:.3g} | {r['drift_pct']:+.3f} | {r['top1_agreement']:.2%} | "
                    f"{r.get('decode_tok_s') or ''} | {'in' if r['in_budget'] else 'over'} | {front} |")
    return head + "\n".join(body) + "\n"


def plot(path: Path, rows: list[dict], opts: Options) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "success"]
    panels = [("size_ratio", "size (x the export)")] + (
        [("decode_tok_s", "decode tok/s (here)")] if any(r.get("decode_tok_s") for r in ok) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    limit = opts.budget.get("max_kld_mean")
    for ax, (x, label) in zip(axes[0], panels):
        pts = [r for r in ok if r.get(x)]
        ax.scatter([r[x] for r in pts], [r["kld_mean"] for r in pts],
                   c=["tab:green" if r["in_budget"] else "tab:gray" for r in pts], s=22)
        front = sorted((r for r in pts if r["front_" + ("size" if x == "size_ratio" else "decode")]), key=lambda r: r[x])
        ax.plot([r[x] for r in front], [r["kld_mean"] for r in front], "-", color="tab:blue", lw=1, label="Pareto front")
        for r, marker, name in [(r, "*", "winner") for r in pts if r["winner"]] + \
                               [(r, "s", "start") for r in pts if r["start"]]:
            ax.scatter([r[x]], [r["kld_mean"]], marker=marker, s=140, facecolors="none", edgecolors="k", label=name)
        if limit:
            ax.axhline(limit, ls="--", color="tab:red", lw=1, label="budget")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mean KLD vs export")
        ax.legend(fontsize=8)
    fig.suptitle(f"pipeline tune: {opts.artifact} ({len(ok)} candidates, green = inside the budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_recipe(path: Path, opts: Options, winner: Result, summary: dict) -> None:
    recipe: dict = {}
    section = section_of(opts.artifact)
    for knob, value in winner.candidate.overrides:
        node = recipe.setdefault(section, {})
        *parents, leaf = knob.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    recipe["budgets"] = {opts.artifact: {**opts.budget, "report_only": False}}
    f = winner.figures
    header = (f"# pipeline tune ({opts.artifact}, objective {opts.objective}, {summary['candidates']} candidates, "
              f"baseline {summary['baseline_commit'][:10]}): {winner.candidate.name}\n"
              f"# size {f['size_ratio']:.4f}x, mean KLD {f['kld_mean']:.4g}, drift {f['drift_pct']:+.4f} %, "
              f"top-1 {f['top1_agreement']:.4f}\n"
              f"# apply: `pipeline tune --apply` (writes these into params.yaml), then `dvc repro` (DVC restores the\n"
              f"# artifact from its run-cache) and `pipeline gate`. (`dvc exp apply {winner.candidate.name}` restores\n"
              f"# the experiment itself, whose budgets.{opts.artifact} is report-only.)\n")
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def apply(recipe: Path, params_file: Path) -> dict[str, Any]:
    """Write a recipe's values into params.yaml (DVC's round-trip YAML editing: comments and order kept);
    checked against the schema first."""
    from dvc.utils.serialize import modify_yaml

    from ..params import load_params

    if not recipe.is_file():
        raise PipelineError(f"no recipe at {recipe}: run `pipeline tune` first")
    values = flatten(yaml.safe_load(recipe.read_text()) or {})
    if not values:
        raise PipelineError(f"{recipe} sets nothing")
    load_params(params_file, [f"{k}={fmt(v)}" for k, v in values.items()])
    with modify_yaml(params_file) as data:
        for key, value in values.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return values
