"""Reliability: params refused before any work, faults survived (SIGKILL, two runs, disk full), untrusted
input refused, runtime input checked. Every case runs for real and asserts the message and the exit code
(README, "Bad input and faults")."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.consumer import manifest as mf
from pipeline.consumer.runtime import Runtime
from pipeline.consumer.verify import verify
from pipeline.errors import PipelineError
from tests.conftest import REPO, assert_clean_failure, run_cli


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("override, needles", [
    ("eval.ctx=abc", ("eval.ctx", "'abc'", "integer")),
    ("int8_static.per_chanel=false", ("unknown key int8_static.per_chanel", "did you mean int8_static.per_channel")),
    ("eval.max_windows=-1", ("eval.max_windows", "-1", "greater than or equal to 0")),
    ("eval.ctx=-5", ("eval.ctx", "-5", "greater than or equal to 4")),
    ("int8_static.calibration.samples=0", ("int8_static.calibration.samples", "greater than or equal to 1")),
    ("int4.block_size=48", ("int4.block_size", "48", "power of two")),
    ("int8_static.method=minmax", ("int8_static.method", "'MinMax', 'Entropy' or 'Percentile'")),
    ("budgets.int4.max_drfit_pct=1", ("budgets.int4.max_drfit_pct", "did you mean 'max_drift_pct'")),
    ("data.fractions.train=0.5", ("data.fractions", "sum to 1")),
    ("evl.ctx=64", ("unknown key evl", "did you mean eval")),
    ("model.outliers.scale=3", ("model.outliers.scale", "power of two")),
    ("int4.algorithm=autoround", ("int4.algorithm", "'rtn', 'k_quant', 'imatrix', 'awq' or 'gptq'")),
    ("int4.symmetric=false", ("int4.algorithm awq quantizes symmetrically",)),
    ("int4.int8_fraction=1.5", ("int4.int8_fraction", "less than or equal to 1")),
    ("int8_dynamic.format=qoperator", ("unknown key int8_dynamic.format",)),
])
def test_bad_params_are_refused_before_any_work(override, needles):
    assert_clean_failure(run_cli("check-params", "-S", override), *needles)


def test_every_verb_validates_its_params(fused_dir, data_dir, tmp_path):
    proc = run_cli("evaluate", "--artifact", str(fused_dir), "--data", str(data_dir), "-S", "eval.ctx=abc")
    assert proc.returncode == 2 and "internal error" not in proc.stderr
    assert_clean_failure(proc, "eval.ctx = 'abc'")
    out = tmp_path / "int4"
    start = time.perf_counter()
    proc = run_cli("quantize", "--mode", "int4", "--input", str(fused_dir), "--out", str(out), "-S",
                   "int4.block_sise=32")
    assert_clean_failure(proc, "unknown key int4.block_sise", "int4.block_size")
    assert not out.exists() and time.perf_counter() - start < 30  # refused before loading any model
    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("  seed: 0\n", "  seed: zero\n", 1))
    assert_clean_failure(run_cli("check-params", "--params", str(bad)), "data.seed", "'zero'")
    assert run_cli("check-params", check=True).stdout.startswith("params ok")


# ----------------------------------------------------------------------------------------------- faults
def _static(fused_dir, data_dir, out):
    return [sys.executable, "-m", "pipeline", "quantize", "--mode", "static", "--input", str(fused_dir), "--out",
            str(out), "--no-eval", "-S", f"int8_static.calibration.source={data_dir / 'calibration.txt'}",
            "-S", "int8_static.calibration.samples=8"]


def _start_and_wait_for_staging(cmd, parent: Path, name: str, extra_s: float = 0.0):
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(parent.glob(f".{name}.tmp-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stage never created its staging directory"
        time.sleep(0.05)
    time.sleep(extra_s)
    return proc


@pytest.mark.parametrize("after_s", [0.0, 2.5])
def test_sigkill_leaves_nothing_that_verifies_and_the_next_run_cleans_up(fused_dir, data_dir, tmp_path, after_s):
    out = tmp_path / "int8-static"
    proc = _start_and_wait_for_staging(_static(fused_dir, data_dir, out), tmp_path, out.name, after_s)
    assert proc.poll() is None, "the stage ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert _leftovers(tmp_path), "a killed run leaves its scratch (removed by the next run)"
    for stale in tmp_path.iterdir():
        if stale.is_dir():
            with pytest.raises(PipelineError):
                verify(stale, load=False)
    again = subprocess.run(_static(fused_dir, data_dir, out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "removed" in again.stderr and "interrupted run" in again.stderr
    assert _leftovers(tmp_path) == []
    verify(out)


def test_a_second_run_on_the_same_artifact_is_refused(fused_dir, data_dir, tmp_path):
    out = tmp_path / "int8-static"
    first = _start_and_wait_for_staging(_static(fused_dir, data_dir, out), tmp_path, out.name)
    second = subprocess.run(_static(fused_dir, data_dir, out), cwd=REPO, capture_output=True, text=True, timeout=600)
    line = assert_clean_failure(second, "another pipeline run", str(out))
    holder = int(re.search(r"pid (\d+)", line).group(1))  # the stage: `pipeline`'s watched child (supervise.py)
    assert holder == first.pid or int(Path(f"/proc/{holder}/stat").read_text().rsplit(")", 1)[1].split()[1]) == first.pid
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    verify(out)
    assert _leftovers(tmp_path) == []


def _file_size_limit(fsize: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def test_disk_full_gives_one_line_and_no_partial_artifact(fused_dir, tmp_path):
    """ENOSPC met while writing (a 1 MB file-size limit: the write fails as on a full disk, EFBIG), however
    the library that meets it reports it."""
    out = tmp_path / "int4"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "quantize", "--mode", "int4", "--input", str(fused_dir),
                           "--out", str(out), "--no-eval", "--algorithm", "rtn"], cwd=REPO, capture_output=True,
                          text=True, preexec_fn=_file_size_limit(1 << 20), timeout=600)
    assert proc.returncode == 2
    assert_clean_failure(proc, "no space left", "nothing was published")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".int4")] == []


def test_a_disk_too_small_for_the_artifact_is_refused_before_the_build(fused_dir, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a small tmpfs")
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "quantize", "--mode", "int4", "--input",
                               str(fused_dir), "--out", str(mnt / "int4"), "--no-eval", "--algorithm", "rtn"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert_clean_failure(proc, "int4 needs about", "is free", "larger disk")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ----------------------------------------------------------------------------------------------- untrusted input
def _pickled_copy(checkpoint_dir: Path, dst: Path) -> Path:
    from transformers import AutoModelForCausalLM

    dst.mkdir()
    for f in checkpoint_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "manifest.json":
            shutil.copy2(f, dst / f.name)
    AutoModelForCausalLM.from_pretrained(str(checkpoint_dir)).save_pretrained(str(dst), safe_serialization=False)
    assert (dst / "pytorch_model.bin").is_file() and not list(dst.glob("*.safetensors"))
    return dst


def test_pickle_only_checkpoint_needs_the_flag_that_names_the_risk(checkpoint_dir, data_dir, tmp_path):
    src = _pickled_copy(checkpoint_dir, tmp_path / "pickled")
    args = ["checkpoint", "--source", str(src), "--data", str(data_dir), "--out", str(tmp_path / "ck"),
            "-S", "eval.max_windows=4"]
    assert_clean_failure(run_cli(*args), "only pickled weights", "arbitrary code", "allow_unsafe_pickle_weights")
    assert not (tmp_path / "ck").exists()
    run_cli(*args, "-S", "model.allow_unsafe_pickle_weights=true", check=True)
    m = mf.read_manifest(tmp_path / "ck")
    assert m["source"]["converted_from_pickle"] is True
    names = {f["path"] for f in m["files"]}
    assert "model.safetensors" in names and not any(n.endswith(".bin") for n in names)


def test_remote_code_never_runs_unless_asked(checkpoint_dir, data_dir, tmp_path):
    src = tmp_path / "custom"
    shutil.copytree(checkpoint_dir, src)
    (src / "manifest.json").unlink()
    marker = tmp_path / "remote-code-ran"
    (src / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "from transformers import Qwen3ForCausalLM as EvilForCausalLM\n")
    cfg = (src / "config.json").read_text().replace('"architectures"', '"auto_map": {"AutoModelForCausalLM": '
                                                    '"modeling_evil.EvilForCausalLM"}, "architectures"', 1)
    (src / "config.json").write_text(cfg)
    run_cli("checkpoint", "--source", str(src), "--data", str(data_dir), "--out", str(tmp_path / "ck"),
            "-S", "eval.max_windows=4", check=True)
    assert not marker.exists()
    assert not (tmp_path / "ck" / "modeling_evil.py").exists()


CORRUPTIONS = ("flip", "truncate", "append", "delete", "add", "rename")


@pytest.fixture(scope="module")
def pristine(derived):
    return derived("int4")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(CORRUPTIONS), which=st.integers(min_value=0), where=st.floats(0, 1), bit=st.integers(0, 7))
def test_any_corruption_of_a_valid_artifact_is_refused(pristine, kind, which, where, bit):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "a"
        shutil.copytree(pristine, d)
        verify(d, load=False)
        files = sorted(p for p in d.iterdir())
        target = files[which % len(files)]
        data = target.read_bytes()
        at = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            target.write_bytes(data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:])
        elif kind == "truncate":
            target.write_bytes(data[:at])
        elif kind == "append":
            target.write_bytes(data + b"\n" * (bit + 1))
        elif kind == "delete":
            target.unlink()
        elif kind == "add":
            (d / f"extra{bit}.json").write_text("{}")
        else:
            target.rename(d / (target.name + ".moved"))
        with pytest.raises(PipelineError):
            verify(d)


def test_a_valid_artifact_always_passes(pristine, tmp_path):
    d = tmp_path / "a"
    shutil.copytree(pristine, d)
    assert verify(d)["artifact_id"] == mf.read_manifest(pristine)["artifact_id"]


AUDIT = r"""
import runpy, sys
BANNED = ("torch", "transformers", "optimum", "datasets", "dvc", "joblib", "dill", "cloudpickle")
def hook(event, args):
    if event == "pickle.find_class":
        print(f"UNPICKLED {args}", file=sys.stderr); sys.stderr.flush(); import os; os._exit(97)
    if event == "import" and args[0].split(".")[0] in BANNED:
        print(f"IMPORTED {args[0]}", file=sys.stderr); sys.stderr.flush(); import os; os._exit(98)
