"""`pipeline quantize` by hand: a user's own calibration file without editing params.yaml, and bad input."""

import json
import shutil

import pytest

from pipeline.consumer import manifest as mf
from tests.conftest import REPO, assert_clean_failure, no_partial, run_cli

SMALL = ["-S", "int8_static.calibration.samples=4", "-S", "int8_static.calibration.seq_len=32",
         "-S", "int8_static.calibration.stride=2"]


def _static(fused_dir, out, *extra):
    evaluate = () if "--eval" in extra else ("--no-eval",)
    return run_cli("quantize", "--mode", "static", "--input", str(fused_dir), "--out", str(out), *SMALL, *evaluate,
                   *extra)


def test_static_with_a_users_calibration_file(fused_dir, export_dir, data_dir, tmp_path):
    own = tmp_path / "mine.jsonl"
    paras = (data_dir / "calibration.txt").read_text().split("\n\n")
    own.write_text("".join(json.dumps({"body": p}) + "\n" for p in paras))
    out = tmp_path / "int8-static"
    proc = _static(fused_dir, out, "--calibration", str(own), "--text-column", "body", "--method", "Percentile",
                   "--no-smoothquant", "--eval", "--reference", str(export_dir), "--data", str(data_dir),
                   "-S", "eval.max_windows=4")
    assert proc.returncode == 0, proc.stderr
    m = mf.read_manifest(out)
    assert m["quant_policy"]["calibration"]["source"] == str(own)
    assert m["quant_policy"]["activations"] == "uint8 static (Percentile)" and m["quant_policy"]["smoothquant"] is None
    assert "calibrate 4/4" in proc.stderr  # progress
    summary = proc.stderr.strip().splitlines()[-1]  # one-line summary last: id, size, drift
    assert summary.startswith(f"int8-static: {m['artifact_id']}") and "drift" in summary and "vs export" in summary


@pytest.mark.parametrize("method", ["MinMax", "Entropy"])
def test_calibration_methods(fused_dir, data_dir, tmp_path, method):
    out = tmp_path / "q"
    proc = _static(fused_dir, out, "--calibration", str(data_dir / "calibration.txt"), "--method", method)
    assert proc.returncode == 0, proc.stderr
    assert mf.read_manifest(out)["quant_policy"]["activations"] == f"uint8 static ({method})"


def test_calibration_source_problems(fused_dir, tmp_path):
    out = tmp_path / "q"
    assert_clean_failure(_static(fused_dir, out, "--calibration", str(tmp_path / "missing.txt")), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_clean_failure(_static(fused_dir, out, "--calibration", str(empty)), "empty")
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    assert_clean_failure(_static(fused_dir, out, "--calibration", str(short)), "shorter than one window")
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"body": "text here"}) + "\n")
    assert_clean_failure(_static(fused_dir, out, "--calibration", str(nocol)), "no column 'text'")
    assert not out.exists()
    no_partial(tmp_path)


def test_unknown_mode_and_method(fused_dir, tmp_path):
    proc = run_cli("quantize", "--mode", "int3", "--input", str(fused_dir), "--out", str(tmp_path / "q"))
    assert_clean_failure(proc, "--mode")
    assert_clean_failure(_static(fused_dir, tmp_path / "q", "-S", "int8_static.method=KL"),
                         "int8_static.method = 'KL'", "'MinMax', 'Entropy' or 'Percentile'")
    assert not (tmp_path / "q").exists()


def test_wrong_stage_and_tampered_input(checkpoint_dir, fused_dir, tmp_path):
    proc = run_cli("quantize", "--mode", "dynamic", "--input", str(checkpoint_dir), "--out", str(tmp_path / "q"))
    assert_clean_failure(proc, "is a 'checkpoint' artifact")
    proc = run_cli("fuse", "--input", str(fused_dir), "--out", str(tmp_path / "f"))
    assert_clean_failure(proc, "is a 'fused' artifact", "export")
    bad = tmp_path / "fused"
    shutil.copytree(fused_dir, bad)
    data = bytearray((bad / "model.onnx_data").read_bytes())
    data[100] ^= 0xFF
    (bad / "model.onnx_data").write_bytes(bytes(data))
    proc = run_cli("quantize", "--mode", "int4", "--input", str(bad), "--out", str(tmp_path / "q"))
    assert_clean_failure(proc, "model.onnx_data", "sha256")
    assert not (tmp_path / "q").exists()
    no_partial(tmp_path)


def test_the_id_covers_the_calibration_text_not_its_path(fused_dir, data_dir, tmp_path):
    """One text at two paths is one artifact (DVC passes a relative path, a script an absolute one);
    the path is still recorded, outside the id. An edited text is another artifact."""
    text = (data_dir / "calibration.txt").read_text()
    here, there = tmp_path / "a" / "cal.txt", tmp_path / "b" / "other-name.txt"
    for p in (here, there):
        p.parent.mkdir()
        p.write_text(text)
    ids = {}
    for name, source, cwd in (("here", str(here), tmp_path), ("there", "other-name.txt", there.parent)):
        out = tmp_path / f"q-{name}"
        proc = run_cli("quantize", "--mode", "static", "--input", str(fused_dir), "--out", str(out), *SMALL,
                       "--no-eval", "--calibration", source, "--method", "MinMax", "--no-smoothquant",
                       "--params", str(REPO / "params.yaml"), cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        m = mf.read_manifest(out)
        assert m["quant_policy"]["calibration"]["source"] == source
        assert source not in json.dumps(m["params"])
        ids[name] = m["artifact_id"]
    assert ids["here"] == ids["there"]
    there.write_text(text.split("\n\n", 1)[1])  # the first paragraph gone: other windows
    out = tmp_path / "q-edited"
    proc = run_cli("quantize", "--mode", "static", "--input", str(fused_dir), "--out", str(out), *SMALL, "--no-eval",
                   "--calibration", str(there), "--method", "MinMax", "--no-smoothquant")
    assert proc.returncode == 0, proc.stderr
    assert mf.read_manifest(out)["artifact_id"] != ids["here"]
