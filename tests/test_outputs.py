"""One model in memory at a time: a reference's outputs are recorded once beside it and reused by every
artifact checked against it, and the figures are those of running the two models side by side."""

import json
import shutil

import numpy as np
import pytest

from pipeline.consumer.runtime import Runtime
from pipeline.scoring.evaluate import log_softmax, make_windows
from tests.conftest import run_cli


def _side_by_side(candidate: Runtime, reference: Runtime, windows: np.ndarray) -> dict:
    """Drift, KLD, top-1 and RMS Δp the plain way, both sessions open (independent of pipeline/scoring/outputs.py
    and the metric table)."""
    first = windows.shape[1] // 2
    nll, rnll, kld, agree, dp = [], [], [], [], []
    for w in windows:
        lp = log_softmax(candidate.logits(w)[first - 1:-1])
        rlp = log_softmax(reference.logits(w)[first - 1:-1])
        t = w[first:]
        nll += list(-lp[np.arange(len(t)), t])
        rnll += list(-rlp[np.arange(len(t)), t])
        kld += list(np.maximum((np.exp(rlp) * (rlp - lp)).sum(-1), 0))
        agree += list(lp.argmax(-1) == rlp.argmax(-1))
        dp += [np.exp(lp[j, tok]) - np.exp(rlp[j, tok]) for j, tok in enumerate(t)]
    ppl, rppl = float(np.exp(np.mean(nll))), float(np.exp(np.mean(rnll)))
    return {"ppl": ppl, "drift_pct": (ppl - rppl) / rppl * 100, "kld_mean": float(np.mean(kld)),
            "top1_agreement": float(np.mean(agree)), "delta_p_rms": 100 * float(np.sqrt(np.mean(np.square(dp))))}


def test_reference_outputs_recorded_once_and_exact(export_dir, data_dir, tmp_path):
    shutil.copytree(export_dir, tmp_path / "export")
    eval_opts = ["--reference", str(tmp_path / "export"), "--data", str(data_dir), "-S", "eval.max_windows=6"]
    fused = run_cli("fuse", "--input", str(tmp_path / "export"), "--out", str(tmp_path / "fused"), *eval_opts,
                    check=True)
    assert "parent export: recording its outputs (prompts and windows)" in fused.stderr
    int4 = run_cli("quantize", "--mode", "int4", "--input", str(tmp_path / "fused"), "--out", str(tmp_path / "int4"),
                   *eval_opts, "--algorithm", "rtn", check=True)
    # the parent (fused) ran when it was built, the reference (export) when fused was: neither runs again
    assert "parent fused: outputs recorded earlier" in int4.stderr
    assert "reference export: outputs recorded earlier" in int4.stderr
    assert "recording its outputs" not in int4.stderr

    ids = {d: json.loads((tmp_path / d / "manifest.json").read_text())["artifact_id"] for d in ("export", "fused", "int4")}
    cache = tmp_path / ".outputs"
    # kept for the artifacts others are checked against, not for a leaf like int4
    assert sorted(p.name for p in cache.iterdir()) == sorted([ids["export"], ids["fused"]])

    recorded = json.loads((tmp_path / "int4" / "manifest.json").read_text())["metrics"]["eval"]
    cand, ref = Runtime(tmp_path / "int4"), Runtime(tmp_path / "export")
    windows = make_windows(cand.encode((data_dir / "eval.txt").read_text()), recorded["ctx"], 6)
    plain = _side_by_side(cand, ref, windows)
    for key, value in plain.items():
        # the manifest stores 6 significant digits (pipeline.scoring.evaluate.rounded)
        assert recorded[key] == pytest.approx(value, rel=1e-5, abs=1e-12), (key, recorded[key], value)

    # a rebuilt artifact's old entry goes when its new one is stored
    run_cli("fuse", "--input", str(tmp_path / "export"), "--out", str(tmp_path / "fused"), *eval_opts,
            "-S", "fused.greedy_tokens=16", check=True)
    new = json.loads((tmp_path / "fused" / "manifest.json").read_text())["artifact_id"]
    assert sorted(p.name for p in cache.iterdir()) == sorted([ids["export"], new])


def test_windows_of_one_stream_cut_two_ways_have_two_keys():
    """80 windows of 128 and 20 of 512 from one token stream are the same bytes; a reference recorded
    for one must never be read back for the other (it scored other positions)."""
    from pipeline.scoring.outputs import windows_key

    stream = np.arange(10240, dtype=np.int64) % 4000
    assert windows_key(stream.reshape(80, 128)) != windows_key(stream.reshape(20, 512))
    assert windows_key(stream.reshape(20, 512)) == windows_key(stream.reshape(20, 512).copy())
