"""`pipeline tune`'s search logic and budget syntax, on figures given here (no DVC: tests/test_tune.py runs
the searches for real, on DVC's queue)."""

import pytest

from pipeline.tune.search import parse_budget


def test_budget_syntax():
    assert parse_budget("kld_mean=0.005, top1=0.95,drift_pct=1") == {
        "max_kld_mean": 0.005, "min_top1_agreement": 0.95, "max_drift_pct": 1.0}
    assert parse_budget("min_decode_tok_s=30,max_size_ratio=0.2") == {"min_decode_tok_s": 30.0, "max_size_ratio": 0.2}


def _search(strategy="greedy", **kw):
    from pathlib import Path

    from pipeline.tune.search import Search
    from tests.conftest import REPO

    space = kw.pop("space", {"algorithm": ["rtn", "awq"], "block_size": [128, 256], "tied_bits": [4, 8]})
    return Search("int4", space, {"int8_fraction": [0.25, 0.5]}, {"algorithm": "awq", "block_size": 128,
                  "tied_bits": 8, "awq_alpha": 0.75}, "size", {"max_kld_mean": 0.01}, strategy, 40, 0,
                  Path(REPO / "params.yaml"))


def _record(search, cands, figures):
    from pipeline.tune.search import Result

    for c in cands:
        size, kld = figures[c.label()]
        search.results[c.name] = Result(c, "success", {"size_bytes": size, "kld_mean": kld, "size_ratio": size / 100,
                                                       "drift_pct": 0.0, "top1_agreement": 0.9})


def test_greedy_combines_the_winning_moves_then_promotes_what_is_over_budget():
    """Round by round, on figures given here."""
    search = _search()
    rounds = search.rounds()
    first = next(rounds)
    assert [c.label() for c in first] == ["start recipe (params.yaml)", "algorithm=rtn", "block_size=256", "tied_bits=4"]
    _record(search, first, {"start recipe (params.yaml)": (17, 0.002), "algorithm=rtn": (17, 0.005),
                            "block_size=256": (16, 0.003), "tied_bits=4": (13, 0.02)})
    second = next(rounds)  # the smaller moves, inside the budget first; rtn is no smaller and less accurate
    assert [c.label() for c in second] == ["block_size=256, tied_bits=4"]
    _record(search, second, {"block_size=256, tied_bits=4": (12, 0.03)})
    third = next(rounds)  # the two smallest over budget, each at every promotion step
    assert [c.label() for c in third] == ["block_size=256, int8_fraction=0.25, tied_bits=4",
                                          "block_size=256, int8_fraction=0.5, tied_bits=4",
                                          "int8_fraction=0.25, tied_bits=4", "int8_fraction=0.5, tied_bits=4"]


def test_invalid_and_inert_knobs_never_become_candidates():
    search = _search(space={"algorithm": ["rtn", "imatrix"], "awq_alpha": [0.5]})
    labels = [c.label() for c in search.unique([{"algorithm": "imatrix", "awq_alpha": 0.5}, {"algorithm": "imatrix"},
                                                {"algorithm": "rtn", "int8_fraction": 0.25}])]
    assert labels == ["algorithm=imatrix"]  # awq_alpha does nothing without awq; rtn cannot keep projections at 8 bits
    assert any("int8_fraction" in s for s in search.skipped)


def test_a_grid_larger_than_max_candidates_is_refused():
    from pipeline.errors import PipelineError

    search = _search("grid", space={"block_size": [16, 32, 64, 128, 256, 512, 1024]})
    search.max_candidates = 4
    with pytest.raises(PipelineError, match="max_candidates"):
        next(search.rounds())
