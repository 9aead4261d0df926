"""A model with outlier channels (pipeline/outliers.py, the same function as the built-in model) through
the precision stages: each default artifact stays inside its drift, KLD and top-1 budgets, and the naive
variants (no smoothing for int8, ORT's RTN for int4) visibly do not."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.consumer.runtime import Runtime
from pipeline.scoring.evaluate import check_budget
from tests.conftest import build, calibrated, scoring

# 4 channels x256 in every norm output and MLP intermediate. (On the 40-step test model, whose distributions
# are flatter than the built-in model's, x64 leaves ORT's RTN inside the int4 budget; x256 does not.)
OUTLIERS = ("model.outliers.channels=4", "model.outliers.scale=256")


@pytest.fixture(scope="module")
def hard(checkpoint_dir, data_dir, work):
    p = calibrated(data_dir, f"model.source={checkpoint_dir}", *OUTLIERS)
    root = work / "outliers"
    build("checkpoint", p, data_dir, root / "checkpoint")
    build("export", p, root / "checkpoint", root / "export", scoring(p, data_dir, root / "checkpoint"))
    build("fused", p, root / "export", root / "fused")
    build("imatrix", p, root / "fused", root / "imatrix")
    return p, root


def test_outliers_keep_the_function_and_make_the_activations_hard(hard, checkpoint_dir, export_dir, derived):
    p, root = hard
    from pipeline.consumer import manifest as mf

    orig, moved = mf.read_manifest(checkpoint_dir), mf.read_manifest(root / "checkpoint")
    assert moved["source"]["outliers"]["channels"] == 4 and moved["artifact_id"] != orig["artifact_id"]
    assert moved["metrics"]["heldout_ppl"] == pytest.approx(orig["metrics"]["heldout_ppl"], rel=1e-5)
    ids = np.arange(5, 69)
    a, b = Runtime(export_dir).logits(ids), Runtime(root / "export").logits(ids)
    assert np.abs(a - b).max() < 1e-3  # powers of two: the same function up to float summation order
    easy, moved = (mf.read_manifest(d)["metrics"] for d in (derived("imatrix"), root / "imatrix"))
    for key in ("max_outlier_ratio", "median_outlier_ratio"):  # the largest channel / the median one
        assert moved[key] > 4 * easy[key], (key, easy[key], moved[key])


# (artifact, overrides, in budget?)
CASES = [
    ("int8-dynamic", [], True),
    ("int8-dynamic", ["int8_dynamic.smoothing.enabled=false"], False),
    ("int8-static", [], True),
    ("int4", [], True),
    ("int4", ["int4.algorithm=rtn", "int4.block_size=32", "int4.tied_bits=4"], False),
    ("fp16", [], True),
]


@pytest.fixture(scope="module")
def built(hard, data_dir):
    """built(name, overrides) -> (params, manifest): each variant built and scored once in this module."""
    _, root = hard
    cache: dict = {}

    def make(name: str, overrides: list[str]):
        key = (name, *overrides)
        if key not in cache:
            p = calibrated(data_dir, f"model.source={root / 'checkpoint'}", *OUTLIERS, *overrides)
            out = root / f"{name}-{len(cache)}"
            cache[key] = p, build(name, p, root / "fused", out, scoring(p, data_dir, root / "export"),
                                  {"imatrix": root / "imatrix"} if name in ("int4", "int8-dynamic") else None)
        return cache[key]

    return make


@pytest.mark.parametrize("name,overrides,in_budget", CASES, ids=[f"{c[0]}{'-naive' if c[1] else ''}" for c in CASES])
def test_outlier_model_every_default_in_budget_and_naive_out(built, name, overrides, in_budget):
    p, m = built(name, overrides)
    ev = m["metrics"]["eval"]
    verdict = check_budget(ev, p.budgets[name])
    assert {"max_kld_mean", "max_kld_p99", "min_top1_agreement"} <= set(p.budgets[name])
    if in_budget:
        assert verdict["status"].startswith("pass"), (verdict, ev)
    else:
        assert verdict["status"].startswith("fail") and any(v.startswith("kld_mean") for v in verdict["violations"]), (verdict, ev)


def test_gptq_lowers_the_int4_kld_on_the_outlier_model(built):
    """int4.algorithm gptq (AWQ's scaling, then GPTQ's rounding with the inputs' Hessians) against the
    default awq, same blocks and table, both scored here: a lower mean KLD and inside the int4 budgets."""
    p, default = built("int4", [])
    _, gptq = built("int4", ["int4.algorithm=gptq"])
    a, g = default["metrics"]["eval"], gptq["metrics"]["eval"]
    assert g["kld_mean"] < a["kld_mean"] and g["kld_p99"] < a["kld_p99"], (a, g)
    assert check_budget(g, p.budgets["int4"])["status"].startswith("pass"), g
    assert "GPTQ" in gptq["quant_policy"]["weights"] and gptq["quant_policy"]["gptq"]["tokens"] > 0
