"""What comes from outside, tried as an attacker would: a checkpoint's links, special files in an
artifact, paths in its configs and subgraphs, a tampered outputs cache, chat templates that never end,
calibration text with endless lines, signatures; then a property-based fuzz of every parser an outsider
can feed (docs/reliability.md's table names each row's test)."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.consumer import manifest as mf
from pipeline.errors import PipelineError
from tests.conftest import REPO, assert_clean_failure, run_cli
from tests.test_verify import rehash


# ------------------------------------------------------------------------------------------- reads stay inside
def _checkpoint_copy(checkpoint_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in checkpoint_dir.iterdir():
        if f.name != "manifest.json":
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.mark.parametrize("how", ["symlink outside", "fifo"])
def test_a_checkpoint_import_reads_nothing_outside_the_checkpoint(checkpoint_dir, data_dir, tmp_path, how):
    src = _checkpoint_copy(checkpoint_dir, tmp_path / "ckpt")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any model")
    if how == "fifo":
        os.mkfifo(src / "notes.txt")
        needles = ("notes.txt", "is a FIFO")
    else:
        (src / "notes.txt").symlink_to(secret)
        needles = ("notes.txt", "outside the checkpoint directory")
    out = tmp_path / "out"
    proc = run_cli("checkpoint", "--data", str(data_dir), "--out", str(out), "-S", f"model.source={src}")
    assert_clean_failure(proc, *needles)
    assert not out.exists()
    # a link that stays inside the checkpoint is an ordinary file of it
    (src / "notes.txt").unlink()
    (src / "notes.txt").symlink_to(src / "config.json")
    from pipeline.checkpoints.importer import _inside

    assert [p.name for p in _inside(src, src, ("*.txt",))] == ["config.json"]


def test_verify_refuses_special_files_without_opening_them(copy):
    art = copy()
    os.mkfifo(art / "extra.json")
    start = time.monotonic()
    proc = run_cli("verify", str(art))
    assert_clean_failure(proc, "extra.json", "FIFO")
    assert time.monotonic() - start < 60  # opening the FIFO would block for ever


def test_verify_checks_the_paths_in_every_config_the_artifact_ships(copy, tmp_path):
    art = copy()
    cfg = json.loads((art / "genai_config.json").read_text())
    cfg["model"]["decoder"]["filename"] = "/etc/hostname"
    (art / "genai_config.json").write_text(json.dumps(cfg))
    rehash(art)  # a hostile publisher makes the manifest match
    assert_clean_failure(run_cli("verify", str(art)), "genai_config.json", "filename", "outside the artifact")
    cfg["model"]["decoder"]["filename"] = "model.onnx"
    (art / "genai_config.json").write_text(json.dumps(cfg))
    tok = json.loads((art / "tokenizer_config.json").read_text())
    tok["tokenizer_file"] = "../../../etc/passwd"
    (art / "tokenizer_config.json").write_text(json.dumps(tok))
    rehash(art)
    assert_clean_failure(run_cli("verify", str(art)), "tokenizer_config.json", "tokenizer_file", "outside the artifact")


def test_verify_checks_external_data_inside_subgraphs(copy, tmp_path):
    """An If branch's initializer naming a file outside: onnxruntime would follow it."""
    from onnx import TensorProto, helper

    art = copy()
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    secret = helper.make_tensor("secret", TensorProto.FLOAT, [4], [0.0] * 4)
    secret.data_location = TensorProto.EXTERNAL
    secret.ClearField("float_data")
    for key, value in (("location", "../../outside.bin"), ("offset", "0"), ("length", "16")):
        secret.external_data.add(key=key, value=value)
    branch = helper.make_graph([helper.make_node("Identity", ["secret"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])], initializer=[secret])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    model.graph.initializer.append(cond)
    model.graph.node.append(helper.make_node("If", ["cond"], ["never_used"], then_branch=branch, else_branch=branch))
    onnx.save_model(model, str(art / "model.onnx"))
    rehash(art)
    assert_clean_failure(run_cli("verify", str(art)), "external data", "../../outside.bin", "outside the artifact")


