"""Stage `data` and stage `checkpoint` on the built-in source, and a local text source via datasets."""

import json

import numpy as np
import pytest

from pipeline.consumer import manifest as mf
from pipeline.errors import PipelineError
from pipeline.text.sources import load_text_dataset, paragraphs, split_paragraphs
from tests.conftest import build, small_params


def test_splits_are_disjoint_and_deterministic(data_dir, params):
    texts = {s: (data_dir / f"{s}.txt").read_text() for s in ("train", "calibration", "eval")}
    paras = {s: set(t.strip("\n").split("\n\n")) for s, t in texts.items()}
    assert not paras["train"] & paras["eval"]
    assert not paras["train"] & paras["calibration"]
    assert not paras["calibration"] & paras["eval"]
    total = sum(len(t) for t in texts.values())
    assert texts["eval"] and 0.05 < len(texts["eval"]) / total < 0.2
    # same seed, same split; another seed, another split
    ps = paragraphs(load_text_dataset("builtin:pydoc"))
    a = split_paragraphs(ps, params.data.fractions, 0)
    assert a == split_paragraphs(ps, params.data.fractions, 0)
    assert a["eval"] != split_paragraphs(ps, params.data.fractions, 1)["eval"]
    manifest = mf.read_manifest(data_dir)
    mf.check_files(data_dir, manifest)
    assert manifest["stage"] == "data"


def test_local_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    ds = load_text_dataset(str(tmp_path / "a.txt"))
    assert paragraphs(ds) == ["first paragraph\nstill first", "second paragraph"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x y z"}) + "\n")
    assert paragraphs(load_text_dataset(str(tmp_path / "b.jsonl"), "body"), "body") == ["x y z"]
    with pytest.raises(PipelineError, match="no column 'text'"):
        load_text_dataset(str(tmp_path / "b.jsonl"))


def test_builtin_checkpoint_is_a_real_qwen3(checkpoint_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoint_dir)
    assert config.model_type == "qwen3" and config.architectures == ["Qwen3ForCausalLM"]
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.tie_word_embeddings
    files = {p.name for p in checkpoint_dir.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    from safetensors import safe_open

    with safe_open(str(checkpoint_dir / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert any("q_norm" in k for k in keys) and any("k_norm" in k for k in keys)  # QK-norm
    assert "lm_head.weight" not in keys  # tied
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    m = mf.read_manifest(checkpoint_dir)
    assert m["source"]["model"] == "builtin:qwen3-tiny" and m["config"]["model_type"] == "qwen3"
    metrics = m["metrics"]
    # even the tiny test budget must beat the unigram model on held-out text
    assert metrics["heldout_ppl"] < metrics["unigram_ppl"]
    # stored to 6 significant digits (pipeline.scoring.evaluate.rounded)
    assert metrics["ppl_ratio_vs_unigram"] == pytest.approx(metrics["heldout_ppl"] / metrics["unigram_ppl"], rel=1e-5)


def test_unigram_baseline_matches_definition():
    from stages.checkpoint import unigram_ppl

    train = np.array([0, 0, 1, 2])
    windows = np.array([[9, 9, 0, 1], [9, 9, 0, 0]])
    counts = np.array([2, 1, 1]) + 1.0
    p = counts / counts.sum()
    expected = np.exp(-np.mean(np.log([p[0], p[1], p[0], p[0]])))
    assert unigram_ppl(train, windows, 3) == pytest.approx(expected)


def test_local_checkpoint_directory_is_imported(checkpoint_dir, params, data_dir, tmp_path):
    m = build("checkpoint", small_params(f"model.source={checkpoint_dir}"), data_dir, tmp_path / "imported")
    assert m["source"]["kind"] == "local"
    # scored like the built-in model: same weights, same held-out text, same figure
    built = mf.read_manifest(checkpoint_dir)["metrics"]
    assert m["metrics"]["heldout_ppl"] == pytest.approx(built["heldout_ppl"], rel=1e-6)
    assert m["metrics"]["unigram_ppl"] == pytest.approx(built["unigram_ppl"], rel=1e-9)
    assert m["source"]["file_sha256"]["model.safetensors"] == mf.sha256_file(checkpoint_dir / "model.safetensors")
    assert (tmp_path / "imported" / "tokenizer.json").is_file()
