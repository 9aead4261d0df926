"""`pipeline gate` (budgets, baselines from a file or a git revision through DVC) and `pipeline report`."""

import json
import shutil
import subprocess

import pytest

from pipeline.consumer import manifest as mf
from pipeline.registry import ONNX
from pipeline.scoring.evaluate import checkpoint_metrics, evaluate_artifact
from tests.conftest import REPO, assert_clean_failure, run_cli

NAMES = ONNX[1:]  # every ONNX artifact but the export (pipeline/registry.py)


@pytest.fixture(scope="module")
def metrics_dir(derived, fused_dir, export_dir, checkpoint_dir, data_dir, params, tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics")
    (out / "checkpoint.json").write_text(json.dumps(checkpoint_metrics(mf.read_manifest(checkpoint_dir))))
    text = (data_dir / "eval.txt").read_text()
    dirs = {"fused": fused_dir, **{n: derived(n) for n in NAMES[1:]}}
    m = evaluate_artifact(export_dir, text, params, checkpoint_dir, "export")
    (out / "export.json").write_text(json.dumps(m))
    for name, d in dirs.items():
        (out / f"{name}.json").write_text(json.dumps(evaluate_artifact(d, text, params, export_dir, name)))
    return out


SMALL_MODEL = ("-S", "budgets.checkpoint.report_only=true")  # 40 training steps: report the unigram ratio only


def gate(metrics_dir, *args, cwd=REPO):
    return run_cli("gate", "--params", str(REPO / "params.yaml"), "--metrics-dir", str(metrics_dir), *SMALL_MODEL,
                   *args, cwd=cwd)


def test_gate_passes_and_prints_a_markdown_table(metrics_dir, tmp_path):
    summary = tmp_path / "summary.md"
    proc = gate(metrics_dir, "--summary", str(summary))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| artifact | PPL | drift % | KLD mean | top-1 | size |")
    assert len(lines) == 2 + 7
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert all("pass" in rows[n] for n in ("export", *NAMES))
    assert "ppl_ratio_vs_unigram" in rows["checkpoint"] and "report-only" in rows["checkpoint"]
    assert summary.read_text().strip() == proc.stdout.strip()


def test_gate_fails_when_a_budget_is_tightened_below_the_measured_drift(metrics_dir):
    drift = abs(json.loads((metrics_dir / "int4.json").read_text())["drift_pct"])
    proc = gate(metrics_dir, "-S", f"budgets.int4.max_drift_pct={drift / 2}")
    assert proc.returncode == 1
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| int4 "))
    assert "fail" in row and "drift_pct" in row
    assert "gate failed for int4" in proc.stderr


def test_gate_fails_on_a_missing_metrics_file(metrics_dir, tmp_path):
    partial = tmp_path / "m"
    shutil.copytree(metrics_dir, partial)
    (partial / "fp16.json").unlink()
    proc = gate(partial)
    assert proc.returncode == 1 and "no metrics file" in proc.stdout


def test_gate_against_a_published_baseline_file(metrics_dir, tmp_path):
    assert gate(metrics_dir, "--baseline-file", str(metrics_dir)).returncode == 0
    better = tmp_path / "baseline"
    shutil.copytree(metrics_dir, better)
    m = json.loads((better / "int8-static.json").read_text())
    m["ppl"] *= 0.95  # the published deployment was 5 % better: today's run regressed
    (better / "int8-static.json").write_text(json.dumps(m))
    proc = gate(metrics_dir, "--baseline-file", str(better))
    assert proc.returncode == 1
    assert "PPL +" in next(line for line in proc.stdout.splitlines() if line.startswith("| int8-static "))
    run_cli("report", "--params", str(REPO / "params.yaml"), "--metrics-dir", str(metrics_dir), "--out",
            str(tmp_path / "rep"), check=True)
    assert gate(metrics_dir, "--baseline-file", str(tmp_path / "rep" / "summary.json")).returncode == 0


def test_gate_against_a_git_revision_through_dvc(metrics_dir, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(metrics_dir, repo / "metrics")
    (repo / "dvc.yaml").write_text("metrics:\n" + "".join(f"  - metrics/{p.name}\n" for p in sorted(metrics_dir.iterdir())))
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    git("add", "-A")
    git("-c", "user.email=ci@x", "-c", "user.name=ci", "commit", "-qm", "baseline")
    assert run_cli("gate", "--baseline", "HEAD", *SMALL_MODEL, cwd=repo).returncode == 0
    m = json.loads((repo / "metrics" / "int4.json").read_text())
    m["ppl"] *= 1.02
    (repo / "metrics" / "int4.json").write_text(json.dumps(m))
    proc = run_cli("gate", "--baseline", "HEAD", *SMALL_MODEL, cwd=repo)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "vs baseline" in next(line for line in proc.stdout.splitlines() if line.startswith("| int4 "))
    assert_clean_failure(run_cli("gate", "--baseline", "no-such-rev", cwd=repo), "baseline revision 'no-such-rev'")


def test_report_writes_table_json_and_plot(metrics_dir, tmp_path):
    out = tmp_path / "reports"
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"artifacts": {n: {"decode_tok_s": 100.0 + i} for i, n in enumerate(NAMES)}}))
    proc = run_cli("report", "--params", str(REPO / "params.yaml"), "--metrics-dir", str(metrics_dir), "--out",
                   str(out), "--bench", str(bench), check=True)
    assert "size_vs_drift.png" in proc.stderr
    assert (out / "summary.md").read_text().count("\n| ") == 8
    assert set(json.loads((out / "summary.json").read_text())["artifacts"]) == {"checkpoint", "export", *NAMES}
    png = (out / "size_vs_drift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_gate_refuses_an_artifact_without_a_budget_or_without_kld_and_top1_bounds(metrics_dir, tmp_path):
    import yaml

    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    del doc["budgets"]["fp16"]
    doc["budgets"]["int4"] = {"max_drift_pct": 5.0}  # perplexity only: an int4 whose top-1 collapsed would pass
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(doc))
    proc = run_cli("gate", "--params", str(params), "--metrics-dir", str(metrics_dir), *SMALL_MODEL)
    assert proc.returncode == 1
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.strip().splitlines()[2:]}
    assert "fail" in rows["fp16"] and "no budget" in rows["fp16"]
    assert "fail" in rows["int4"] and "max_kld_mean, max_kld_p99, min_top1_agreement" in rows["int4"]
    assert "pass" in rows["int8-static"]


