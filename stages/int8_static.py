"""Stage `int8-static`: ``quantize_static`` in QDQ format, calibrated on text through `datasets`.

What keeps it in budget (measured, see README): SmoothQuant on the projection inputs, per-channel
weights, and a measured op-exclusion policy (the lm_head and the activation x activation attention
MatMuls stay float by default). Calibration runs in strides (ORT's ``CalibStridedMinMax`` with our
reader's ``set_range``), so only one stride of intermediate outputs is alive at a time."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from pipeline import compat
from pipeline.consumer.runtime import GraphIO, session_options
from pipeline.graph import onnx_io
from pipeline.graph.tied import find_tied, share_quantized_table
from pipeline.log import info
from pipeline.onnx_post import OnnxStage
from pipeline.ops import store
from pipeline.quant.rounding import coarsen_maxima, coarsen_ranges
from pipeline.quant.smoothquant import Weights, activation_channel_max, smooth, smoothing_groups
from pipeline.runner import BuildResult, Inputs
from pipeline.schema import PosInt, Section, power_of_two
from pipeline.text.reader import CalibrationReader, TextWindows, calibration_windows, covered_params


class Calibration(TextWindows):
    stride: int = PosInt

class Exclude(Section):
    lm_head: bool
    activation_matmuls: bool
    nodes: list[str]


class SmoothQuant(Section):
    enabled: bool
    alpha: float = Field(ge=0, le=1)


class Int8Static(Section):
    parent: Literal["export", "fused"]
    calibration: Calibration
    method: Literal["MinMax", "Entropy", "Percentile"]
    percentile: float = Field(gt=50, le=100)
    per_channel: bool
    exclude: Exclude
    smoothquant: SmoothQuant
    quantize_tied: bool
    tied_block_size: int
    tied_accuracy_level: Optional[Literal[0, 1, 2, 3, 4]]
    greedy_tokens: int = PosInt

    _block = field_validator("tied_block_size")(power_of_two)

    def inert(self) -> set[str]:
        """Keys that change nothing given the others (see Int8Dynamic.inert)."""
        return ({"percentile"} if self.method != "Percentile" else set()) | (
            {"smoothquant.alpha"} if not self.smoothquant.enabled else set()) | (
            {"tied_block_size", "tied_accuracy_level"} if not self.quantize_tied else set())


def _stride(n: int, wanted: int) -> int:
    """Largest divisor of n that is <= wanted (ORT requires the stride to divide the sample count)."""
    return max(d for d in range(1, max(1, min(n, wanted)) + 1) if n % d == 0)


def _with_types(model):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception as exc:  # inference is best effort: quantize with what is known
        info(f"int8-static: symbolic shape inference failed ({type(exc).__name__}); some activations may stay float")
        return model


def _calibrate(model_path: Path, config: dict, windows, method: str, stride: int, percentile: float,
               round_bits: int, scratch: Path, lm_head_float: bool) -> Path:
    """ORT's calibrator over the windows in strides; the ranges, rounded outward to ``round_bits``
    mantissa bits, saved in its calibration-cache format. ``lm_head_float``: the lm_head is left
    unquantized, so no range of its tensors is needed and the calibrator runs the graph without it:
    its inputs (the final norm's output, the tied table's transpose) and its output drop out of the
    ranges, and only they do (tests/test_precision.py)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrated = model_path
    if lm_head_float:
        # The calibrator runs every graph output, on a session without graph optimizations: there a
        # tied lm_head transposes the embedding table on every run (a table-sized anonymous copy:
        # docs/real-shapes.md), computes logits no range is taken of, and costs a tenth of the forward's work.
        calibrated = model_path.parent / "calibrate.onnx"
        onnx.save_model(onnx_io.without_lm_head(onnx.load(str(model_path), load_external_data=False)),
                        str(calibrated))

    # Loaded without its weights (pipeline/compat.py) and saved beside them, the calibrator's augmented
    # graph runs on the same weights, read in place: never prepacked, so the ranges (and the artifact)
    # do not depend on how much memory was free (Qwen3-0.6B: drift +0.302 % calibrated packed, +0.357 %
    # unpacked); unpacked it is no slower over a few windows (packing costs more than it saves).
    options = session_options(prepack=False)
    with compat.ort_quantization_on_graph_alone(), compat.ort_calibrator_session_options(options):
        calibrator = create_calibrator(calibrated, ["MatMul"],
                                       augmented_model_path=str(model_path.parent / "augmented.onnx"),
                                       calibrate_method=getattr(CalibrationMethod, method),
                                       use_external_data_format=True,
                                       extra_options={"percentile": percentile}
                                       if method == "Percentile" else {})
    reader = CalibrationReader(GraphIO.from_onnx(model_path, config), windows)
    for start in range(0, len(windows), stride):
        reader.set_range(start_index=start, end_index=start + stride)
        calibrator.collect_data(reader)
    ranges = coarsen_ranges(calibrator.compute_data(), round_bits)
    del calibrator, reader
    gc.collect()
    path = scratch / "ranges.json"
    save_tensors_data(ranges, path)
    return path


