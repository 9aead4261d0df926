"""Precision stages: fused, fp16, int8-dynamic, int8-static, int4, each checked against the FP32 export
with the reference runtime and the budgets in params.yaml."""

import json

import numpy as np
import onnx
import pytest

from pipeline.consumer import manifest as mf
from pipeline.consumer.runtime import Runtime
from pipeline.graph import onnx_io
from pipeline.scoring.evaluate import evaluate_artifact, model_bytes


def _evaluate(artifact, name, params, export_dir, data_dir):
    return evaluate_artifact(artifact, (data_dir / "eval.txt").read_text(), params, export_dir, name)


def test_fused_counts_parity_and_no_duplicate_table(fused_dir, export_dir, params, data_dir):
    m = mf.read_manifest(fused_dir)
    assert m["stage"] == "fused" and m["parent_id"] == mf.read_manifest(export_dir)["artifact_id"]
    fused = m["metrics"]["fused_ops"]
    counts = onnx_io.op_counts(onnx_io.load(fused_dir, load_external_data=False))
    cfg = json.loads((fused_dir / "config.json").read_text())
    # one RMSNorm fused per norm: 2 per layer (one as Skip*), 2 QK-norms per layer, and the final norm
    assert fused["SimplifiedLayerNormalization"] + fused["SkipSimplifiedLayerNormalization"] == 4 * cfg["num_hidden_layers"] + 1
    assert all(counts.get(op, 0) == n for op, n in fused.items())
    # one GroupQueryAttention per layer (rotary inside), and nothing of the unfused attention left
    assert counts["GroupQueryAttention"] == cfg["num_hidden_layers"]
    assert not {"Softmax", "IsNaN", "Expand", "Range"} & set(counts)
    # the rotary's Neg is gone too: the one Neg left negates logits_to_keep (the lm_head's slice start)
    graph = onnx_io.load(fused_dir, load_external_data=False).graph
    assert [list(n.input) for n in graph.node if n.op_type == "Neg"] == [["logits_to_keep"]]
    # Q/K/V packed: one projection MatMul + Split per layer, then o, gate, up, down, and the lm_head
    assert counts["Split"] == cfg["num_hidden_layers"] and counts["MatMul"] == 5 * cfg["num_hidden_layers"] + 1
    parity = m["metrics"]["parity_vs_parent"]
    assert parity["greedy_match"] is True and parity["greedy_tokens"] >= 32 and parity["max_abs_logit_delta"] <= 1e-4
    metrics = _evaluate(fused_dir, "fused", params, export_dir, data_dir)
    assert metrics["budget"]["status"].startswith("pass"), metrics
    assert model_bytes(fused_dir) <= 1.01 * model_bytes(export_dir)


def test_rotary_caches_are_cut_to_the_model():
    from onnx import TensorProto, helper, numpy_helper

    from stages.fuse import trim_rotary_caches

    cos = numpy_helper.from_array(np.ones((131072, 8), np.float32), "cos_cache")
    sin = numpy_helper.from_array(np.zeros((131072, 8), np.float32), "sin_cache")
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos_cache", "sin_cache"], ["y"], domain="com.microsoft",
                            num_heads=2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32]),
                                            helper.make_tensor_value_info("pos", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32])], [cos, sin])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    import onnx_ir as ir
    import onnxruntime as ort

    model = ir.from_proto(model)
    assert trim_rotary_caches(model, 512) == {"cos_cache": [512, 8], "sin_cache": [512, 8]}
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 3, 32)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x, "pos": np.array([[0, 1, 511]])})[0], x)  # cos 1, sin 0


def test_fp16_artifact(derived, params, export_dir, data_dir):
    d = derived("fp16")
    rt = Runtime(d)
    assert rt.io.kv.dtype == np.float16
    logits, past = rt.forward(np.array([rt.encode("The for statement")]))
    assert logits.dtype == np.float32 and past[0].dtype == np.float16
    m = mf.read_manifest(d)
    assert m["fp16_policy"]["kv_dtype"] == "float16" and m["fp16_policy"]["io_types"]["logits"] == "float"
    metrics = _evaluate(d, "fp16", params, export_dir, data_dir)
    assert metrics["budget"]["status"].startswith("pass"), metrics
    assert len(rt.generate(rt.encode("Exceptions are"), 8, stop_at_eos=False)) == 8


