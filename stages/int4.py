"""Stage `int4`: weight-only 4-bit ``MatMulNBits`` via ORT's MatMulNBitsQuantizer (block-wise RTN; the
format onnxruntime-genai's builder uses for Qwen3 on CPU). The tied embedding / lm_head is stored
once as 4-bit blocks shared by GatherBlockQuantized + MatMulNBits."""

from __future__ import annotations

from pathlib import Path

from pipeline import compat, onnx_io
from pipeline.runner import BuildResult, Inputs, Stage
from pipeline.schema import Int4
from pipeline.errors import PipelineError
from pipeline.tied import find_tied, share_quantized_table


def _algo_config(config: Int4):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    common = {"op_types_to_quantize": ("MatMul",)}
    if config.algorithm == "k_quant":
        return mnb.KQuantWeightOnlyQuantConfig(**common)
    return mnb.DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric,
                                            accuracy_level=config.accuracy_level, **common)


def build(inputs: Inputs, config: Int4, tmp: Path) -> BuildResult:
    parent_dir = inputs.dir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # the graph alone: each weight is read from the parent's file as it is quantized
    model = onnx_io.load(parent_dir, load_external_data=False)
    tied = config.quantize_tied and find_tied(model) is not None
    exclude = list(config.nodes_to_exclude) + (onnx_io.lm_head_nodes(model) if tied else [])
    compat.quiet_ort_quantizers()
    with onnx_io.weights_from(parent_dir):
        quant = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=_algo_config(config))
        try:
            quant.process()
        except ImportError as exc:
            raise PipelineError(f"int4.algorithm {config.algorithm} needs a package that is not "
                                f"installed ({exc.name}); use algorithm: rtn") from None
        q = quant.model.model
        shared = share_quantized_table(q, 4, config.block_size, config.accuracy_level) if tied else None
    onnx_io.save_ir(onnx_io.to_ir(q, parent_dir.resolve()), tmp)  # the weights it kept, copied from the parent
    policy = {"weights": f"int4 {'symmetric' if config.symmetric else 'asymmetric'} blocks of "
                         f"{config.block_size} ({config.algorithm})",
              "activations": "float32", "tied_embedding": shared or "fp32 (not quantized)",
              "accuracy_level": config.accuracy_level, "excluded_nodes": exclude}
    return BuildResult(metrics={"op_counts": onnx_io.op_counts(q)},
                       extra={"precision": "int4", "kv_dtype": "float32", "quant_policy": policy})


STAGE = Stage(name="int4", section="int4", config=Int4, build=build, parents=("export", "fused"),
              precision="int4", summary="INT4 weight-only, block-wise (MatMulNBits, the format onnxruntime-genai uses)")