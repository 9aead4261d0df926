"""Manifest ids and atomic publishing."""

import pytest

from pipeline.consumer import manifest as mf
from pipeline.errors import PipelineError
from pipeline.ops import store
from tests.conftest import no_partial


def _publish(out, content, params=None, parent=None):
    with store.staging_dir(out) as tmp:
        (tmp / "a.bin").write_bytes(content)
        manifest = mf.build_manifest(tmp, stage="test", params=params or {"x": 1}, source={"model": "m"},
                                     metrics={}, parent=parent)
        return store.publish(tmp, out, manifest)


def test_artifact_id_follows_content_params_and_parent(tmp_path):
    a = _publish(tmp_path / "a", b"1")
    assert _publish(tmp_path / "b", b"1")["artifact_id"] == a["artifact_id"]
    assert _publish(tmp_path / "c", b"2")["artifact_id"] != a["artifact_id"]
    assert _publish(tmp_path / "d", b"1", params={"x": 2})["artifact_id"] != a["artifact_id"]
    child = _publish(tmp_path / "e", b"1", parent=a)
    assert child["artifact_id"] != a["artifact_id"] and child["lineage"][0]["artifact_id"] == a["artifact_id"]
    mf.check_files(tmp_path / "e", mf.read_manifest(tmp_path / "e"))


def test_failed_stage_leaves_nothing_and_keeps_the_old_artifact(tmp_path):
    out = tmp_path / "art"
    first = _publish(out, b"old")
    with pytest.raises(RuntimeError):
        with store.staging_dir(out) as tmp:
            (tmp / "a.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    no_partial(tmp_path)
    assert mf.read_manifest(out)["artifact_id"] == first["artifact_id"]
    _publish(out, b"new")
    no_partial(tmp_path)
    assert (out / "a.bin").read_bytes() == b"new"


def test_tampering_is_detected(tmp_path):
    out = tmp_path / "art"
    _publish(out, b"content")
    (out / "a.bin").write_bytes(b"cOntent")
    with pytest.raises(PipelineError, match="sha256"):
        mf.check_files(out, mf.read_manifest(out))