def test_int8_dynamic_artifact(derived, params, export_dir, data_dir):
    d = derived("int8-dynamic")
    model = onnx_io.load(d, load_external_data=False)
    counts = onnx_io.op_counts(model)
    layers = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 5 * layers + 1 and counts.get("GatherBlockQuantized") == 1  # + the shared tied table
    for node in nbits:  # 8-bit, int8 compute: ORT's fast CPU path
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4, node.name
    cfg = json.loads((d / "config.json").read_text())
    table = [cfg["vocab_size"], cfg["hidden_size"]]
    assert not any(list(t.dims) == table and t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)
    metrics = _evaluate(d, "int8-dynamic", params, export_dir, data_dir)
    assert metrics["budget"]["status"].startswith("pass"), metrics


def test_int8_static_artifact(derived, params, export_dir, data_dir):
    d = derived("int8-static")
    m = mf.read_manifest(d)
    policy = m["quant_policy"]
    counts = onnx_io.op_counts(onnx_io.load(d, load_external_data=False))
    assert counts.get("QuantizeLinear", 0) > 0 and counts.get("DequantizeLinear", 0) > 0
    layers = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    assert m["metrics"]["quantized_matmuls"] == 5 * layers  # packed qkv, o, gate, up, down; lm_head excluded
    assert policy["smoothquant"]["groups"] > 0 and policy["smoothquant"]["folded"] > policy["smoothquant"]["mul_inserted"]
    assert policy["calibration"]["windows"] == params.int8_static.calibration.samples
    excluded = set(policy["excluded_nodes"])
    assert any("MatMul" in n for n in excluded)
    metrics = _evaluate(d, "int8-static", params, export_dir, data_dir)
    assert metrics["budget"]["status"].startswith("pass"), metrics


def test_the_calibrators_own_session_takes_our_session_options(fused_dir, tmp_path):
    """ORT's calibrator builds its session itself; unpatched, it packs every weight into a second copy
    (int8-static's peak at 4B). Given options with prepacking off, its session runs with them."""
    import shutil

    import onnxruntime as ort
    from onnxruntime.quantization import calibrate, create_calibrator

    from pipeline import compat
    from pipeline.consumer.runtime import session_options

    model = tmp_path / "m"
    shutil.copytree(fused_dir, model)  # the augmented graph is saved beside the weights it reads
    with compat.ort_quantization_on_graph_alone(), \
            compat.ort_calibrator_session_options(session_options(prepack=False)):
        calibrator = create_calibrator(model / onnx_io.MODEL, ["MatMul"],
                                       augmented_model_path=str(model / "augmented.onnx"),
                                       use_external_data_format=True)
    got = calibrator.infer_session.get_session_options()
    assert got.get_session_config_entry("session.disable_prepacking") == "1"
    assert got.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert calibrate.CalibraterBase.create_inference_session.__module__ == calibrate.__name__  # put back


