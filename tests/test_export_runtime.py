"""Export parity with PyTorch, and the reference runtime (prefill/decode, sampling, scoring)."""

import json

import numpy as np
import onnx
import pytest

from pipeline.consumer import manifest as mf
from pipeline.consumer.runtime import GraphIO, Runtime, sample
from pipeline.scoring.torch_ref import TorchModel


def _weight_matmuls(model) -> list[str]:
    """MatMul nodes with a constant (initializer) weight: the projections; the rest are attention's."""
    init = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in init]


def test_export_artifact_is_complete_and_checked(export_dir, checkpoint_dir):
    m = mf.read_manifest(export_dir)
    mf.check_files(export_dir, m)
    assert m["stage"] == "export" and m["parent_id"] == mf.read_manifest(checkpoint_dir)["artifact_id"]
    assert m["opset"] == 17 and m["precision"] == "fp32"
    parity = m["metrics"]["parity_vs_parent"]
    assert parity["greedy_match"] is True and parity["greedy_tokens"] == 32
    assert parity["max_abs_logit_delta"] < 1e-3
    assert {"python", "onnx", "onnxruntime", "optimum", "transformers", "torch"} <= m["versions"].keys()
    names = {f["path"] for f in m["files"]}
    assert {"model.onnx", "model.onnx_data", "config.json", "generation_config.json", "tokenizer.json"} <= names
    onnx.checker.check_model(str(export_dir / "model.onnx"))


