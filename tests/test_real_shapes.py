"""Real Qwen3 shapes, offline: random weights in the published configs, and an export past protobuf's
2 GB with the tied table stored once."""

import json

import onnx
import pytest

from pipeline.checkpoints.shapes import QWEN3_SHAPES, QWEN3_VOCAB, parse_random
from pipeline.consumer import manifest as mf
from pipeline.consumer.verify import verify
from pipeline.graph.tied import find_tied
from tests.conftest import assert_clean_failure, run_cli


def test_random_sources_parse_and_refuse_cleanly(data_dir, tmp_path):
    assert parse_random("random:qwen3-4b?layers=9") == ("qwen3-4b", {"num_hidden_layers": 9})
    assert parse_random("random:qwen3-0.6b") == ("qwen3-0.6b", {})
    for bad, needle in (("random:qwen3-8b", "unknown shape"), ("random:qwen3-4b?layers=0", "?layers=N"),
                        ("random:qwen3-4b?heads=4", "?layers=N")):
        proc = run_cli("checkpoint", "--source", bad, "--data", str(data_dir), "--out", str(tmp_path / "ck"))
        assert_clean_failure(proc, needle)
    assert not (tmp_path / "ck").exists()


# Published parameter counts (each model card's), to check each shape against something it was not made from.
PUBLISHED_PARAMS = {"qwen3-0.6b": 0.596e9, "qwen3-4b": 4.02e9, "qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9,
                    "qwen2.5-7b": 7.62e9, "llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9, "mistral-7b": 7.25e9,
                    "phi-3-mini-4k": 3.82e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_each_familys_published_shape_has_its_published_size(name):
    """The shape, built by transformers' own class on the meta device (no memory), has the model card's
    parameter count within 1 %."""
    import torch
    import transformers

    from pipeline import families

    family, shape = families.shape(name)
    config_class, model_class = (getattr(transformers, c) for c in family.classes)
    with torch.device("meta"):
        model = model_class(config_class(**shape))
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / PUBLISHED_PARAMS[name] - 1) < 0.01, (name, params)
    assert parse_random(f"random:{name}?layers=2") == (name, {"num_hidden_layers": 2})


@pytest.mark.slow
def test_tied_export_past_2_gb_stores_the_table_once(data_dir, tmp_path):
    """Two layers at Qwen3-4B's width with the real vocab: 2.37 GB of FP32 weights, tied."""
    ck, ex = tmp_path / "ck", tmp_path / "ex"
    quick = ["-S", "eval.max_windows=2", "-S", "export.greedy_tokens=8"]
    run_cli("checkpoint", "--source", "random:qwen3-4b?layers=2", "--data", str(data_dir), "--out", str(ck),
            *quick, check=True)
    cfg = json.loads((ck / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]) == (
        QWEN3_SHAPES["qwen3-4b"]["hidden_size"], QWEN3_VOCAB, 2) and cfg["tie_word_embeddings"]
    weights = sum(p.stat().st_size for p in ck.glob("*.safetensors"))
    assert weights > 2 * 1024**3
    m = mf.read_manifest(ck)
    assert m["metrics"]["random_weights"] is True
    proc = run_cli("export", "--checkpoint", str(ck), "--out", str(ex), "--data", str(data_dir), *quick, check=True)
    assert "greedy prefix match 100%" in proc.stderr
    exported = sum(p.stat().st_size for p in ex.glob("model.onnx*"))
    assert exported <= 1.01 * weights, (exported, weights)
    model = onnx.load(str(ex / "model.onnx"), load_external_data=False)
    tables = [t.name for t in model.graph.initializer if sorted(t.dims) == sorted([QWEN3_VOCAB, cfg["hidden_size"]])]
    assert len(tables) == 1, tables
    e = mf.read_manifest(ex)
    parity = e["metrics"]["parity_vs_parent"]
    assert parity["max_abs_logit_delta"] < 1e-3 and parity["greedy_match"]
    gather, head, table = find_tied(model)  # the lm_head reads Transpose(table): the one stored table
    assert table == tables[0] and e["metrics"]["folded_nodes"]["Transpose"] == 2 * 7
    verify(ex)
