"""`pipeline gate`: CI on perplexity drift (`pipeline report` draws the same rows: pipeline/report.py).

The gate re-checks every artifact's metrics against the budgets in params.yaml (so tightening a budget
fails CI without re-running anything) and, optionally, against a baseline: a git revision (through
``dvc metrics diff --json``) or a metrics file/directory another deployment published. It prints a
markdown table for a CI job summary or PR comment."""

from __future__ import annotations

import json
from pathlib import Path

from . import project
from .consumer import untrusted
from .errors import PipelineError
from .registry import ONNX
from .scoring import metrics as metric_table
from .scoring.evaluate import check_budget

# Every ONNX artifact's budget bounds the distribution, not only the mean log-likelihood: an artifact
# whose top-1 agreement collapses can keep its perplexity (llama.cpp's perplexity tool reports these).
DISTRIBUTION_KEYS = metric_table.REQUIRED_BOUNDS

COLUMNS = ("artifact", *(m.header or m.label for m in metric_table.COLUMNS), "status")


def load_metrics(metrics_dir: str | Path) -> dict[str, dict]:
    metrics_dir = Path(metrics_dir)
    if not metrics_dir.is_dir():
        raise PipelineError(f"metrics directory {metrics_dir} not found: run `dvc repro` (or pipeline evaluate --out) first")
    out = {}
    for path in sorted(metrics_dir.glob("*.json")):
        data = untrusted.load_json(path, "metrics file")
        name = data.get("artifact", path.stem)
        if not isinstance(name, str):
            raise PipelineError(f"metrics file {path}: 'artifact' is a {type(name).__name__}, not a name")
        out[name] = data
    if not out:
        raise PipelineError(f"no metrics files in {metrics_dir}")
    return out


def baseline_from_rev(rev: str, metrics: dict[str, dict], cwd: str | Path = ".") -> dict[str, dict]:
    """Old values at ``rev`` through ``dvc metrics diff --json``; unchanged values equal today's."""
    proc = project.dvc("metrics", "diff", "--json", rev, cwd=cwd, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["dvc metrics diff failed"])[-1]
        raise PipelineError(f"baseline revision {rev!r} cannot be read: {msg.removeprefix('ERROR: ')}")
    diff = json.loads(proc.stdout or "{}")
    diff = diff.get("diff", diff)
    base = {name: dict(m) for name, m in metrics.items()}
    by_file = {f"{Path(p).stem}": changes for p, changes in diff.items()}
    for name, changes in by_file.items():
        entry = base.setdefault(name, {})
        for key, change in changes.items():
            if isinstance(change, dict) and "old" in change:
                entry[key] = change["old"]
    return base


def baseline_from_file(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    if path.is_dir():
        return load_metrics(path)
    if not path.is_file():
        raise PipelineError(f"baseline file {path} not found")
    data = untrusted.load_json(path, "baseline file")
    if isinstance(data.get("artifacts"), dict) and all(isinstance(m, dict) for m in data["artifacts"].values()):
        return data["artifacts"]  # a gate/report summary.json
    if isinstance(data.get("artifact"), str):
        return {data["artifact"]: data}  # one metrics file
    raise PipelineError(f"baseline file {path} is neither a metrics file nor a pipeline report summary.json")


def judge(metrics: dict[str, dict], params, baseline: dict[str, dict] | None = None) -> list[dict]:
    """``params``: the checked params (pipeline/schema.py), budgets and gate tolerances."""
    budgets = params.budgets
    tol = params.gate.model_dump()
    rows = []
    for name in list(budgets) + sorted(set(metrics) - set(budgets)):
        m = metrics.get(name)
        if m is None:
            rows.append({"artifact": name, "status": "fail", "reasons": ["no metrics file (stage not run?)"]})
            continue
        verdict = check_budget(m, budgets.get(name))
        reasons = list(verdict["violations"])
        status = verdict["status"]
        budget = budgets.get(name) or {}
        if not budget:
            reasons.append(f"no budget: every built artifact needs budgets.{name} in params.yaml")
        elif name in ONNX and (missing := [k for k in DISTRIBUTION_KEYS if k not in budget]):
            reasons.append(f"budgets.{name} has no {', '.join(missing)}: every ONNX artifact's budget bounds "
                           f"its KLD and top-1 agreement")
        old = (baseline or {}).get(name)
        if old:
            reasons += _regressions(m, old, tol)
        if reasons and not status.startswith("over budget (report-only)") or not budget:
            status = "fail"
        rows.append({"artifact": name, "metrics": m, "status": status, "reasons": reasons,
                     "baseline_ppl": (old or {}).get("ppl")})
    return rows


def _regressions(new: dict, old: dict, tol: dict) -> list[str]:
    """What got worse than the baseline by more than the tolerances. The baseline is read from outside
    (another deployment's file, an old revision): a figure of it that is not a finite number is a reason
    to fail, never a comparison that silently passes."""
    out = []
    checks = (("ppl", "max_ppl_regression_pct", lambda n, o: (n - o) / o * 100, "PPL"),
              ("size_bytes", "max_size_regression_pct", lambda n, o: (n - o) / o * 100, "size"),
              ("drift_pct", "max_drift_regression_pct", lambda n, o: abs(n) - abs(o), "|drift|"))
    for key, limit, change, label in checks:
        if key not in new or old.get(key) is None or limit not in tol:
            continue
        if not untrusted.finite_number(old[key]) or (key != "drift_pct" and old[key] <= 0):
            out.append(f"baseline {key} is {str(old[key])[:40]!r}: not a figure to compare with")
            continue
        if not untrusted.finite_number(new[key]):
            continue  # reported by the budget check
        delta = change(float(new[key]), float(old[key]))
        if delta > float(tol[limit]):
            if key == "drift_pct":
                out.append(f"|drift| +{delta:.3f} points vs baseline > {tol[limit]}")
            else:
                out.append(f"{label} +{delta:.3f} % vs baseline ({old[key]:.6g} -> {new[key]:.6g}) > {tol[limit]} %")
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        m = r.get("metrics") or {}
        m = {**m, "ppl": m["heldout_ppl"]} if "heldout_ppl" in m and "ppl" not in m else m
        cells = [r["artifact"], *(c.cell(m.get(c.key)) for c in metric_table.COLUMNS),
                 ("✅ " if r["status"].startswith("pass") else "❌ " if r["status"] == "fail" else "⚠️ ") + r["status"]
                 + (": " + "; ".join(r["reasons"]) if r["reasons"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
