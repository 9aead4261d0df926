"""Long context: chunked prefill, logits only where used, long-context scoring, YaRN, the memory refusal.

On ``random:qwen3-micro`` (2 layers, the built-in tokenizer's vocab) with a 16k context and YaRN by 4
over a 4k original window, so positions past the original window are cheap enough for the suite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_clean_failure, run_cli

SOURCE = "random:qwen3-micro?context=16384&yarn=4"
PARAMS = ("--params", str(REPO / "params.yaml"))


@pytest.fixture(scope="module")
def micro(tmp_path_factory, data_dir):
    """checkpoint -> export -> fused of the micro model, through the CLI (each scored against its parent)."""
    root = tmp_path_factory.mktemp("long")
    run_cli("checkpoint", *PARAMS, "--source", SOURCE, "--data", str(data_dir), "--out", str(root / "checkpoint"),
            cwd=root, check=True)
    run_cli("export", *PARAMS, "--checkpoint", str(root / "checkpoint"), "--out", str(root / "export"),
            "--data", str(data_dir), cwd=root, check=True)
    run_cli("fuse", *PARAMS, "--input", str(root / "export"), "--out", str(root / "fused"),
            "--reference", str(root / "export"), "--data", str(data_dir), cwd=root, check=True)
    return root


def ids_of(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * 7919 + 11) % 4000


def test_yarn_rotary_caches_match_pytorch_past_the_original_window(micro):
    from pipeline.consumer.runtime import Runtime
    from pipeline.scoring.torch_ref import TorchModel

    config = json.loads((micro / "fused" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["original_max_position_embeddings"] == 4096
    ids = ids_of(12000)  # scored positions 11744..11999: three times the original window
    torch_ = TorchModel(micro / "checkpoint").logits(ids, last=256)
    fused = Runtime(micro / "fused").logits(ids, last=256)
    export = Runtime(micro / "export").logits(ids, last=256)
    assert np.abs(fused - torch_).max() < 1e-4
    assert np.abs(export - torch_).max() < 1e-4
    # the same weights without YaRN give other logits there: the check can tell the two apart
    plain = micro / "plain"
    plain.mkdir(exist_ok=True)
    for f in (micro / "checkpoint").iterdir():
        if f.is_file():
            (plain / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("rope_scaling")
    (plain / "config.json").write_text(json.dumps(cfg))
    assert np.abs(TorchModel(plain).logits(ids, last=256) - fused).max() > 1e-2


def test_unsupported_rope_scaling_is_refused_in_one_line():
    from pipeline.errors import PipelineError
    from pipeline.graph.fusions import rotary_caches

    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "hidden_size": 128,
           "rope_theta": 1e6, "max_position_embeddings": 8192, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(PipelineError, match="rope_scaling type 'dynamic' is not supported .*fused.attention: none"):
        rotary_caches(cfg, 16)


def test_chunked_prefill_gives_the_tokens_and_logits_of_one_pass(micro):
    from pipeline.consumer.runtime import Runtime

    for name in ("fused", "export"):
        whole = Runtime(micro / name, prefill_chunk=16384)
        chunked = Runtime(micro / name, prefill_chunk=300)
        ids = ids_of(5000)
        assert np.abs(whole.logits(ids) - chunked.logits(ids)).max() < 1e-5, name
        assert np.abs(whole.logits(ids, last=7) - whole.logits(ids)[-7:]).max() < 1e-5, name
        prompts = [list(ids[:2100]), list(ids[:700]), list(ids[:5])]  # a ragged batch, rows of several chunks
        alone = [whole.generate(p, 12, stop_at_eos=False) for p in prompts]
        assert chunked.generate_batch(prompts, 12, stop_at_eos=False) == alone, name
        assert [chunked.generate(p, 12, stop_at_eos=False) for p in prompts] == alone, name


def test_logits_to_keep_is_optional_and_every_derived_artifact_has_it(micro, derived):
    """The fused stage's input: absent from the required inputs (optimum and genai feed what they did),
    every position's logits by default, the last N when fed; inherited by every artifact built on it."""
    import onnxruntime as ort

    from pipeline.consumer.runtime import LOGITS_TO_KEEP, Runtime

    dirs = [micro / "fused"] + [derived(n) for n in ("fp16", "int8-dynamic", "int8-static", "int4")]
    for d in dirs:
        rt = Runtime(d)
        assert rt.io.selects_logits, d.name
        assert LOGITS_TO_KEEP not in {i.name for i in rt.session.get_inputs()}, d.name
        ids = ids_of(40) % int(rt.config["vocab_size"])
        feeds = rt.io.feeds(ids, keep=0)
        feeds.pop(LOGITS_TO_KEEP)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        plain = ort.InferenceSession(str(d / "model.onnx"), so).run(["logits"], feeds)[0]  # as a consumer runs it
        assert plain.shape[1] == 40, d.name
        last, _ = rt.forward(ids, keep=1)
        assert last.shape[1] == 1 and np.abs(last[0, 0] - plain[0, -1]).max() < 1e-2, d.name
    assert not Runtime(micro / "export").io.selects_logits


