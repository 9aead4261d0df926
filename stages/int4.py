"""Stage `int4`: weight-only 4-bit ``MatMulNBits`` (the format onnxruntime-genai's builder uses for Qwen3
on CPU). The tied embedding / lm_head is stored once as ``tied_bits`` blocks shared by
GatherBlockQuantized + MatMulNBits.

Algorithms: ``rtn`` and ``k_quant`` are ORT's MatMulNBitsQuantizer (scales from the weights alone);
``imatrix`` weighs each block's rounding by the importance matrix (stage imatrix), as llama.cpp does;
``awq`` first scales each projection's input channels by mean(x^2)^(alpha/2), folded exactly into the
RMSNorm gammas and up_proj (pipeline/quant/weight_only.py), then does the same; ``gptq`` scales as awq,
then rounds each block one input channel at a time, pushing each channel's error onto the channels not
yet rounded through the input's inverse Hessian (pipeline/quant/gptq.py). ``int8_fraction`` keeps
the most sensitive share of projections at 8 bits (mixed precision, like llama.cpp's Q4_K_M)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from pipeline import compat
from pipeline.errors import PipelineError
from pipeline.graph import onnx_io
from pipeline.graph.tied import find_tied, share_quantized_table
from pipeline.onnx_post import OnnxStage
from pipeline.runner import BuildResult, Inputs
from pipeline.schema import PosInt, Section, power_of_two

# Algorithms that read the importance matrix (stage imatrix).
CALIBRATED_INT4 = ("imatrix", "awq", "gptq")
SCALED_INT4 = ("awq", "gptq")  # those that scale the input channels by awq_alpha first


class Int4(Section):
    parent: Literal["export", "fused"]
    # rtn / k_quant: ORT's MatMulNBitsQuantizer; imatrix / awq: pipeline/quant/nbits.py with the importance
    # matrix (awq also scales input channels by it first, folded into the graph; gptq scales as awq, then
    # rounds with the inputs' Hessians on the imatrix's calibration tokens)
    algorithm: Literal["rtn", "k_quant", "imatrix", "awq", "gptq"]
    awq_alpha: float = Field(0.75, ge=0, le=1)
    int8_fraction: float = Field(0.0, ge=0, le=1)  # imatrix/awq: this share of projections, the most sensitive, 8-bit
    block_size: int
    symmetric: bool
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]]
    quantize_tied: bool
    tied_bits: Literal[4, 8] = 4
    nodes_to_exclude: list[str]
    kv_cache: Literal["float32", "int8"] = "float32"  # int8: ORT's quantized GQA cache, scales from the imatrix
    greedy_tokens: int = PosInt

    _block = field_validator("block_size")(power_of_two)

    def inert(self) -> set[str]:
        """Keys that change nothing given the others (see Int8Dynamic.inert)."""
        return ({"awq_alpha"} if self.algorithm not in SCALED_INT4 else set()) | ({"tied_bits"} if not self.quantize_tied else set())

    @model_validator(mode="after")
    def _ours_symmetric(self):
        if self.algorithm in CALIBRATED_INT4 and not self.symmetric:
            raise ValueError(f"int4.algorithm {self.algorithm} quantizes symmetrically (set symmetric: true)")
        if self.int8_fraction and self.algorithm not in CALIBRATED_INT4:
            raise ValueError("int4.int8_fraction needs algorithm imatrix, awq or gptq (it ranks projections by "
                             "the importance matrix)")
        return self



def _algo_config(config: Int4):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    common = {"op_types_to_quantize": ("MatMul",)}
    if config.algorithm == "k_quant":
        return mnb.KQuantWeightOnlyQuantConfig(**common)
    return mnb.DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric,
                                            accuracy_level=config.accuracy_level, **common)


def _build(inputs: Inputs, config: Int4, tmp: Path) -> BuildResult:
    if config.algorithm in CALIBRATED_INT4:
        return _calibrated(inputs, config, tmp)
    parent_dir = inputs.dir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # the graph alone: each weight is read from the parent's file as it is quantized
    model = onnx_io.load(parent_dir, load_external_data=False)
    tied = config.quantize_tied and find_tied(model) is not None
    exclude = list(config.nodes_to_exclude) + (onnx_io.lm_head_nodes(model) if tied else [])
    compat.quiet_ort_quantizers()
    with onnx_io.weights_from(parent_dir), compat.unused_inputs_hidden(model) as put_back:
        # k_quant's config has no block size or symmetry: the quantizer's own arguments give them
        quant = MatMulNBitsQuantizer(model, block_size=config.block_size, is_symmetric=config.symmetric,
                                     accuracy_level=config.accuracy_level, nodes_to_exclude=exclude,
                                     algo_config=_algo_config(config))
        try:
            quant.process()
        except ImportError as exc:
            raise PipelineError(f"int4.algorithm {config.algorithm} needs a package that is not "
                                f"installed ({exc.name}); use algorithm: rtn") from None
        q = put_back(quant.model.model)
    with onnx_io.weights_from(parent_dir):
        shared = share_quantized_table(q, config.tied_bits, config.block_size, config.accuracy_level) if tied else None
    onnx_io.save_ir(onnx_io.to_ir(q, parent_dir.resolve()), tmp)  # the weights it kept, copied from the parent
    policy = {"weights": f"int4 {'symmetric' if config.symmetric else 'asymmetric'} blocks of "
                         f"{config.block_size} ({config.algorithm})",
              "activations": "float32", "tied_embedding": shared or "fp32 (not quantized)",
              "accuracy_level": config.accuracy_level, "excluded_nodes": exclude}
    return BuildResult(metrics={"op_counts": onnx_io.op_counts(q)},
                       extra={"precision": "int4", "kv_dtype": "float32", "quant_policy": policy})


def _calibrated(inputs: Inputs, config: Int4, tmp: Path) -> BuildResult:
    """``imatrix`` / ``awq`` / ``gptq``: our quantizer (pipeline/quant/nbits.py, gptq.py) with the importance matrix."""
    from pipeline.quant.weight_only import quantize_with_imatrix

    fields, metrics, uses = quantize_with_imatrix(
        inputs, tmp, f"int4.algorithm {config.algorithm}", nodes_to_exclude=config.nodes_to_exclude, bits=4,
        block_size=config.block_size, accuracy_level=config.accuracy_level, weighted=True,
        awq_alpha=config.awq_alpha if config.algorithm in SCALED_INT4 else None, int8_fraction=config.int8_fraction,
        tied=(config.tied_bits, config.block_size) if config.quantize_tied else None,
        gptq=config.algorithm == "gptq")
    policy = {"weights": f"int4 symmetric blocks of {config.block_size} ({config.algorithm}: importance-weighted "
                         "scales" + (f", input channels scaled by mean(x^2)^({config.awq_alpha}/2)"
                                     if config.algorithm in SCALED_INT4 else "")
                         + (", rounded by GPTQ with the inputs' Hessians" if config.algorithm == "gptq" else "") + ")",
              "activations": "float32", "accuracy_level": config.accuracy_level, **fields}
    return BuildResult(metrics=metrics, extra={"precision": "int4", "kv_dtype": "float32", "quant_policy": policy,
                                               "uses": uses})



def build(inputs: Inputs, config: Int4, tmp: Path) -> BuildResult:
    from pipeline.quant import imatrix

    return imatrix.with_kv_cache(inputs, config.kv_cache, tmp, _build(inputs, config, tmp), "int4")


STAGE = OnnxStage(name="int4", verb="quantize", mode="int4", section="int4", config=Int4, build=build,
                  parents=("export", "fused"), uses=("imatrix",),
                  flags={"--block-size": ("block_size", "weights per quantization block"),
                         "--symmetric": ("symmetric", "symmetric blocks", "--asymmetric"),
                         "--algorithm": ("algorithm", "rtn | k_quant | imatrix | awq | gptq")},
                  tunable=("algorithm", "block_size", "symmetric", "accuracy_level", "awq_alpha", "tied_bits",
                           "int8_fraction"),
                  precision="int4", summary="INT4 weight-only, block-wise (MatMulNBits, the format onnxruntime-genai uses)")