"""Out of memory is a message: a stage the measured memory model says cannot fit is refused before it
loads anything, and a stage the kernel's OOM killer ends says which, what it had, of what limit, and
what it needs, leaving nothing behind. Real kernel limits: a memory cgroup (v1 as root, as on these
machines) around the real `pipeline` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_clean_failure, no_partial


def _memory_cgroup() -> Path | None:
    for ln in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = ln.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory", path.lstrip("/"))
            if (base / "memory.limit_in_bytes").is_file() and os.access(base, os.W_OK):
                return base
    return None


CGROUP = _memory_cgroup() if sys.platform.startswith("linux") and os.geteuid() == 0 else None
needs_cgroup = pytest.mark.skipif(CGROUP is None, reason="needs root and a writable cgroup v1 memory controller")


def run_limited(limit_mb: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`pipeline args` with its whole process tree in a new memory cgroup of ``limit_mb``."""
    group = CGROUP / f"pipeline-test-{os.getpid()}-{limit_mb}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_mb * 2**20))
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=600,
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        deadline = time.monotonic() + 20  # multiprocessing's resource tracker exits on its pipe's EOF, a moment later
        while (left := (group / "cgroup.procs").read_text().split()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes outlived the stage: {left}"
        return proc
    finally:
        group.rmdir()


@needs_cgroup
def test_a_stage_the_memory_model_says_cannot_fit_is_refused_before_loading(export_dir, tmp_path):
    out = tmp_path / "fused"
    proc = run_limited(200, "fuse", "--input", str(export_dir), "--out", str(out), "--no-eval")
    line = assert_clean_failure(proc, "fused", "measured memory model", "memory cgroup limit", "PIPELINE_MEMORY_CHECK=0")
    assert "210 MB" in line  # the limit it was given (200 MiB = 209.7 MB)
    assert not out.exists()
    assert "optimizer" not in proc.stderr.lower() and "built in" not in proc.stderr  # nothing was loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no scratch, no lock file


@needs_cgroup
def test_a_stage_the_oom_killer_ends_says_so_and_leaves_nothing(checkpoint_dir, tmp_path):
    out = tmp_path / "export"
    proc = run_limited(300, "export", "--checkpoint", str(checkpoint_dir), "--out", str(out), "--no-eval",
                       env={"PIPELINE_MEMORY_CHECK": "0"})
    assert proc.returncode == 137, proc.stderr
    line = assert_clean_failure(proc, "export", "out-of-memory killer", "the limit is 315 MB", "memory cgroup limit",
                                "measured memory model says it needs", "nothing was published")
    assert "anonymous" in line and "file-backed" in line
    assert not out.exists()
    no_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # scratch and lock removed


def test_a_supervised_stage_records_anonymous_and_file_backed_peaks(export_dir, tmp_path):
    metrics = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "fuse", "--input", str(export_dir), "--out",
                           str(tmp_path / "fused"), "--no-eval", "--run-metrics", str(metrics)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(metrics.read_text())
    sampled = run["sampled_rss_mb"]
    assert sampled["anon"] > 0 and sampled["file"] > 0
    assert max(sampled["anon"], sampled["file"]) <= sampled["total"] <= sampled["anon"] + sampled["file"] + sampled["shmem"]
    assert sampled["total"] <= run["peak_rss_mb"] * 1.05 + 1  # a sample never exceeds the kernel's own peak


def test_the_shipped_memory_model_is_the_fit_of_the_recorded_runs(tmp_path):
    """pipeline/ops/memory_model.json is what `benchmarks/real_shapes.py --fit` makes of the results files
    it names (refit after a real-shape run changes one of them)."""
    shipped = json.loads((REPO / "pipeline" / "ops" / "memory_model.json").read_text())
    runs = shipped["source"].split("--fit ", 1)[1].split()
    out = tmp_path / "model.json"
    subprocess.run([sys.executable, "benchmarks/real_shapes.py", "--fit", *runs, "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    assert json.loads(out.read_text()) == shipped
    assert {"checkpoint", "export", "fused", "int4"} <= set(shipped["stages"])


def test_the_sampler_keeps_a_series_whose_peak_is_its_own():
    """A real child that holds 400 MB of anonymous memory, then frees it: the series sees it rise and
    fall in time order, and the sampler's anonymous peak is the series' largest sample."""
    from pipeline.ops.memory import Sampler

    code = "import numpy as np, time; a = np.ones(50 * 2**20); time.sleep(1.5); del a; time.sleep(1.0)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    sampler = Sampler(proc.pid, every_s=0.05, series=True).start()
    proc.wait()
    peak = sampler.stop()
    times = [t for t, _, _ in sampler.series]
    anon = [a for _, a, _ in sampler.series]
    assert times == sorted(times) and len(times) > 10
    assert peak["anon"] == max(anon) >= 400 * 2**20
    assert anon[-1] < max(anon) - 300 * 2**20  # freed before the end
    assert Sampler(proc.pid).series is None