def test_calibrating_without_the_lm_head_takes_the_same_ranges(fused_dir, params, data_dir, tmp_path):
    """With the lm_head left float, the calibrator runs the graph less the lm_head (no transposed table,
    no logits): every range it takes is the range the whole graph gives, bit for bit; only the lm_head's
    own inputs and output go."""
    import shutil

    from onnxruntime.quantization.calibrate import load_tensors_data

    from pipeline.text.reader import calibration_windows
    from stages.int8_static import _calibrate, _with_types

    cal = params.int8_static.calibration
    config = json.loads((fused_dir / "config.json").read_text())
    windows = calibration_windows(str(data_dir / "calibration.txt"), "text", fused_dir / "tokenizer.json", 4, 32,
                                  config["eos_token_id"])
    ranges = {}
    for lm_head_float in (False, True):
        model = tmp_path / str(lm_head_float)
        shutil.copytree(fused_dir, model)
        with onnx_io.weights_from(model):  # typed, as the stage calibrates it
            onnx.save_model(_with_types(onnx.load(str(model / onnx_io.MODEL), load_external_data=False)),
                            str(model / onnx_io.MODEL))
        path = _calibrate(model / onnx_io.MODEL, config, windows, "MinMax", 2, 99.999, cal.round_bits, model,
                          lm_head_float=lm_head_float)
        ranges[lm_head_float] = {k: tuple(np.asarray(x).ravel().tolist() for x in v.range_value)
                                 for k, v in load_tensors_data(path).data.items()}
    graph = onnx.load(str(fused_dir / onnx_io.MODEL), load_external_data=False)
    head = next(n for n in graph.graph.node if n.name in onnx_io.lm_head_nodes(graph))
    assert set(ranges[False]) - set(ranges[True]) == {*head.input, *head.output}  # the lm_head's own tensors
    assert all(ranges[True][k] == ranges[False][k] for k in ranges[True]) and len(ranges[True]) > 10
    pruned = onnx.load(str(tmp_path / "True" / "calibrate.onnx"), load_external_data=False)
    table = next(n.input[0] for n in pruned.graph.node if n.name in onnx_io.embedding_nodes(pruned))
    assert [n.op_type for n in pruned.graph.node if table in n.input] == ["Gather"]  # no transposed copy
    assert pruned.graph.output[0].name == head.input[0]


def test_int4_artifact(derived, params, export_dir, data_dir):
    d = derived("int4")
    model = onnx_io.load(d, load_external_data=False)
    counts = onnx_io.op_counts(model)
    layers = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    assert counts.get("MatMulNBits") == 5 * layers + 1 and counts.get("GatherBlockQuantized") == 1
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):  # the tied lm_head included
        assert {a.name: a.i for a in node.attribute}["accuracy_level"] == params.int4.accuracy_level, node.name
    metrics = _evaluate(d, "int4", params, export_dir, data_dir)
    assert metrics["budget"]["status"].startswith("pass"), metrics
    policy = mf.read_manifest(d)["quant_policy"]
    assert policy["weights"].startswith(f"int4 symmetric blocks of {params.int4.block_size} ({params.int4.algorithm}")
    assert policy["tied_embedding"]["bits"] == params.int4.tied_bits