# ----------------------------------------------------------------------------------------- caches are checked
def test_a_tampered_outputs_cache_is_recorded_again_not_reported(derived, export_dir, data_dir, params, tmp_path):
    """evaluate reuses the reference's recorded logits (.outputs/<id>/): zeroed, they would give a
    perplexity the model never had."""
    from pipeline.scoring.evaluate import evaluate_artifact
    from pipeline.scoring.outputs import cache_dir

    # a cache of this test's own: the shared one holds other tests' entries, which this one does not use
    export_dir = Path(shutil.copytree(export_dir, tmp_path / "export"))
    text = (data_dir / "eval.txt").read_text()
    first = evaluate_artifact(derived("int4"), text, params, export_dir, "int4", rescore=True)
    entry = cache_dir(export_dir) / mf.read_manifest(export_dir)["artifact_id"]
    windows = sorted(entry.glob("windows-*/window_*.npy"))
    assert windows, "the reference's outputs were not cached"
    for w in windows:
        np.save(w, np.zeros_like(np.load(w)))
    again = evaluate_artifact(derived("int4"), text, params, export_dir, "int4", rescore=True)
    assert again == first
    assert all(np.load(w).any() for w in sorted(entry.glob("windows-*/window_*.npy")))


def test_a_malformed_sibling_does_not_break_evaluating_a_valid_artifact(derived, export_dir, data_dir, params,
                                                                         tmp_path):
    from pipeline.scoring.evaluate import evaluate_artifact

    shutil.copytree(derived("int4"), tmp_path / "int4")
    shutil.copytree(export_dir, tmp_path / "export")
    for name, text in (("junk", '{"artifact_id": 5, "files": "x"}'), ("list", "[1, 2]"), ("deep", "[" * 100000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
    text = (data_dir / "eval.txt").read_text()
    m = evaluate_artifact(tmp_path / "int4", text, params, tmp_path / "export", "int4", rescore=True)
    assert m["budget"]["status"].startswith("pass"), m


# ----------------------------------------------------------------------------------- bounded computation
@pytest.fixture
def template_dir(derived, tmp_path):
    dst = tmp_path / "tpl"
    dst.mkdir()
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(derived("fp16") / name, dst / name)
    return dst


@pytest.mark.parametrize("template,needle", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "ran past"),
    ("{{ '%999999999d' % 1 }}", "MiB"),
    ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "recurses"),
    ("{% for a in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "characters"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
])
def test_a_chat_template_runs_in_bounded_time_memory_and_output(template_dir, template, needle):
    from pipeline.consumer import chat

    (template_dir / "chat_template.jinja").write_text(template)
    start = time.monotonic()
    with pytest.raises(PipelineError, match=needle) as err:
        chat.render(template_dir, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value)
    assert time.monotonic() - start < chat.LIMITS["seconds"] + 10


