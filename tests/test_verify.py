"""`pipeline verify` and the consumer path: refuse every tampering, never import torch, never unpickle."""

import json
import os
import shutil
import subprocess
import sys

import onnx

from pipeline.consumer import manifest as mf
from tests.conftest import REPO, assert_clean_failure, run_cli


def rehash(directory, card=True):
    """What a careless (or hostile) publisher would do: rewrite the manifest (and, with ``card``, the model
    card) to match the files."""
    from pipeline import card as model_card

    m = json.loads((directory / "manifest.json").read_text())
    m["files"] = [f for f in mf.list_files(directory) if not (card and f["path"] == mf.CARD)]
    m["artifact_id"] = mf.compute_artifact_id(m["files"], m["parent_id"], m["stage"], m["params"])
    if card:
        m["files"] = sorted([*m["files"], model_card.write(directory, m)], key=lambda f: f["path"])
    mf.write_manifest(directory, m)


def test_verify_passes_and_prints_lineage(derived, fused_dir, export_dir, checkpoint_dir, data_dir):
    proc = run_cli("verify", str(derived("int4")), check=True)
    dirs = (derived("int4"), fused_dir, export_dir, checkpoint_dir, data_dir)
    ids = [mf.read_manifest(d)["artifact_id"] for d in dirs]
    lineage = next(line for line in proc.stdout.splitlines() if line.startswith("lineage:"))
    assert lineage == (f"lineage: int4 {ids[0]} -> fused {ids[1]} -> export {ids[2]} -> checkpoint {ids[3]}"
                       f" -> data {ids[4]} -> source builtin:qwen3-tiny")


def test_missing_malformed_and_unknown_schema_manifest(copy):
    d = copy()
    (d / "manifest.json").write_text("{not json")
    assert_clean_failure(run_cli("verify", str(d)), "not valid JSON")
    (d / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    assert_clean_failure(run_cli("verify", str(d)), "schema version 99")
    (d / "manifest.json").write_text(json.dumps({"schema_version": mf.SCHEMA_VERSION, "stage": "int4"}))
    assert_clean_failure(run_cli("verify", str(d)), "malformed")
    (d / "manifest.json").unlink()
    assert_clean_failure(run_cli("verify", str(d)), "no manifest.json")


def test_listed_file_absent_and_changed_byte(copy):
    d = copy()
    data = bytearray((d / "model.onnx_data").read_bytes())
    data[len(data) // 2] ^= 1
    (d / "model.onnx_data").write_bytes(bytes(data))
    assert_clean_failure(run_cli("verify", str(d)), "model.onnx_data", "sha256")
    (d / "config.json").unlink()
    assert_clean_failure(run_cli("verify", str(d)), "config.json", "missing")


def test_edited_manifest_is_caught_by_the_artifact_id(copy):
    d = copy()
    m = json.loads((d / "manifest.json").read_text())
    m["params"]["block_size"] = m["params"]["block_size"] * 2  # a real edit
    (d / "manifest.json").write_text(json.dumps(m))
    assert_clean_failure(run_cli("verify", str(d)), "does not match its content")


def test_external_data_outside_the_artifact(copy, tmp_path):
    d = copy()
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../evil.bin"
    onnx.save(model, str(d / "model.onnx"))
    shutil.copy(d / "model.onnx_data", tmp_path / "evil.bin")
    rehash(d)
    assert_clean_failure(run_cli("verify", str(d)), "outside the artifact")
    assert_clean_failure(run_cli("generate", "--artifact", str(d), "hi"), "outside the artifact")


def test_symlink_inside_the_artifact(copy, tmp_path):
    d = copy()
    (tmp_path / "real.json").write_text((d / "config.json").read_text())
    (d / "config.json").unlink()
    os.symlink(tmp_path / "real.json", d / "config.json")
    assert_clean_failure(run_cli("verify", str(d)), "symlink")


def test_graph_the_installed_ort_cannot_load(copy):
    d = copy("fused")
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 99
    onnx.save(model, str(d / "model.onnx"))
    rehash(d)
    line = assert_clean_failure(run_cli("verify", str(d)), "cannot load")
    assert "99" in line and "onnxruntime" in line


def test_generate_and_evaluate_refuse_a_tampered_artifact(copy, data_dir):
    d = copy()
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|endoftexT|>"', 1))
    assert_clean_failure(run_cli("generate", "--artifact", str(d), "The"), "tokenizer.json", "sha256")
    assert_clean_failure(run_cli("evaluate", "--artifact", str(d), "--data", str(data_dir)), "tokenizer.json")


BLOCKER = r"""
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "optimum", "datasets", "dvc"):
            raise ImportError(f"{name} is not installed in a consumer environment")
sys.meta_path.insert(0, Block())
sys.argv = ["pipeline"] + sys.argv[1:]
runpy.run_module("pipeline", run_name="__main__")
"""


def test_consumer_needs_only_onnxruntime(derived, data_dir, tmp_path):
    """verify, generate and evaluate run with torch/transformers/optimum/datasets/dvc unimportable."""
    d = derived("int8-dynamic")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["verify", str(d)], ["generate", "--artifact", str(d), "The", "--max-new-tokens", "4"],
                 ["generate", "--artifact", str(d), "--chat", "Hello", "--max-new-tokens", "4"],
                 ["evaluate", "--artifact", str(d), "--text", str(data_dir / "eval.txt"), "-S", "eval.ctx=64",
                  "-S", "eval.max_windows=2"]):
        proc = subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr


def test_artifacts_hold_no_pickles(derived, checkpoint_dir):
    for d in (checkpoint_dir, derived("int4")):
        for f in mf.read_manifest(d)["files"]:
            assert not f["path"].endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".py")), f