sys.addaudithook(hook)
sys.argv = ["pipeline"] + sys.argv[1:]
runpy.run_module("pipeline", run_name="__main__")
"""


def test_consuming_an_artifact_unpickles_nothing(derived, data_dir, tmp_path):
    """Python's audit events see every unpickled class and every import: none while consuming."""
    d = derived("int8-dynamic")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["verify", str(d)], ["generate", "--artifact", str(d), "The", "x", "--max-new-tokens", "3"],
                 ["evaluate", "--artifact", str(d), "--text", str(data_dir / "eval.txt"), "-S", "eval.ctx=64",
                  "-S", "eval.max_windows=2"]):
        proc = subprocess.run([sys.executable, "-c", AUDIT, *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------- runtime input
def test_runtime_input_is_checked(export_dir):
    d = str(export_dir)
    assert_clean_failure(run_cli("generate", "--artifact", d, ""), "the prompt is empty")
    assert_clean_failure(run_cli("generate", "--artifact", d, "hi", "--max-new-tokens", "0"), "max-new-tokens", "0")
    assert_clean_failure(run_cli("generate", "--artifact", d, "hi", "--max-new-tokens", "-3"), "max-new-tokens")
    proc = run_cli("generate", "--artifact", d, "word " * 600)
    line = assert_clean_failure(proc, "the prompt has", "context is 512", "shorten the prompt")
    assert proc.stdout == "" and "601 tokens" in line
    assert_clean_failure(run_cli("generate", "--artifact", d, "hi", "there", ""), "the prompt is empty", "prompt 3 of 3")
    assert_clean_failure(run_cli("generate", "--artifact", d, "hi", "--temperature", "-1"), "--temperature")


def test_context_end_stops_generation(export_dir):
    """The documented behaviour: a prompt plus max_new_tokens past the context stops at the context's end."""
    rt = Runtime(export_dir)
    prompt = rt.encode("word " * 600)[:500]
    assert len(rt.generate(prompt, 64, stop_at_eos=False)) == 512 - len(prompt)


@pytest.mark.parametrize("name", ["export", "fused"])
def test_a_batch_of_different_lengths_equals_one_by_one(export_dir, fused_dir, data_dir, name):
    """export: left-padded, KV concatenated; fused (GroupQueryAttention): right-padded, shared KV buffers."""
    rt = Runtime(export_dir if name == "export" else fused_dir)
    assert rt.io.right_padded is (name == "fused")
    text = (data_dir / "eval.txt").read_text()
    prompts = [rt.encode(text[:n]) for n in (20, 200, 60, 5)]
    assert len({len(p) for p in prompts}) == 4
    batch = rt.generate_batch(prompts, 12, stop_at_eos=False)
    assert batch == [rt.generate(p, 12, stop_at_eos=False) for p in prompts]
    if name == "export":
        return
    left = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(PipelineError, match="pad on the right"):
        rt.forward(np.array([[5, 6, 7, 8], [5, 6, 7, 8]]), None, left)
    proc = run_cli("generate", "--artifact", str(export_dir), text[:20], text[:60], "--max-new-tokens", "4", check=True)
    assert [line[:3] for line in proc.stdout.splitlines() if line.startswith("[")] == ["[1]", "[2]"]
    assert "2 prompts as one batch" in proc.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="CUDA is installed here")
def test_a_provider_that_is_not_installed(export_dir):
    assert_clean_failure(run_cli("generate", "--artifact", str(export_dir), "hi", "--provider", "cuda"),
                         "no CUDAExecutionProvider", "onnxruntime-gpu")


# ----------------------------------------------------------------------------------------------- reproducibility
LEGACY_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "DNNL_MAX_CPU_ISA": "SSE41",
              "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


@pytest.mark.slow
def test_training_gives_the_same_checkpoint_on_two_cpu_code_paths(data_dir, tmp_path):
    """The outer environment asks for another code path (as another CPU would pick one): pinned (avx2, or
    portable: MKL's one cross-vendor branch), the checkpoint and the export are bit-identical; unpinned
    (train.cpu_code_path=native), they are not."""
    quick = ["-S", "train.steps=8", "-S", "train.warmup=2", "-S", "eval.max_windows=2", "-S",
             "budgets.checkpoint.report_only=true"]
    ids = {}
    for path in ("avx2", "portable", "native"):
        for label, env in (("default", {}), ("legacy", LEGACY_CPU)):
            out = tmp_path / f"{path}-{label}"
            run_cli("checkpoint", "--data", str(data_dir), "--out", str(out / "ck"), *quick,
                    "-S", f"train.cpu_code_path={path}", env=env, check=True)
            ids[path, label] = mf.read_manifest(out / "ck")["artifact_id"], mf.sha256_file(out / "ck" / "model.safetensors")
            if path == "avx2":
                run_cli("export", "--checkpoint", str(out / "ck"), "--out", str(out / "ex"), "--no-eval", *quick,
                        env=env, check=True)
                ids[path, label, "export"] = mf.read_manifest(out / "ex")["artifact_id"]
    assert ids["avx2", "default"] == ids["avx2", "legacy"]
    assert ids["avx2", "default", "export"] == ids["avx2", "legacy", "export"]
    assert ids["portable", "default"] == ids["portable", "legacy"]
    assert ids["portable", "default"][1] != ids["avx2", "default"][1], "MKL's COMPATIBLE branch is not taken"
    assert ids["native", "default"][1] != ids["native", "legacy"][1], "the two code paths do not differ here"


def test_a_hard_linked_parent_is_refused_in_one_line_before_the_build(fused_dir, tmp_path):
    """DVC's hardlink cache type links every output into .dvc/cache; onnx refuses such external data as
    a "hard link attack" deep inside a stage. The runner says so first (docs/real-shapes.md, "Disk")."""
    parent = tmp_path / "fused"
    shutil.copytree(fused_dir, parent)
    os.link(parent / "model.onnx_data", tmp_path / "cache-entry")
    proc = run_cli("fp16", "--input", str(parent), "--out", str(tmp_path / "fp16"), "--no-eval")
    assert_clean_failure(proc, "2 hard links", "reflink,copy", "dvc checkout --relink")
    assert not (tmp_path / "fp16").exists()


def test_sigterm_ends_a_stage_cleanly_at_once(fused_dir, data_dir, tmp_path):
    """`kill` (SIGTERM) on `pipeline`: the watched stage unwinds as for Ctrl-C, nothing is left behind
    without waiting for the next run."""
    out = tmp_path / "int8-static"
    proc = _start_and_wait_for_staging(_static(fused_dir, data_dir, out), tmp_path, out.name, 1.0)
    assert proc.poll() is None, "the stage ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "aborted" in err and "Traceback" not in err  # as for Ctrl-C
    assert not out.exists() and _leftovers(tmp_path) == []