def test_calibration_text_is_read_in_bounded_pieces_and_a_short_source_says_so(export_dir, tmp_path, capfd):
    from pipeline.text.reader import PIECE_CHARS, calibration_windows

    one_line = tmp_path / "one_line.txt"
    one_line.write_text("the quick brown fox " * (8 * PIECE_CHARS // 20))  # one paragraph, 8 pieces
    windows = calibration_windows(str(one_line), "text", export_dir / "tokenizer.json", 10**8, 64)
    assert windows.shape[1] == 64 and 0 < len(windows) < 10**8
    assert f"asked for {10**8} windows" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------ signatures
def _keypair(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_a_signed_artifact_verifies_and_a_re_signed_tampered_one_does_not(copy, tmp_path):
    art = copy()
    key, pub = _keypair(tmp_path, "publisher")
    attacker, _ = _keypair(tmp_path, "attacker")
    artifact_id = mf.read_manifest(art)["artifact_id"]
    assert_clean_failure(run_cli("verify", str(art), "--key", str(pub)), "not signed")
    run_cli("sign", str(art), "--key", str(key), check=True)
    assert (art / "model.sig").is_file()
    proc = run_cli("verify", str(art), "--key", str(pub), "--expect-id", artifact_id, check=True)
    assert "integrity, pinned id, signed" in proc.stdout
    run_cli("verify", str(art), check=True)  # the signature is no unknown file to a reader without a key
    assert_clean_failure(run_cli("verify", str(art), "--expect-id", "0123456789abcdef"), "not the expected")
    assert_clean_failure(run_cli("sign", str(art), "--key", str(pub)), "cannot sign", "private key")

    # an attacker changes a file, recomputes the manifest and signs with their own key
    cfg = json.loads((art / "generation_config.json").read_text())
    cfg["temperature"] = 9.0
    (art / "generation_config.json").write_text(json.dumps(cfg))
    rehash(art)
    run_cli("verify", str(art), check=True)  # integrity alone cannot tell
    run_cli("sign", str(art), "--key", str(attacker), check=True)
    assert_clean_failure(run_cli("verify", str(art), "--key", str(pub)), "does not verify", "refused")
    assert_clean_failure(run_cli("verify", str(art), "--expect-id", artifact_id), "not the expected")
    # a signature that is not one
    (art / "model.sig").write_text('{"a":' * 5000)
    assert_clean_failure(run_cli("verify", str(art), "--key", str(pub)), "signature", "nests deeper")


# ------------------------------------------------------------------------------------ fuzz: every parser
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                         max_size=4),
                           max_leaves=20)
# keys and values a reader looks for, so that generated documents reach past the first check
MANIFEST_KEYS = st.sampled_from(list(mf.REQUIRED_KEYS) + ["path", "size", "sha256", "artifact"])
near_manifest = st.fixed_dictionaries({}, optional={k: json_values for k in mf.REQUIRED_KEYS}) | st.dictionaries(
    MANIFEST_KEYS, json_values, max_size=8)
raw_bytes = st.binary(max_size=200)


def _one_line_or_success(call):
    """The contract of every reader of outside input: it succeeds or raises PipelineError with one line."""
    try:
        return call()
    except PipelineError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        return None


def _as_file(path: Path, doc) -> Path:
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(json.dumps(doc))
    return path


@FUZZ
@given(doc=near_manifest | json_values | raw_bytes)
def test_fuzz_manifest(tmp_path, doc):
    art = tmp_path / "a"
    shutil.rmtree(art, ignore_errors=True)
    art.mkdir()
    _as_file(art / "manifest.json", doc)
    (art / "model.onnx").write_bytes(b"x")
    from pipeline.consumer.verify import verify

    _one_line_or_success(lambda: verify(art, load=False))


@FUZZ
@given(doc=st.text(max_size=300) | raw_bytes | json_values.map(json.dumps))
def test_fuzz_params_file(tmp_path, doc):
    from pipeline.params import load_params

    path = tmp_path / "params.yaml"
    path.write_bytes(doc if isinstance(doc, bytes) else doc.encode())
    _one_line_or_success(lambda: load_params(path, stages=()))


@FUZZ
@given(key=st.text(max_size=30), value=st.text(max_size=30))
def test_fuzz_params_overrides(key, value):
    from pipeline.params import load_params

    _one_line_or_success(lambda: load_params(REPO / "params.yaml", [f"{key}={value}"], stages=()))


@FUZZ
@given(docs=st.lists(st.dictionaries(st.sampled_from(["artifact", "ppl", "drift_pct", "kld_mean", "top1_agreement",
                                                      "size_bytes", "budget", "random_weights"]), json_values,
                                     max_size=6) | json_values | raw_bytes, min_size=1, max_size=3),
       budget=st.dictionaries(st.sampled_from(["max_ppl", "max_drift_pct", "min_top1_agreement", "report_only",
                                               "max_kld_mean", "bogus"]), json_values, max_size=3))
def test_fuzz_metrics_budgets_and_baselines(tmp_path, docs, budget):
    from pipeline import gate
    from pipeline.params import load_params

    metrics_dir = tmp_path / "m"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    for i, doc in enumerate(docs):
        _as_file(metrics_dir / f"{i}.json", doc)

    def judge():
        params = load_params(REPO / "params.yaml", values={"budgets.int4": budget}, stages=())
        metrics = gate.load_metrics(metrics_dir)
        rows = gate.judge(metrics, params, baseline=gate.baseline_from_file(metrics_dir))
        gate.markdown(rows)
    _one_line_or_success(judge)


@FUZZ
@given(doc=json_values | st.dictionaries(st.sampled_from(["model", "decoder", "filename", "tokenizer_file", "x"]),
                                         json_values, max_size=4) | raw_bytes)
def test_fuzz_genai_config(tmp_path, doc):
    from pipeline.consumer.verify import check_config_paths

    art = tmp_path / "g"
    shutil.rmtree(art, ignore_errors=True)
    art.mkdir()
    _as_file(art / "genai_config.json", doc)
    _one_line_or_success(lambda: check_config_paths(art))


JINJA = st.lists(st.sampled_from(["{{ ", " }}", "{% ", " %}", "for m in messages", "endfor", "if ", "endif",
                                  "m.content", "m['role']", "|tojson", "|length", "range(", ")", "raise_exception('x')",
                                  "loop.index", "'a'", " * ", "9", "set x = ", "x", "messages[0]", "bos_token",
                                  "macro f()", "endmacro", "f()", "{#", "#}", "text "]), max_size=14).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=JINJA)
