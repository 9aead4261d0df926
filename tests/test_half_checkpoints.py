"""Checkpoints as the hub ships them (bf16, fp16): stored and scored in their own dtype, exported to
FP32 with parity. Semantics (docs/real-shapes.md): the checkpoint's weights computed in float32, which
is what the FP32 export computes; every bf16 / fp16 value is exactly a float32 value."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, assert_clean_failure, run_cli
from safetensors import safe_open

PARAMS = ("--params", str(REPO / "params.yaml"))


@pytest.fixture(scope="module")
def bf16(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("bf16")
    run_cli("checkpoint", *PARAMS, "--source", "random:qwen3-micro?dtype=bfloat16", "--data", str(data_dir),
            "--out", str(root / "checkpoint"), cwd=root, check=True)
    run_cli("export", *PARAMS, "--checkpoint", str(root / "checkpoint"), "--out", str(root / "export"),
            "--data", str(data_dir), cwd=root, check=True)
    return root


def test_a_bf16_checkpoint_is_stored_as_bf16_and_exports_with_parity(bf16):
    import onnx
    import torch
    from onnx import numpy_helper

    with safe_open(str(bf16 / "checkpoint" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        table = f.get_tensor("model.embed_tokens.weight").float().numpy()
    assert dtypes == {torch.bfloat16}
    assert json.loads((bf16 / "checkpoint" / "config.json").read_text())["dtype"] == "bfloat16"
    export = json.loads((bf16 / "export" / "manifest.json").read_text())
    parity = export["metrics"]["parity_vs_parent"]
    assert parity["greedy_match"] and parity["max_abs_logit_delta"] < 1e-5
    assert export["metrics"]["eval"]["kld_mean"] < 1e-9  # against the checkpoint, scored by PyTorch
    model = onnx.load(str(bf16 / "export" / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    onnx_table = next(numpy_helper.to_array(i, base_dir=str(bf16 / "export")) for n, i in inits.items()
                      if "embed_tokens" in n)
    assert onnx_table.dtype == np.float32 and np.array_equal(onnx_table, table)  # upcast exactly


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_checkpoint_scores_as_its_float32_copy_without_holding_one(bf16, tmp_path, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.scoring.torch_ref import TorchModel

    half = tmp_path / dtype
    m = AutoModelForCausalLM.from_pretrained(str(bf16 / "checkpoint"), dtype=getattr(torch, dtype))
    m.save_pretrained(str(half))
    m.float().save_pretrained(str(tmp_path / "fp32"))
    ids = (np.arange(300, dtype=np.int64) * 7919 + 11) % 4000
    ours, full = TorchModel(half), TorchModel(tmp_path / "fp32")
    # float32 arithmetic on the same values; only BLAS's blocking may differ (seen: 1.2e-7 on decode)
    np.testing.assert_allclose(ours.logits(ids), full.logits(ids), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.decode_path_logits(ids[:24], 4), full.decode_path_logits(ids[:24], 4),
                               rtol=0, atol=1e-5)
    assert ours.greedy(list(ids[:20]), 8) == full.greedy(list(ids[:20]), 8)
    assert {p.dtype for p in ours.model.parameters()} == {getattr(torch, dtype)}  # no float32 copy kept


def test_an_unknown_dtype_in_a_random_source_is_refused(data_dir, tmp_path):
    proc = run_cli("checkpoint", *PARAMS, "--source", "random:qwen3-micro?dtype=int8", "--data", str(data_dir),
                   "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert_clean_failure(proc, "dtype=int8", "bfloat16|float16")
    assert not (tmp_path / "c").exists()
