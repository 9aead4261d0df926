"""Bad input: one clear `error:` line, exit != 0, no traceback, no partial artifact directory."""

import json
import shutil

import pytest

from tests.conftest import assert_clean_failure, no_partial, run_cli


def _checkpoint(source, data_dir, out, **env):
    return run_cli("checkpoint", "--source", str(source), "--data", str(data_dir), "--out", str(out), env=env)


def test_missing_model_path(data_dir, tmp_path):
    proc = _checkpoint(tmp_path / "nope", data_dir, tmp_path / "ck")
    assert_clean_failure(proc, "no such checkpoint directory")
    assert not (tmp_path / "ck").exists()
    no_partial(tmp_path)


def test_hub_id_while_offline(data_dir, tmp_path):
    proc = _checkpoint("Qwen/Qwen3-4B-Instruct-2507", data_dir, tmp_path / "ck", HF_HUB_OFFLINE="1")
    assert_clean_failure(proc, "hugging face hub", "local directory")
    assert not (tmp_path / "ck").exists()
    no_partial(tmp_path)


def test_checkpoint_that_is_not_a_causal_lm(data_dir, tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    (src / "model.safetensors").write_bytes(b"")
    assert_clean_failure(_checkpoint(src, data_dir, tmp_path / "ck"), "not a causal LM")
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    assert_clean_failure(_checkpoint(src, data_dir, tmp_path / "ck"), "no tokenizer.json")
    no_partial(tmp_path)


def test_a_causal_lm_of_no_declared_family_is_refused_at_the_import(data_dir, checkpoint_dir, tmp_path):
    """transformers knows BioGPT; no pipeline/families/ file declares it, so no stage would know its graph."""
    from transformers import BioGptConfig, BioGptForCausalLM

    src = tmp_path / "biogpt"
    cfg = BioGptConfig(vocab_size=4096, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    BioGptForCausalLM(cfg).save_pretrained(src, safe_serialization=True)
    shutil.copy(checkpoint_dir / "tokenizer.json", src)
    ck = tmp_path / "ck"
    assert_clean_failure(_checkpoint(src, data_dir, ck), "model_type 'biogpt': unsupported", "qwen3", "llama")
    assert not ck.exists()
    no_partial(tmp_path)


def test_truncated_onnx_file(export_dir, data_dir, tmp_path):
    bad = tmp_path / "export"
    shutil.copytree(export_dir, bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 2])
    assert_clean_failure(run_cli("evaluate", "--artifact", str(bad), "--data", str(data_dir)), "truncated")
    assert_clean_failure(run_cli("fuse", "--input", str(bad), "--out", str(tmp_path / "f")), "model.onnx")
    assert not (tmp_path / "f").exists()
    no_partial(tmp_path)
    # without a manifest to compare with, the ONNX reader itself names the damage
    from pipeline.errors import PipelineError
    from pipeline.graph import onnx_io

    with pytest.raises(PipelineError, match="truncated or damaged"):
        onnx_io.load(bad)


def test_eval_text_shorter_than_two_windows(export_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    proc = run_cli("evaluate", "--artifact", str(export_dir), "--text", str(short), "--out", str(tmp_path / "m.json"))
    assert_clean_failure(proc, "shorter than two windows")
    assert not (tmp_path / "m.json").exists()


def test_unknown_builtin_and_bad_override(data_dir, tmp_path):
    assert_clean_failure(_checkpoint("builtin:nope", data_dir, tmp_path / "ck"), "unknown built-in model")
    assert_clean_failure(_checkpoint("builtin:gemma-tiny", data_dir, tmp_path / "ck"), "unknown built-in model",
                         "llama, mistral, phi3, qwen2, qwen3")
    proc = run_cli("data", "-S", "nonsense", "--out", str(tmp_path / "d"))
    assert_clean_failure(proc, "section.key=value")


def test_generate_streams_a_continuation(export_dir):
    proc = run_cli("generate", "--artifact", str(export_dir), "The for statement", "--max-new-tokens", "12",
                   check=True)
    assert proc.stdout.startswith("The for statement") and len(proc.stdout) > len("The for statement\n")
    assert "tokens from" in proc.stderr