def test_a_metric_or_a_baseline_figure_that_is_not_finite_fails_the_gate(metrics_dir, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(metrics_dir, broken)
    for name, key, value in (("int4", "ppl", float("nan")), ("fp16", "top1_agreement", "high"),
                             ("int8-static", "kld_mean", float("inf"))):
        m = json.loads((broken / f"{name}.json").read_text())
        m[key] = value
        (broken / f"{name}.json").write_text(json.dumps(m))  # json writes NaN / Infinity as Python reads them
    proc = gate(broken)
    assert proc.returncode == 1, proc.stdout
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "ppl is nan: not a finite figure" in rows["int4"]
    assert "top1_agreement is 'high': not a number" in rows["fp16"]
    assert "kld_mean is inf" in rows["int8-static"]
    assert "❌" not in rows["int8-dynamic"]
    # the same figures as a baseline: a comparison with them cannot pass silently
    proc = gate(metrics_dir, "--baseline-file", str(broken))
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert proc.returncode == 1 and "baseline ppl is 'nan'" in rows["int4"], proc.stdout
    # and a budget that is not a finite number is a params error, before anything is read
    assert_clean_failure(gate(metrics_dir, "-S", "budgets.int4.max_kld_mean=.nan"), "budgets.int4.max_kld_mean",
                         "finite")