def build(inputs: Inputs, config: Int8Static, tmp: Path) -> BuildResult:
    parent_dir = inputs.dir
    method = config.method
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cal = config.calibration
    model_config = json.loads((parent_dir / "config.json").read_text())
    eos = model_config.get("eos_token_id")
    windows = calibration_windows(cal.source, cal.text_column, parent_dir / "tokenizer.json", cal.samples, cal.seq_len,
                                  eos if isinstance(eos, int) else None)
    info(f"int8-static: {len(windows)} calibration windows of {windows.shape[1]} tokens from {cal.source}")
    graph = onnx_io.load(parent_dir, load_external_data=False)
    tied = config.quantize_tied and find_tied(graph) is not None
    ex = config.exclude
    exclude = set(ex.nodes)
    head = set(onnx_io.lm_head_nodes(graph))
    if ex.lm_head or tied:
        exclude |= head
    if ex.activation_matmuls:
        exclude |= set(onnx_io.activation_matmuls(graph))
    lm_head_float = bool(head & exclude)
    sq = config.smoothquant
    compat.quiet_ort_quantizers()
    # One model in memory at a time: the SmoothQuant statistics and ORT's calibrator run sessions on
    # graphs beside the parent's weights; the smoothed weights are made with no session open; the
    # calibrated ranges are handed to quantize_static through its cache (left to itself it holds
    # the model, the calibrator's copy and a session together: 3x the weights).
    with store.scratch_dir(tmp, "int8s") as scratch:
        scratch = Path(scratch).resolve()
        sq_summary = None
        src = scratch / "in"
        if sq.enabled:
            maxima = activation_channel_max(graph, parent_dir, smoothing_groups(graph, exclude), model_config, windows,
                                            scratch / "sq")
            maxima = coarsen_maxima(maxima, cal.round_bits)
            shutil.rmtree(scratch / "sq")
            weights = Weights(graph, parent_dir.resolve())
            sq_summary = smooth(graph, weights, maxima, sq.alpha, exclude)
            info(f"int8-static: SmoothQuant alpha {sq.alpha}: {sq_summary['groups']} groups, "
                 f"{sq_summary['folded']} folded into the graph (RMSNorm gamma or up_proj), {sq_summary['mul_inserted']} Mul inserted")
            model = onnx_io.to_ir(graph, parent_dir.resolve())
            weights.lazy(model)
            src.mkdir()
            onnx_io.save_ir(model, src)  # the smoothed weights are computed here, one tensor at a time
            del model, weights
            graph = onnx_io.load(src, load_external_data=False)
            weights = src
        else:
            weights = parent_dir
        # Types for every tensor (ORT's symbolic inference knows the contrib ops of the fused graph):
        # without them the calibrator skips the outputs of RMSNorm & co. and their MatMuls keep
        # float activations. It reads a few small initializers relative to the working directory.
        with onnx_io.weights_from(weights):
            graph = _with_types(graph)
        if weights is src:
            onnx.save_model(graph, str(src / onnx_io.MODEL))  # the graph only: the weights are in place
        else:
            onnx_io.beside_weights(graph, weights, src, link=False)  # quantize_static reads it via onnx
        del graph
        stride = _stride(len(windows), cal.stride)
        ranges = _calibrate(src / onnx_io.MODEL, model_config, windows, method, stride, config.percentile,
                            cal.round_bits, scratch, lm_head_float=lm_head_float)
        info(f"int8-static: calibrated on {len(windows)} windows; quantize_static (the weights one at a time) ...")
        # quantize_static on the graph alone too: each weight is read from disk as it is quantized,
        # and the weights it leaves float stay in src's data file, which the output (written beside
        # it) refers to.
        with compat.ort_quantization_on_graph_alone(), onnx_io.weights_from(src):
            quantize_static(str(src / onnx_io.MODEL), str(src / "quantized.onnx"), None,
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                            per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=sorted(exclude),
                            calibrate_method=getattr(CalibrationMethod, method), use_external_data_format=True,
                            calibration_cache_path=str(ranges),
                            extra_options={"MatMulConstBOnly": False, "DefaultTensorType": onnx.TensorProto.FLOAT})
            q = onnx.load(str(src / "quantized.onnx"), load_external_data=False)
            shared = share_quantized_table(q, 8, config.tied_block_size, config.tied_accuracy_level) \
                if tied else None
        onnx_io.save_ir(onnx_io.to_ir(q, src), tmp)
    counts = onnx_io.op_counts(q)
    policy = {"format": "QDQ", "weights": "int8 symmetric" + (" per-channel" if config.per_channel else ""),
              "activations": f"uint8 static ({method})", "smoothquant": sq_summary,
              "excluded_nodes": sorted(exclude), "tied_embedding": shared or "fp32 (not quantized)",
              "calibration": {"source": cal.source, "windows": len(windows),
                              "seq_len": int(windows.shape[1]), "stride": stride,
                              "round_bits": cal.round_bits}}
    dq = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sum(1 for n in q.graph.node if n.op_type == "MatMul" and all(i in dq for i in n.input[:2]))
    return BuildResult(metrics={"op_counts": counts, "quantized_matmuls": quantized},
                       extra={"precision": "int8-static", "kv_dtype": "float32", "quant_policy": policy},
                       params=covered_params(config, windows))


STAGE = OnnxStage(name="int8-static", verb="quantize", mode="static", section="int8_static", config=Int8Static,
                  build=build, parents=("export", "fused"),
                  flags={"--calibration": ("calibration.source", "calibration source (file, dir or dataset name)"),
                         "--text-column": ("calibration.text_column", "text column of the calibration source"),
                         "--samples": ("calibration.samples", "calibration windows"),
                         "--seq-len": ("calibration.seq_len", "tokens per calibration window"),
                         "--method": ("method", "calibration method: MinMax | Entropy | Percentile"),
                         "--smoothquant": ("smoothquant.enabled", "SmoothQuant before calibration",
                                           "--no-smoothquant"),
                         "--alpha": ("smoothquant.alpha", "SmoothQuant alpha")},
                  tunable=("method", "percentile", "per_channel", "smoothquant.enabled", "smoothquant.alpha"),
                  precision="int8", summary="INT8 static QDQ, calibrated with SmoothQuant (for execution providers that consume QDQ)")