def test_long_context_evaluation_scores_the_last_tokens_of_each_window(micro, data_dir):
    """eval.ctx 8192 with the last 256 tokens scored (the train split: 2 windows of that length; the
    weights are random, so held-out text buys nothing)."""
    proc = run_cli("evaluate", *PARAMS, "--artifact", str(micro / "fused"), "--reference", str(micro / "export"),
                   "--text", str(data_dir / "train.txt"), "-S", "eval.ctx=8192", "-S", "eval.score_last=256",
                   "-S", "eval.max_windows=2", "--name", "micro-fused", "--out", str(micro / "long.json"), cwd=micro)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((micro / "long.json").read_text())
    assert (m["ctx"], m["windows"], m["tokens_scored"]) == (8192, 2, 512)
    assert m["kld_mean"] < 1e-6 and m["top1_agreement"] > 0.999 and abs(m["drift_pct"]) < 0.01
    bad = run_cli("evaluate", *PARAMS, "--artifact", str(micro / "fused"), "-S", "eval.ctx=64",
                  "-S", "eval.score_last=64", "--text", str(data_dir / "train.txt"), cwd=micro)
    assert_clean_failure(bad, "score_last", "less than ctx")


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/meminfo")


def test_a_request_that_cannot_fit_is_refused_before_it_runs(micro):
    """As many rows of 16k positions as take twice this machine's free memory in KV cache alone."""
    per_row = 16384 * 2 * 2 * 2 * 64 * 4  # positions x (key, value) x layers x kv_heads x head_dim x float32
    rows = 2 * _mem_available() // per_row + 1
    prompts = ["x"] * rows
    proc = run_cli("generate", "--artifact", str(micro / "fused"), "--max-new-tokens", "16000", *prompts, cwd=micro)
    line = assert_clean_failure(proc, f"{rows} x", "KV cache", "float32", "available")
    assert "GiB" in line and proc.stdout == ""


def test_int8_kv_cache_runs_on_cpu_chunked_and_stays_close_at_long_context(micro, data_dir):
    """int4.kv_cache int8: ORT's quantized GroupQueryAttention cache (CPU kernels of this ORT), scales
    from the imatrix; against the same int4 with a float32 cache over 6k positions."""
    import onnx

    from pipeline.consumer.runtime import Runtime
    from pipeline.scoring.outputs import log_softmax

    common = ("--input", str(micro / "fused"), "--imatrix", str(micro / "imatrix"), "--reference", str(micro / "export"),
              "--data", str(data_dir))
    run_cli("imatrix", *PARAMS, "--input", str(micro / "fused"), "--out", str(micro / "imatrix"),
            "-S", f"imatrix.calibration.source={data_dir / 'calibration.txt'}", cwd=micro, check=True)
    run_cli("quantize", *PARAMS, "--mode", "int4", *common, "--out", str(micro / "int4"), cwd=micro, check=True)
    run_cli("quantize", *PARAMS, "--mode", "int4", *common, "--out", str(micro / "int4-kv8"), "-S", "int4.kv_cache=int8",
            cwd=micro, check=True)
    graph = onnx.load(str(micro / "int4-kv8" / "model.onnx"), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith("past_key_values")]
    assert past and all(i.type.tensor_type.elem_type == onnx.TensorProto.INT8 for i in past)
    manifest = json.loads((micro / "int4-kv8" / "manifest.json").read_text())
    assert manifest["kv_dtype"] == "int8" and "int8" in manifest["quant_policy"]["kv_cache"]
    ids = ids_of(6000)
    f32, i8 = Runtime(micro / "int4"), Runtime(micro / "int4-kv8", prefill_chunk=700)
    assert i8.io.kv.dtype == np.int8
    a, b = log_softmax(f32.logits(ids, last=512)), log_softmax(i8.logits(ids, last=512))
    kld = float((np.exp(a) * (a - b)).sum(-1).mean())
    assert 0 < kld < 1e-3, kld  # not identical (the cache is int8), and close
    assert i8.generate_batch([list(ids[:1500]), list(ids[:40])], 8, stop_at_eos=False) == [
        i8.generate(list(ids[:1500]), 8, stop_at_eos=False), i8.generate(list(ids[:40]), 8, stop_at_eos=False)]