def test_int4_gptq_artifact_has_a_lower_kld_than_the_default(derived, params, export_dir, data_dir, tmp_path):
    """int4.algorithm gptq on the built-in model: the same graph as the default (awq), a lower mean KLD
    against the export, both measured here; an imatrix without its calibration tokens is refused in one line."""
    from tests.conftest import build, calibrated

    p = calibrated(data_dir, "int4.algorithm=gptq")
    build("int4", p, derived("fused"), tmp_path / "gptq", uses={"imatrix": derived("imatrix")})
    ours, default = (_evaluate(d, "int4", params, export_dir, data_dir) for d in (tmp_path / "gptq", derived("int4")))
    assert ours["kld_mean"] < default["kld_mean"], (ours, default)
    assert ours["budget"]["status"].startswith("pass"), ours
    graph = lambda d: onnx_io.op_counts(onnx_io.load(d, load_external_data=False))  # noqa: E731
    assert graph(tmp_path / "gptq") == graph(derived("int4"))
    # an imatrix made before the windows were kept: refused in one line, nothing written
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from pipeline.errors import PipelineError
    from pipeline.quant.imatrix import FILE, Imatrix
    from pipeline.quant.weight_only import quantize

    old = tmp_path / "old-imatrix"
    old.mkdir()
    with safe_open(str(derived("imatrix") / FILE), framework="numpy") as fh:
        meta = fh.metadata()
    save_file({k: v for k, v in load_file(str(derived("imatrix") / FILE)).items() if k != "tokens"}, str(old / FILE),
              metadata=meta)
    im = Imatrix(old)
    assert im.windows is None and im.mean_sq
    with pytest.raises(PipelineError, match="gptq needs the imatrix's calibration tokens") as exc:
        quantize(derived("fused"), tmp_path / "x", bits=4, block_size=128, accuracy_level=4, exclude=set(), im=im,
                 weighted=True, gptq=True)
    assert "\n" not in str(exc.value) and not (tmp_path / "x").exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_shared_tied_table_matches_its_dequantized_values(bits):
    """GatherBlockQuantized and MatMulNBits read one table; both must equal the numpy dequantization."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.graph.tied import find_tied, share_quantized_table
    from pipeline.quant.nbits import dequantize_blocks, quantize_blocks

    rng = np.random.default_rng(bits)
    table = rng.normal(size=(64, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5, 64]),
                               helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 5, 32])],
                              [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert find_tied(model) is not None
    share_quantized_table(model, bits, 16)
    assert {t.name for t in model.graph.initializer} == {"E_q%d" % bits, "E_q%d_scales" % bits,
                                                          "E_q%d_2d_shape" % bits, "E_q%d_scales_2d_shape" % bits}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 63, 5, 17]])
    logits, h = sess.run(["logits", "h"], {"ids": ids})
    deq = dequantize_blocks(*quantize_blocks(table, bits, 16), bits)
    np.testing.assert_allclose(h[0], deq[ids[0]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits[0], deq[ids[0]] @ deq.T, rtol=1e-3, atol=1e-3)
    assert np.abs(deq - table).max() <= np.abs(table).max() / (2 ** (bits - 1) - 1)
    for got, whole in zip(quantize_blocks(table, bits, 16, rows=5), quantize_blocks(table, bits, 16)):
        np.testing.assert_array_equal(got, whole)  # in chunks of rows (bounded memory): the same bytes


@pytest.mark.parametrize("bits", [4, 8])
def test_our_matmulnbits_blocks_run_in_onnxruntime_and_weighting_lowers_the_weighted_error(bits, tmp_path):
    """pipeline/quant/nbits.py's layout is what ORT's MatMulNBits reads, and the importance-weighted scales give a
    lower importance-weighted error than round-to-nearest on weights whose inputs have outlier channels."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.quant import nbits
    from pipeline.quant.smoothquant import Weights

    rng = np.random.default_rng(bits)
    k, n = 64, 24
    w = rng.normal(size=(k, n)).astype(np.float32)
    importance = np.ones(k, np.float32)
    importance[[3, 40]] = 1e4  # two input channels carry large activations
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              [numpy_helper.from_array(w, "W")])
    x = rng.normal(size=(2, k)).astype(np.float32)
    for imp in (None, importance):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        counts = nbits.to_matmulnbits(model, Weights(model, tmp_path), {"W": bits}, 16, None,
                                      None if imp is None else {"W": imp})
        assert counts == {bits: 1} and [nd.op_type for nd in model.graph.node] == ["MatMulNBits"]
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        deq = nbits.dequantize_blocks(*nbits.quantize_blocks(np.ascontiguousarray(w.T), bits, 16, imp), bits)
        np.testing.assert_allclose(y, x @ deq.T, rtol=1e-4, atol=1e-4)
    wt = np.ascontiguousarray(w.T)
    err = {}
    for label, imp in (("rtn", None), ("weighted", importance)):
        deq = nbits.dequantize_blocks(*nbits.quantize_blocks(wt, bits, 16, imp), bits)
        err[label] = float((np.square(deq - wt) @ importance).sum())
    assert err["weighted"] < err["rtn"], err


