"""The shape of the code, checked: the import contract (import-linter), no import cycles, dvc.yaml as
the stage declarations give it, and every module a stage executes among that stage's DVC deps."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from pipeline import dvcgen, registry
from pipeline.schema import ARTIFACTS, Params
from pipeline.scoring import evaluate
from tests.conftest import REPO, run_cli

FIRST_PARTY = dvcgen.PACKAGES


def test_import_contract_is_kept():
    proc = subprocess.run(["lint-imports", "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_no_import_cycles():
    """Function-level imports count too: none may close a cycle."""
    graph = dvcgen._graph()
    modules = sorted(m for m in graph.modules if m.split(".")[0] in FIRST_PARTY)
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n.split(".")[0] not in FIRST_PARTY:
                continue
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [])


def test_dvc_yaml_is_generated_from_the_declarations():
    proc = run_cli("dvc-yaml", "--check", "--out", str(REPO / "dvc.yaml"))
    assert proc.returncode == 0, proc.stderr


def test_the_stage_declarations_are_the_one_list_of_stages():
    """The index read from stages/*.py equals the imported declarations, and the CLI, dvc.yaml and the
    supervisor each offer exactly the declared stages."""
    from pipeline import cli
    from pipeline.ops import supervise

    registry.check_index()
    assert ARTIFACTS == registry.ARTIFACTS and set(registry.ONNX) <= set(registry.ARTIFACTS)
    for name, entry in registry.index().items():
        stage = registry.load(name)
        assert stage.summary, name
        section = stage.section
        assert section is None or section in Params.model_fields, name
        assert entry.verb in cli.cli.commands and entry.verb in supervise.verbs(), name
        if entry.mode:
            mode = next(p for p in cli.cli.commands[entry.verb].params if p.name == "mode")
            assert entry.mode in mode.type.choices, name
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert set(doc["stages"]) - {"evaluate", "report"} == set(registry.STAGES)
    assert set(doc["stages"]["evaluate"]["foreach"]) == set(registry.ONNX)
    for name, entry in registry.index().items():
        assert doc["stages"][name]["cmd"].startswith(f"pipeline {entry.command} "), name


def test_scorer_fingerprint_covers_the_scoring_code():
    closure = {m for m in dvcgen.closure("pipeline.scoring.evaluate")  # packages' __init__ (docstrings) aside
               if not dvcgen.module_file(m).endswith("__init__.py")}
    assert closure <= set(evaluate.SCORER_MODULES), closure - set(evaluate.SCORER_MODULES)


def test_recorded_figures_are_reused_only_from_the_same_scoring_code():
    from pipeline.schema import Eval

    text, ev = "some held-out text", Eval(ctx=64, max_windows=2)
    rec = {"reference_id": "r", "text_sha256": evaluate.text_sha256(text), "ctx": 64, "max_windows": 2,
           "scorer": evaluate.scorer_fingerprint(), "ppl": 3.0}
    ref = {"artifact_id": "r"}
    assert evaluate._recorded({"metrics": {"eval": rec}}, ref, text, ev) == rec
    for key, other in (("scorer", "0" * 16), ("reference_id", "s"), ("max_windows", 3)):
        assert evaluate._recorded({"metrics": {"eval": {**rec, key: other}}}, ref, text, ev) is None, key


def _executed(stderr: str) -> set[str]:
    """First-party modules a run imported (``-X importtime`` lines, the spawned children's included)."""
    names = set()
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", line.strip())
        if m and m.group(1).split(".")[0] in FIRST_PARTY:
            names.add(m.group(1))
    return names


def _deps(stage: str) -> set[str]:
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    entry = doc["stages"]["evaluate"]["do"] if stage == "evaluate" else doc["stages"][stage]
    return set(entry["deps"])


@pytest.mark.parametrize("stage", ["export", "fused", "imatrix", "int4", "int8-static", "evaluate"])
def test_every_module_a_stage_executes_is_among_its_deps(stage, export_dir, fused_dir, checkpoint_dir, data_dir,
                                                          derived, tmp_path):
    out = tmp_path / "out"
    ev = ["--reference", str(export_dir), "--data", str(data_dir), "-S", "eval.max_windows=2"]
    args = {"export": ["export", "--checkpoint", str(checkpoint_dir), "--out", str(out), "--data", str(data_dir),
                       "-S", "eval.max_windows=2", "-S", "export.greedy_tokens=4"],
            "fused": ["fuse", "--input", str(export_dir), "--out", str(out), *ev],
            "imatrix": ["imatrix", "--input", str(fused_dir), "--out", str(out), "-S",
                        f"imatrix.calibration.source={data_dir / 'calibration.txt'}", "-S", "imatrix.calibration.samples=2"],
            "int4": ["quantize", "--mode", "int4", "--input", str(fused_dir), "--out", str(out), *ev,
                     "--imatrix", str(derived("imatrix"))],
            "int8-static": ["quantize", "--mode", "static", "--input", str(fused_dir), "--out", str(out), *ev,
                            "--calibration", str(data_dir / "calibration.txt"), "--samples", "2"],
            "evaluate": ["evaluate", "--artifact", str(fused_dir), *ev]}[stage]
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = _executed(proc.stderr)
    # (modules loaded by importlib.import_module, as registry.load does, bypass -X importtime's log; the
    # stage's own module is among its deps by construction)
    assert {"pipeline.cli", "pipeline.scoring.evaluate" if stage == "evaluate" else "pipeline.runner"} <= executed
    missing = {dvcgen.module_file(m) for m in executed} - _deps(stage)
    assert not missing, f"{stage} executes {sorted(missing)}, not among its deps in dvc.yaml"


def test_doc_tables_are_generated_from_their_results_files():
    """The docs' tables come from the committed benchmark results (the README's artifact table comes from
    metrics/, which every `dvc repro` rewrites: `python benchmarks/tables.py` after it)."""
    docs = sorted(str(p) for p in (REPO / "docs").glob("*.md"))
    proc = subprocess.run([sys.executable, "benchmarks/tables.py", "--check", *docs], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "<!-- table: stages" in (REPO / "docs" / "real-shapes.md").read_text()