def test_export_stores_the_tied_embedding_once(export_dir, checkpoint_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(checkpoint_dir)
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    big = [t.name for t in model.graph.initializer if sorted(t.dims) == sorted([cfg.vocab_size, cfg.hidden_size])]
    assert len(big) == 1, big


def test_lazy_folding_gives_torchs_folded_graph(export_dir, checkpoint_dir, tmp_path):
    """The export runs torch's exporter without constant folding (it copies every transposed weight in
    memory) and folds lazily itself: the same ops, and the same outputs, as torch's own folding."""
    import contextlib
    import io

    from optimum.exporters.onnx import main_export

    from pipeline.graph import onnx_io

    with contextlib.redirect_stdout(io.StringIO()):
        main_export(str(checkpoint_dir), output=tmp_path, task="text-generation-with-past", opset=17, device="cpu",
                    do_validation=False, local_files_only=True, no_post_process=True)  # torch folds
    torch_folded = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    ours = onnx_io.load(export_dir, load_external_data=False)
    counts = onnx_io.op_counts(ours)
    assert counts == {**onnx_io.op_counts(torch_folded), "Transpose": counts["Transpose"]}
    # torch's folding also writes the lm_head's transposed table as a second copy; ours keeps the node
    assert counts["Transpose"] == onnx_io.op_counts(torch_folded)["Transpose"] + 1
    folded = mf.read_manifest(export_dir)["metrics"]["folded_nodes"]
    assert folded["Transpose"] == len(_weight_matmuls(ours))  # every projection; the lm_head reads the node
    ids = np.array(Runtime(export_dir).encode("The for statement"), dtype=np.int64)
    logits = [Runtime(d).logits(ids) for d in (export_dir, tmp_path)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)


def test_the_export_traces_a_weightless_skeleton(checkpoint_dir):
    """Every parameter of the model optimum traces is one scalar broadcast to its shape: the export holds
    no copy of the weights."""
    from safetensors import safe_open

    from pipeline.scoring.torch_ref import skeleton

    model, names = skeleton(checkpoint_dir, False)
    params = dict(model.named_parameters())
    assert params and all(p.stride() == (0,) * p.dim() for p in params.values())
    assert all(p.untyped_storage().nbytes() == 4 for p in params.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as from_pretrained ties it
    assert len(set(names)) == len(names) == len(params)
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="pt") as f:
        assert set(names) == set(f.keys())


def test_the_skeleton_export_is_optimums_export_of_the_weights(export_dir, checkpoint_dir, tmp_path):
    """optimum's export of the loaded checkpoint (its own loader, the real weights), folded as the stage
    folds: the same nodes and the same initializers, byte for byte, as the stage's artifact."""
    import contextlib
    import io

    from onnx import numpy_helper
    from optimum.exporters.onnx import main_export

    from pipeline.graph import onnx_io

    with contextlib.redirect_stdout(io.StringIO()):
        main_export(str(checkpoint_dir), output=tmp_path / "raw", task="text-generation-with-past", opset=17,
                    device="cpu", do_validation=False, local_files_only=True, no_post_process=True,
                    do_constant_folding=False)
    plain = onnx_io.load_ir(tmp_path / "raw")
    onnx_io.fold_constants(plain)
    onnx_io.save_ir(plain, tmp_path)
    want, got = (onnx.load(str(d / "model.onnx")) for d in (tmp_path, export_dir))
    assert [(n.op_type, list(n.input)) for n in got.graph.node] == [(n.op_type, list(n.input)) for n in want.graph.node]
    tensors = [{t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer} for m in (want, got)]
    assert tensors[0].keys() == tensors[1].keys() and all(tensors[0][k] == tensors[1][k] for k in tensors[0])


def test_a_checkpoint_short_of_a_weight_is_refused_by_name(checkpoint_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from pipeline.errors import PipelineError
    from pipeline.graph import onnx_io
    from stages import export

    short = tmp_path / "short"
    shutil.copytree(checkpoint_dir, short)
    weights = load_file(str(short / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(short / "model.safetensors"), metadata={"format": "pt"})
    export.optimum_export(str(short), str(tmp_path / "raw"), 17, False)
    model = onnx_io.load_ir(tmp_path / "raw")
    with pytest.raises(PipelineError, match="no tensor 'model.norm.weight'"):
        export.put_weights(model, json.loads((tmp_path / "raw" / export.PARAMS).read_text()), short)


def test_optimum_loads_the_artifact(export_dir, checkpoint_dir):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    ort_model = ORTModelForCausalLM.from_pretrained(export_dir)
    ids = torch.tensor([Runtime(export_dir).encode("The for statement")])
    out = ort_model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    expected = TorchModel(checkpoint_dir).greedy(ids[0].tolist(), 8)
    assert out[0, ids.shape[1]:].tolist() == expected


def test_graph_io_is_discovered(export_dir):
    rt = Runtime(export_dir)
    cfg = rt.config
    assert rt.io.kv.layers == cfg["num_hidden_layers"]
    assert rt.io.kv.kv_heads == cfg["num_key_value_heads"] and rt.io.kv.dtype == np.float32
    offline = GraphIO.from_onnx(export_dir / "model.onnx", cfg)
    assert offline.past_names == rt.io.past_names and offline.kv == rt.io.kv


def test_kv_cache_decode_matches_full_recompute(export_dir):
    rt = Runtime(export_dir)
    ids = np.array(rt.encode("Exceptions are raised when an error occurs in"))
    full = rt.logits(ids)
    logits, past = rt.forward(ids[None, :-3])
    steps = [logits[0, -1]]
    for tok in ids[-3:-1]:
        logits, past = rt.forward(np.array([[tok]]), past)
        steps.append(logits[0, -1])
    np.testing.assert_allclose(np.stack(steps), full[-4:-1], atol=1e-4)


def test_weights_read_in_place_give_the_packed_sessions_logits(export_dir):
    """ORT's weight prepacking, off where the weights would not fit twice (pipeline/consumer/runtime.py), changes
    only how the GEMMs read the weights."""
    from pipeline.consumer.runtime import make_session, prepack_fits

    path = export_dir / "model.onnx"
    assert prepack_fits(path)  # the built-in model is small: packed by default
    io = GraphIO.from_onnx(path, json.loads((export_dir / "config.json").read_text()))
    ids = np.array([Runtime(export_dir).encode("Exceptions are raised when an error occurs in")])
    packed, in_place = (make_session(path, prepack=p).run(["logits"], io.feeds(ids))[0] for p in (True, False))
    assert packed.shape[1] == ids.shape[1] and np.abs(packed).max() > 1
    np.testing.assert_allclose(in_place, packed, atol=1e-4, rtol=1e-4)


def test_greedy_matches_pytorch_and_streams(export_dir, checkpoint_dir):
    rt = Runtime(export_dir)
    ids = rt.encode("A class definition")
    seen = []
    out = rt.generate(ids, 20, stop_at_eos=False, on_token=seen.append)
    assert seen == out and len(out) == 20
    assert out == TorchModel(checkpoint_dir).greedy(ids, 20)


def test_sampling_is_seeded_and_filters():
    rng_logits = np.random.default_rng(0).normal(size=50)
    draws = lambda seed, **kw: [sample(rng_logits, np.random.default_rng(seed), **kw) for _ in range(1)]  # noqa: E731
    assert draws(1, temperature=1.0) == draws(1, temperature=1.0)
    top = set(np.argsort(-rng_logits)[:3])
    rng = np.random.default_rng(5)
    assert {sample(rng_logits, rng, temperature=2.0, top_k=3) for _ in range(200)} <= top
    assert sample(rng_logits, rng, temperature=1.0, top_k=1) == int(np.argmax(rng_logits))
    # top-p keeps the smallest set reaching p: with a dominant token and p small, only it remains
    peaked = np.zeros(10)
    peaked[4] = 10.0
    assert {sample(peaked, rng, temperature=1.0, top_p=0.5) for _ in range(50)} == {4}
    spread = {sample(rng_logits, rng, temperature=1.0) for _ in range(300)}
    assert len(spread) > 10


def test_eos_stops_generation(export_dir):
    rt = Runtime(export_dir)
    ids = rt.encode("The")
    first = rt.generate(ids, 1)[0]
    rt.eos_ids = {first}
    assert rt.generate(ids, 10) == [first]


def test_cuda_provider_gives_a_clear_message_when_absent(export_dir):
    import onnxruntime as ort

    from pipeline.errors import PipelineError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(PipelineError, match="onnxruntime-gpu"):
        Runtime(export_dir, provider="cuda")


def test_a_concatenated_cache_runs_without_the_memory_arena(export_dir, fused_dir):
    """ORT's CPU arena keeps each step's freed cache of a growing concatenated KV cache: a third copy
    (benchmarks/arena_memory.py). The export runs without it; GQA graphs (fixed shared buffers) keep it."""
    export, fused = Runtime(export_dir), Runtime(fused_dir)
    assert not export.io.right_padded and not export.session.get_session_options().enable_cpu_mem_arena
    assert fused.io.right_padded and fused.session.get_session_options().enable_cpu_mem_arena
    ids = np.array(export.encode("Exceptions are raised when an error occurs in"))
    np.testing.assert_allclose(export.logits(ids), fused.logits(ids), atol=1e-4)
