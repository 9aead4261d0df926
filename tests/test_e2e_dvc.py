"""End to end with real DVC: `dvc repro` on a fresh copy of this project (small training budget), a
no-op second run, a param change that re-runs only what it touches, then publishing to a DVC remote
and consuming from a second repo with `dvc import`, `dvc get` and `dvc artifacts get`."""

import json

import pytest

from pipeline.registry import ONNX as NAMES
from tests.conftest import assert_clean_failure, git, run_cli, sh

pytestmark = pytest.mark.slow


def test_repro_builds_every_artifact_and_the_second_run_is_a_noop(publisher):
    assert json.loads((publisher / "metrics" / "checkpoint.json").read_text())["heldout_ppl"] > 0
    for name in NAMES:
        assert (publisher / "artifacts" / name / "manifest.json").is_file()
        metrics = json.loads((publisher / "metrics" / f"{name}.json").read_text())
        assert metrics["budget"]["status"].startswith("pass"), metrics
        assert set(metrics["tasks"]) == {"pipeline_cloze"} and "task_acc_drop" in metrics, metrics
    assert (publisher / "reports" / "size_vs_drift.png").is_file()
    second = sh("dvc", "repro", cwd=publisher)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout.lower()
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=publisher).stdout)
    text = json.dumps(shown)
    assert all(f"metrics/{n}.json" in text for n in NAMES) and '"drift_pct"' in text
    assert run_cli("gate", cwd=publisher).returncode == 0
    assert all(f"metrics/build/{n}.json" in text for n in ("data", "checkpoint", *NAMES))  # the runs' own figures