def test_fuzz_chat_templates(template_dir, template):
    from pipeline.consumer import chat

    (template_dir / "chat_template.jinja").write_text(template)
    start = time.monotonic()
    _one_line_or_success(lambda: chat.render(template_dir, [{"role": "user", "content": "hi"}]))
    assert time.monotonic() - start < chat.LIMITS["seconds"] + 10


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".txt", ".jsonl", ".json", ".csv"]),
       body=st.text(max_size=400) | st.lists(json_values.map(json.dumps), max_size=5).map("\n".join) | raw_bytes)
def test_fuzz_calibration_readers(export_dir, tmp_path, suffix, body):
    from pipeline.text.reader import calibration_windows

    src = tmp_path / f"cal{suffix}"
    src.write_bytes(body if isinstance(body, bytes) else body.encode())
    _one_line_or_success(lambda: calibration_windows(str(src), "text", export_dir / "tokenizer.json", 4, 8))


LOCK_OUTS = st.lists(st.fixed_dictionaries({}, optional={"path": st.sampled_from(["builds/int4", "int4", "x/", 3]) | json_values,
                                                           "md5": st.text(max_size=12) | json_values}) | json_values,
                     max_size=3)
near_lock = st.fixed_dictionaries({}, optional={"stages": st.dictionaries(
    st.text(max_size=8), st.fixed_dictionaries({}, optional={"outs": LOCK_OUTS}) | json_values, max_size=3) | json_values})


@FUZZ
@given(doc=near_lock | json_values | st.text(max_size=200) | raw_bytes)
def test_fuzz_dvc_lock(tmp_path, doc):
    """`pipeline verify --lock FILE`: a publisher's dvc.lock, as YAML text or undecodable bytes."""
    import yaml

    from pipeline import project

    lock = tmp_path / "dvc.lock"
    if isinstance(doc, bytes):
        lock.write_bytes(doc)
    else:
        lock.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))

    def read():
        text, where = project.read_at(str(lock))
        md5, path = project.locked_hash(text, where, "int4")
        assert isinstance(md5, str) and str(path).rstrip("/").split("/")[-1] == "int4"

    _one_line_or_success(read)


def test_the_fuzz_suite_reaches_every_reader_of_outside_input():
    """A new reader of outside input gets its fuzz test: the modules that read through
    pipeline/consumer/untrusted.py are the ones fuzzed here."""
    readers = subprocess.run(["grep", "-rl", "untrusted\\.", "pipeline"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    fuzzed = {"pipeline/consumer/manifest.py", "pipeline/consumer/verify.py", "pipeline/params.py", "pipeline/gate.py",
              "pipeline/consumer/chat.py", "pipeline/checkpoints/importer.py", "pipeline/scoring/outputs.py",
              "pipeline/consumer/signing.py", "pipeline/consumer/untrusted.py", "pipeline/project.py"}
    assert set(readers) <= fuzzed, set(readers) - fuzzed


def test_a_lock_pins_an_artifacts_files_a_rehashed_manifest_does_not_pass(copy, tmp_path):
    """`pipeline verify --lock dvc.lock`: the directory's files against the md5 a dvc.lock pins for its
    stage's output (here written with dvc_data's own directory hashing, as `dvc repro` records it; the
    end-to-end test reads a real one at a git tag). A file changed and the manifest rehashed passes the
    integrity check and fails the lock."""
    import yaml
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    art = copy("int4")
    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(tmp_path / "odb")), str(art), fs, "md5", dry_run=True)
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"int4": {
        "cmd": "pipeline quantize --mode int4", "outs": [{"path": "artifacts/int4", "md5": obj.hash_info.value}]}}}))
    proc = run_cli("verify", str(art), "--lock", str(lock))
    assert proc.returncode == 0 and f"pinned by {lock}" in proc.stdout, proc.stderr
    (art / "genai_config.json").write_text((art / "genai_config.json").read_text().replace('"top_k": 1', '"top_k": 50'))
    rehash(art)
    assert run_cli("verify", str(art)).returncode == 0  # integrity alone: a consistent (re-signed) artifact
    assert_clean_failure(run_cli("verify", str(art), "--lock", str(lock)), "not what", "pins for artifacts/int4")
    assert_clean_failure(run_cli("verify", str(art), "--lock", f"{lock}@no-such-rev"), "git has no")
    lock.write_text("stages: {export: {outs: [{path: artifacts/export, md5: abc.dir}]}}")
    assert_clean_failure(run_cli("verify", str(art), "--lock", str(lock)), "pins no output named 'int4'")
