"""Evaluation: llama.cpp-style windows, PPL/KLD/top-1 against a reference, the metrics file, budgets."""

import json

import numpy as np
import pytest

from pipeline.consumer.runtime import Runtime
from pipeline.errors import PipelineError
from pipeline.scoring.evaluate import check_budget, log_softmax, make_windows, score
from pipeline.scoring.torch_ref import TorchModel
from tests.conftest import run_cli


def test_windows_are_non_overlapping_and_need_two():
    w = make_windows(list(range(50)), 16)
    assert w.shape == (3, 16) and w[1, 0] == 16
    assert make_windows(list(range(50)), 16, max_windows=2).shape == (2, 16)
    with pytest.raises(PipelineError, match="shorter than two windows"):
        make_windows(list(range(31)), 16)


def test_second_half_scoring_matches_a_direct_computation(export_dir, data_dir):
    rt = Runtime(export_dir)
    ids = rt.encode((data_dir / "eval.txt").read_text())
    windows = make_windows(ids, 32, 3)
    got = score(rt, windows)
    nll = []
    for win in windows:
        lp = log_softmax(rt.logits(win))
        nll += [-lp[j - 1, win[j]] for j in range(16, 32)]
    assert got["ppl"] == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-9)
    assert got["tokens_scored"] == 3 * 16


def test_self_reference_has_zero_drift_and_pytorch_agrees(export_dir, checkpoint_dir, data_dir):
    rt = Runtime(export_dir)
    windows = make_windows(rt.encode((data_dir / "eval.txt").read_text()), 64, 4)
    same = score(rt, windows, rt)
    assert same["drift_pct"] == 0 and same["kld_mean"] == 0 and same["top1_agreement"] == 1
    vs_torch = score(rt, windows, TorchModel(checkpoint_dir))
    assert abs(vs_torch["drift_pct"]) < 0.01 and vs_torch["kld_mean"] < 1e-6 and vs_torch["top1_agreement"] == 1


def test_budget_check():
    assert check_budget({"drift_pct": 0.5, "size_ratio": 0.3}, {"max_drift_pct": 1.0})["status"] == "pass"
    failed = check_budget({"drift_pct": -2.0, "top1_agreement": 0.9},
                          {"max_drift_pct": 1.0, "min_top1_agreement": 0.95})
    assert failed["status"] == "fail" and len(failed["violations"]) == 2
    assert check_budget({"ppl": 3.0}, {"max_kld_mean": 0.1})["violations"] == ["kld_mean missing"]
    assert check_budget({"drift_pct": 2.0}, {"max_drift_pct": 1.0, "report_only": True})["status"].startswith("over")


def test_cli_evaluate_writes_the_metrics_file_and_reproduces_it(export_dir, checkpoint_dir, data_dir, tmp_path):
    out = tmp_path / "m.json"
    args = ["evaluate", "--artifact", str(export_dir), "--reference", str(checkpoint_dir), "--data", str(data_dir),
            "--name", "export", "--out", str(out), "-S", "eval.max_windows=6"]
    proc = run_cli(*args, check=True)
    first = json.loads(out.read_text())
    assert {"ppl", "ref_ppl", "drift_pct", "kld_mean", "kld_p99", "top1_agreement", "size_bytes", "size_ratio"} <= first.keys()
    assert first["windows"] == 6 and first["budget"]["status"].startswith("pass")
    assert first["parity_vs"] == "pytorch" and first["parity_greedy_match"] is True
    assert first["parity_max_abs_logit_delta"] < 1e-3 and first["parity_vs"] == "pytorch"
    assert "PPL" in proc.stdout and "drift" in proc.stdout
    run_cli(*args, check=True)
    second = json.loads(out.read_text())
    assert second["ppl"] == first["ppl"] and second["kld_mean"] == first["kld_mean"]


def test_cli_evaluate_fails_over_budget_unless_report_only(export_dir, checkpoint_dir, data_dir, tmp_path):
    base = ["evaluate", "--artifact", str(export_dir), "--reference", str(checkpoint_dir), "--data", str(data_dir),
            "--name", "export", "-S", "eval.max_windows=3", "-S", "budgets.export.min_top1_agreement=1.01"]
    proc = run_cli(*base)
    assert proc.returncode == 1 and "outside its budget" in proc.stderr
    assert run_cli(*base, "-S", "budgets.export.report_only=true").returncode == 0
    no_ref = [a for a in base if a not in ("--reference", str(checkpoint_dir))]
    proc = run_cli(*no_ref)  # PPL only: drift/KLD budgets cannot be judged without a reference
    assert proc.returncode == 0 and "not checked (no --reference)" in proc.stdout


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "3.0", None, True])
def test_a_figure_that_is_not_a_finite_number_never_passes(bad):
    """NaN compares false with every bound: a check that only asks `value > limit` lets it through."""
    figures = {"ppl": 3.0, "drift_pct": 0.1, "kld_mean": 1e-4, "top1_agreement": bad}
    budget = {"max_drift_pct": 1.0, "max_kld_mean": 0.01, "min_top1_agreement": 0.9}
    verdict = check_budget(figures, budget)
    if bad is None:  # absent: the budget names it missing
        assert verdict["violations"] == ["top1_agreement missing"]
        return
    assert verdict["status"] == "fail" and verdict["violations"][0].startswith("top1_agreement is ")
    assert check_budget(figures, {**budget, "report_only": True})["status"] == "fail"  # report-only relaxes bounds only
    assert check_budget(figures, None)["status"] == "fail"  # and without a budget too
