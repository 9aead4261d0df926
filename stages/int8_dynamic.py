"""Stage `int8-dynamic`: 8-bit weights, activations quantized at run time.

Every projection MatMul becomes ``MatMulNBits`` with 8-bit symmetric blocks and ``accuracy_level`` 4
(int8 weights, activations quantized to int8 inside the kernel): the format onnxruntime-genai's builder
emits for int8 and ORT's fast CPU path. (``quantize_dynamic``'s QOperator graph, MatMulInteger +
DynamicQuantizeLinear, was an option here and is gone: it decoded several times slower,
docs/choices.md.)

``smoothing`` (SmoothQuant for int8 compute): accuracy_level 4 quantizes each row of activations to
int8 block by block along the input, so one outlier channel takes its whole block's range. With the
importance matrix's per-channel maxima (stage imatrix), ``s = max|x|^alpha / max|w|^(1-alpha)`` moves
the outliers into the weights, folded exactly into the RMSNorm gammas and up_proj's columns: the same
graph and ops, so the same speed (pipeline/quant/weight_only.py; measured in docs/choices.md).

Embedding / tied lm_head policy (``quantize_tied``): the table is stored once as 8-bit blocks and
shared by GatherBlockQuantized + MatMulNBits (see pipeline/graph/tied.py); with ``quantize_tied: false``
it stays FP32. Both were measured (README); quantizing it is what meets the size budget."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from pipeline import compat
from pipeline.graph import onnx_io
from pipeline.graph.tied import find_tied, share_quantized_table
from pipeline.onnx_post import OnnxStage
from pipeline.runner import BuildResult, Inputs
from pipeline.schema import PosInt, Section, power_of_two


class Smoothing(Section):
    enabled: bool
    alpha: float = Field(ge=0, le=1)


class Int8Dynamic(Section):
    parent: Literal["export", "fused"]
    smoothing: Smoothing = Smoothing(enabled=False, alpha=0.5)
    block_size: int
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]]
    quantize_tied: bool
    tied_block_size: int
    nodes_to_exclude: list[str]
    kv_cache: Literal["float32", "int8"] = "float32"  # int8: ORT's quantized GQA cache, scales from the imatrix
    greedy_tokens: int = PosInt

    _block = field_validator("tied_block_size", "block_size")(power_of_two)

    def inert(self) -> set[str]:
        """Keys (dotted) that change nothing given the others: `pipeline tune` drops them from a recipe."""
        return ({"smoothing.alpha"} if not self.smoothing.enabled else set()) | (
            {"tied_block_size"} if not self.quantize_tied else set())



def _matmulnbits(model, config: Int8Dynamic, exclude: list[str]):
    """``model``: the graph alone; run inside onnx_io.weights_from(its dir): each weight is read as it
    is quantized."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    config = mnb.DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True,
                                              accuracy_level=config.accuracy_level, bits=8,
                                              op_types_to_quantize=("MatMul",))
    quant = mnb.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
    quant.process()
    return quant.model.model


def _build(inputs: Inputs, config: Int8Dynamic, tmp: Path) -> BuildResult:
    if config.smoothing.enabled:  # the default: it finds its own exclusions
        return _smoothed(inputs, config, tmp)
    parent_dir = inputs.dir
    graph = onnx_io.load(parent_dir, load_external_data=False)  # the graph alone
    tied = config.quantize_tied and find_tied(graph) is not None
    exclude = list(config.nodes_to_exclude) + (onnx_io.lm_head_nodes(graph) if tied else [])
    compat.quiet_ort_quantizers()
    with onnx_io.weights_from(parent_dir):
        q = _matmulnbits(graph, config, exclude)
        shared = share_quantized_table(q, 8, config.tied_block_size, config.accuracy_level) if tied else None
    onnx_io.save_ir(onnx_io.to_ir(q, parent_dir.resolve()), tmp)  # the weights it kept, from the parent
    policy = {"format": "matmulnbits", "weights": f"int8 symmetric blocks of {config.block_size} (MatMulNBits)",
              "activations": f"quantized inside the kernel (accuracy_level {config.accuracy_level})"
              if config.accuracy_level == 4 else "float32", "ops": ["MatMulNBits"],
              "tied_embedding": shared or "fp32 (not quantized)", "excluded_nodes": exclude}
    return BuildResult(metrics={"op_counts": onnx_io.op_counts(q)},
                       extra={"precision": "int8-dynamic", "kv_dtype": "float32", "quant_policy": policy})


def _smoothed(inputs: Inputs, config: Int8Dynamic, tmp: Path) -> BuildResult:
    from pipeline.quant.weight_only import quantize_with_imatrix

    fields, metrics, uses = quantize_with_imatrix(
        inputs, tmp, "int8_dynamic.smoothing", nodes_to_exclude=config.nodes_to_exclude, bits=8,
        block_size=config.block_size, accuracy_level=config.accuracy_level, smooth_alpha=config.smoothing.alpha,
        tied=(8, config.tied_block_size) if config.quantize_tied else None)
    policy = {"format": "matmulnbits", "weights": f"int8 symmetric blocks of {config.block_size} (MatMulNBits)",
              "activations": f"quantized inside the kernel (accuracy_level {config.accuracy_level})"
              if config.accuracy_level == 4 else "float32", "ops": ["MatMulNBits"], **fields}
    return BuildResult(metrics=metrics, extra={"precision": "int8-dynamic", "kv_dtype": "float32",
                                               "quant_policy": policy, "uses": uses})



def build(inputs: Inputs, config: Int8Dynamic, tmp: Path) -> BuildResult:
    from pipeline.quant import imatrix

    return imatrix.with_kv_cache(inputs, config.kv_cache, tmp, _build(inputs, config, tmp), "int8_dynamic")


STAGE = OnnxStage(name="int8-dynamic", verb="quantize", mode="dynamic", section="int8_dynamic", config=Int8Dynamic,
                  build=build, parents=("export", "fused"), uses=("imatrix",),
                  flags={"--block-size": ("block_size", "weights per quantization block")},
                  tunable=("block_size", "accuracy_level", "tied_block_size", "smoothing.enabled", "smoothing.alpha"),
                  precision="int8", summary="INT8 weights (MatMulNBits, 8-bit blocks), activations quantized inside the kernel")