"""Shared fixtures: one small built-in model per test session (same code path, smaller training budget),
exported once; derived artifacts built on demand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.params import load_params, set_dotted  # noqa: E402

# Same stages, same architecture; a training budget that fits a test run.
SMALL = ("train.steps=40", "train.warmup=5", "eval.max_windows=12", "int8_static.calibration.samples=8",
         "imatrix.calibration.samples=8",
         # task accuracy (lm-eval) is measured where a test asks for it (tests/test_tasks.py)
         "tasks.names=[]",
         # 40 training steps cannot reach a quarter of the unigram perplexity: report, don't fail
         "budgets.checkpoint.report_only=true")


def small_params(*extra: str):
    return load_params(REPO / "params.yaml", [o for o in SMALL if _known(o)] + list(extra))


def _known(override: str) -> bool:
    """Does params.yaml have the section this override sets a key of?"""
    key = override.split("=", 1)[0].split(".")
    node = load_params(REPO / "params.yaml").model_dump()
    for part in key[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict)


def build(name: str, params, parent, out: Path, scoring=None, uses: dict | None = None) -> dict:
    """Build stage ``name`` the way `pipeline <verb>` does: its declaration on the one runner."""
    from pipeline.runner import run_stage

    return run_stage(name, params, parent, out, scoring, uses).manifest


def calibrated(data_dir: Path, *extra: str):
    """small_params with every calibration source on the data artifact's calibration split."""
    cal = data_dir / "calibration.txt"
    return small_params(f"int8_static.calibration.source={cal}", f"imatrix.calibration.source={cal}", *extra)


def scoring(params, data_dir: Path, reference: Path):
    from pipeline.scoring.evaluate import Scoring

    return Scoring(text=(data_dir / "eval.txt").read_text(), reference=reference, eval=params.eval, tasks=params.tasks)


def run_cli(*args: str, cwd: Path | str = REPO, check: bool = False, env: dict | None = None):
    """Run the real `pipeline` command in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_clean_failure(proc, *needles: str) -> str:
    """Exit != 0, one `error:` line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


def no_partial(parent: Path) -> None:
    leftovers = [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


@pytest.fixture(scope="session")
def params():
    return small_params()


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def data_dir(params, work):
    build("data", params, None, work / "data")
    return work / "data"


@pytest.fixture(scope="session")
def checkpoint_dir(params, data_dir, work):
    build("checkpoint", params, data_dir, work / "checkpoint")
    return work / "checkpoint"


@pytest.fixture(scope="session")
def export_dir(params, checkpoint_dir, work):
    build("export", params, checkpoint_dir, work / "export")
    return work / "export"


@pytest.fixture(scope="session")
def fused_dir(params, export_dir, work):
    build("fused", params, export_dir, work / "fused")
    return work / "fused"


@pytest.fixture(scope="session")
def derived(params, fused_dir, export_dir, data_dir, work):
    """Build a derived artifact once per session: derived('int4') -> its directory."""
    built = {}
    dirs = {"fused": fused_dir, "export": export_dir}

    def make(name: str) -> Path:
        if name == "fused":
            return fused_dir
        if name not in built:
            p = calibrated(data_dir)
            parent = "fused" if name == "fp16" else getattr(p, name.replace("-", "_")).parent
            uses = {"imatrix": make("imatrix")} if name in ("int4", "int8-dynamic") else None
            build(name, p, dirs[parent], work / name, uses=uses)
            built[name] = work / name
        return built[name]

    return make


def sh(*args, cwd, check=True, timeout=1200):
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def git(*args, cwd):
    return sh("git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", *args, cwd=cwd)


@pytest.fixture(scope="session")
def publisher(tmp_path_factory):
    """This project, copied with the small training budget, committed and built by `dvc repro` (once per
    session: the end-to-end DVC tests and `pipeline tune`'s start from it)."""
    root = tmp_path_factory.mktemp("e2e") / "publisher"
    files = sh("git", "ls-files", cwd=REPO).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    params = yaml.safe_load((root / "params.yaml").read_text())
    # the DVC path measures task accuracy too (each stage when built, evaluate@ reusing it), on the cloze task
    for override in (*SMALL, "tasks.names=[cloze]"):
        if _known(override):
            set_dotted(params, override)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stale in ("dvc.lock", "metrics", "reports"):
        p = root / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    git("init", "-q", "-b", "main", cwd=root)
    sh("git", "config", "user.email", "ci@example.com", cwd=root)  # gto tags need an identity
    sh("git", "config", "user.name", "ci", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "project", cwd=root)
    t0 = time.perf_counter()
    proc = sh("dvc", "repro", cwd=root)
    root.joinpath(".repro_seconds").write_text(f"{time.perf_counter() - t0:.1f}")
    assert "Running stage 'report'" in proc.stdout
    return root


@pytest.fixture
def copy(derived, tmp_path):
    """copy('int4') -> a copy of a built artifact in this test's tmp_path, to tamper with."""
    def make(name="int4"):
        dst = tmp_path / name
        shutil.copytree(derived(name), dst)
        return dst
    return make


def genai_greedy(directory: Path, ids: list[int], new: int) -> list[int]:
    """onnxruntime-genai's own greedy decode of ``new`` tokens after ``ids``, reading only the artifact's
    genai_config.json."""
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    options = og.GeneratorParams(model)
    options.set_search_options(max_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, options)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