def test_calibrated_algorithms_refuse_a_missing_or_foreign_imatrix(fused_dir, export_dir, derived, data_dir, tmp_path):
    from tests.conftest import assert_clean_failure, run_cli

    proc = run_cli("quantize", "--mode", "int4", "--input", str(fused_dir), "--out", str(tmp_path / "a"), "--no-eval",
                   "--imatrix", str(tmp_path / "none"))
    assert_clean_failure(proc, "int4.algorithm awq needs the imatrix artifact", "pipeline imatrix")
    proc = run_cli("quantize", "--mode", "dynamic", "--input", str(export_dir), "--out", str(tmp_path / "b"),
                   "--no-eval", "--imatrix", str(derived("imatrix")))
    assert_clean_failure(proc, "was collected on fused", "not on this input (export")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_k_quant_builds_on_the_fused_graph(fused_dir, export_dir, data_dir, tmp_path):
    """ORT's k_quant used to fail on the fused graph (an input no node reads: pipeline/compat.py)."""
    from tests.conftest import build, calibrated, scoring

    p = calibrated(data_dir, "int4.algorithm=k_quant", "int4.block_size=32")
    m = build("int4", p, fused_dir, tmp_path / "kq", scoring(p, data_dir, export_dir))
    assert "k_quant" in m["quant_policy"]["weights"] and m["metrics"]["op_counts"].get("MatMulNBits", 0) > 0
    from onnx import load

    g = load(str(tmp_path / "kq" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in g.input] == [i.name for i in load(str(fused_dir / "model.onnx"),
                                                             load_external_data=False).graph.input]


@pytest.mark.parametrize("bits,k", [(4, 96), (8, 64)])
def test_gptq_blocks_run_in_onnxruntime_and_lower_the_output_error(bits, k, tmp_path):
    """pipeline/quant/gptq.py writes MatMulNBits' layout (ORT's output is x @ its dequantized weights, also
    where K is not a multiple of the block: 96 against blocks of 64), and on correlated inputs with outlier
    channels its output error ||X (W_q - W)|| is below the importance-weighted rounding's (the imatrix
    algorithm's, with the same diagonal), which is below round-to-nearest's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.quant import gptq, nbits
    from pipeline.quant.smoothquant import Weights

    rng = np.random.default_rng(bits)
    n, t, block = 48, 1024, 64
    x = (rng.normal(size=(t, k)) @ (np.eye(k) + 0.3 * rng.normal(size=(k, k)))).astype(np.float32)
    x[:, [2, 50]] *= 20  # outlier channels
    x[:, 7] = 0          # a channel the calibration never lights
    w = (0.05 * rng.normal(size=(k, n))).astype(np.float32)
    h = x.T @ x
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, n])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    counts = nbits.to_matmulnbits(model, Weights(model, tmp_path), {"W": bits}, block, None, None,
                                  {"W": gptq.Rounder(h)})
    assert counts == {bits: 1} and [nd.op_type for nd in model.graph.node] == ["MatMulNBits"]
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    wt = np.ascontiguousarray(w.T)
    deq = {"gptq": nbits.dequantize_blocks(*gptq.quantize(wt, h, bits, block), bits, k),
           "weighted": nbits.dequantize_blocks(*nbits.quantize_blocks(wt, bits, block, np.diag(h)), bits, k),
           "rtn": nbits.dequantize_blocks(*nbits.quantize_blocks(wt, bits, block), bits, k)}
    np.testing.assert_allclose(y, x @ deq["gptq"].T, rtol=1e-3, atol=1e-3)
    err = {name: float(np.square(x @ (d - wt).T).sum()) for name, d in deq.items()}
    assert err["gptq"] < err["weighted"] < err["rtn"], err
    assert np.isfinite(deq["gptq"]).all()
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="not finite"):  # an overflowing parent graph: one line, no NaN artifact
        gptq.quantize(wt, np.where(np.eye(k, dtype=bool), np.nan, h), bits, block)


def test_gptq_hessians_are_chunked_to_the_memory_bound():
    from pipeline.quant import gptq

    sizes = {"a": 1024, "b": 1024, "c": 3072, "d": 1024}
    parts = gptq.chunks(sizes, budget=4 * 1024 * 1024 * 2)
    assert parts == [["a", "b"], ["c"], ["d"]]  # c alone exceeds the budget: a chunk of its own
    assert [n for p in parts for n in p] == list(sizes)