def _tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _manifest_diff(before: dict, after: dict) -> dict:
    """The manifest fields that differ (what a failure names)."""
    def flat(d, p=""):
        if isinstance(d, dict):
            return {k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{p}.{k}").items()}
        if isinstance(d, list):
            return {k2: v2 for i, v in enumerate(d) for k2, v2 in flat(v, f"{p}[{i}]").items()}
        return {p: d}
    a, b = (flat(json.loads(x["manifest.json"])) for x in (before, after))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def test_outputs_are_single_link_files_onnx_loads_and_each_stage_reports_its_memory(publisher):
    """.dvc/config's cache.type (reflink, else copy): no output is a hard link or a symlink into the
    cache, which onnx and onnx-ir refuse as a "hard link attack" when a later stage loads it; and DVC's
    stage commands, run under the supervisor, record anonymous and file-backed peaks."""
    import onnx

    for name in ("data", "checkpoint", *NAMES):
        for f in (publisher / "artifacts" / name).rglob("*"):
            assert not f.is_symlink() and f.stat().st_nlink == 1, f
    onnx.load(str(publisher / "artifacts" / "fused" / "model.onnx"))  # with its external data
    for stage in ("checkpoint", "export", "int8-static"):
        sampled = json.loads((publisher / "metrics" / "build" / f"{stage}.json").read_text())["sampled_rss_mb"]
        assert sampled["anon"] > 0 and sampled["file"] > 0


def test_a_forced_rebuild_gives_the_same_bytes_and_the_same_lock(publisher):
    """Per-run figures live in metrics/build/, outside the artifacts and dvc.lock: `dvc repro -f` again
    rebuilds every artifact byte for byte."""
    before = {n: _tree(publisher / "artifacts" / n) for n in ("data", "checkpoint", *NAMES)}
    lock = (publisher / "dvc.lock").read_text()
    sh("dvc", "repro", "-f", cwd=publisher)
    for name, files in before.items():
        after = _tree(publisher / "artifacts" / name)
        assert after.keys() == files.keys(), name
        changed = [f for f in files if files[f] != after[f]]
        assert changed == [], (name, _manifest_diff(files, after) if "manifest.json" in changed else changed)
    assert (publisher / "dvc.lock").read_text() == lock


def _status_after_editing(publisher, module: str) -> dict:
    """`dvc status` with a comment appended to ``module`` (put back after; the project is then clean)."""
    path = publisher / module
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        return json.loads(sh("dvc", "status", "--json", cwd=publisher).stdout)
    finally:
        path.write_text(original)
        assert json.loads(sh("dvc", "status", "--json", cwd=publisher).stdout) == {}


def _changed(status: dict) -> set[str]:
    return {k for k, v in status.items() if any("changed deps" in c for c in v if isinstance(c, dict))}


def test_editing_a_module_reruns_every_stage_that_executes_it(publisher):
    status = _status_after_editing(publisher, "pipeline/graph/tied.py")
    assert {"fused", "int8-dynamic", "int8-static", "int4"} <= _changed(status), status


def test_editing_the_model_card_reruns_the_stages_that_write_cards_and_not_training(publisher):
    """The ONNX post-build (card, genai config, parity) is imported by the ONNX stages alone
    (pipeline/onnx_post.py), so an edit to the card leaves the data and checkpoint stages up to date."""
    status = _status_after_editing(publisher, "pipeline/card.py")
    assert set(NAMES) <= _changed(status), status
    assert not {"data", "checkpoint"} & set(status), status


def test_publish_and_consume_with_real_dvc(publisher, tmp_path):
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "shared", str(remote), cwd=publisher)
    git("add", "-A", cwd=publisher)
    git("commit", "-qm", "publish", cwd=publisher)
    sh("dvc", "push", cwd=publisher)
    # register a version in DVC's model registry (a GTO git tag, name@v0.0.1)
    sh("gto", "register", "qwen3-onnx-int8-dynamic", "--version", "v0.0.1", cwd=publisher)
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    git("init", "-q", cwd=consumer)
    sh("dvc", "init", "-q", cwd=consumer)
    sh("dvc", "import", str(publisher), "artifacts/int4", "-o", "int4", cwd=consumer)
    sh("dvc", "get", str(publisher), "artifacts/fp16", "-o", "fp16", cwd=consumer)
    sh("dvc", "artifacts", "get", str(publisher), "qwen3-onnx-int8-dynamic", "--rev", "v0.0.1", "-o", "int8",
       cwd=consumer)
    sh("dvc", "artifacts", "get", str(publisher), "qwen3-onnx-int8-dynamic", "-o", "int8-latest", cwd=consumer)
    assert (consumer / "int8-latest" / "manifest.json").read_bytes() == (consumer / "int8" / "manifest.json").read_bytes()
    ids = {n: json.loads((publisher / "artifacts" / n / "manifest.json").read_text())["artifact_id"]
           for n in ("int4", "fp16", "int8-dynamic")}
    for local, name in (("int4", "int4"), ("fp16", "fp16"), ("int8", "int8-dynamic")):
        proc = run_cli("verify", str(consumer / local), cwd=consumer, check=True)
        assert ids[name] in proc.stdout
    # pinned by the publisher's dvc.lock at the registered version (a git tag): what `dvc repro` built there
    proc = run_cli("verify", str(consumer / "int8"), "--lock", "dvc.lock@qwen3-onnx-int8-dynamic@v0.0.1",
                   cwd=publisher, check=True)
    assert "pinned by dvc.lock@" in proc.stdout
    proc = run_cli("generate", "--artifact", str(consumer / "int8"), "The for statement", "--max-new-tokens", "8",
                   cwd=consumer, check=True)
    assert proc.stdout.startswith("The for statement")
    assert (consumer / "int4.dvc").is_file()  # import is tracked: `dvc update` follows the publisher
    # a consumer's copy that was tampered with is refused
    onnx_data = consumer / "fp16" / "model.onnx_data"
    data = bytearray(onnx_data.read_bytes())
    data[-1] ^= 1
    onnx_data.unlink()  # a new file: the old one may be a read-only hard link into DVC's cache
    onnx_data.write_bytes(bytes(data))
    assert_clean_failure(run_cli("generate", "--artifact", str(consumer / "fp16"), "The", cwd=consumer), "sha256")


def test_a_param_change_reruns_exactly_what_it_touches(publisher):
    proc = sh("dvc", "exp", "run", "-S", "int4.block_size=64", cwd=publisher)
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"int4", "evaluate@int4", "report"}, proc.stdout
    m = json.loads((publisher / "artifacts" / "int4" / "manifest.json").read_text())
    assert m["params"]["block_size"] == 64
