"""Stage `int4`: weight-only 4-bit ``MatMulNBits`` via ORT's MatMulNBitsQuantizer (block-wise RTN; the
format onnxruntime-genai's builder uses for Qwen3 on CPU). The tied embedding / lm_head is stored
once as 4-bit blocks shared by GatherBlockQuantized + MatMulNBits."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import onnx_io
from pipeline.derive import derive
from pipeline.errors import PipelineError
from pipeline.tied import find_tied, share_quantized_table


def _algo_config(params: dict):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    algorithm = params.get("algorithm", "rtn")
    common = {"op_types_to_quantize": ("MatMul",)}
    if algorithm == "rtn":
        return mnb.DefaultWeightOnlyQuantConfig(block_size=int(params["block_size"]),
                                                is_symmetric=bool(params["symmetric"]),
                                                accuracy_level=params.get("accuracy_level"), **common)
    if algorithm == "k_quant":
        return mnb.KQuantWeightOnlyQuantConfig(**common)
    raise PipelineError(f"unknown int4.algorithm {algorithm!r}: use rtn or k_quant")


def run(params: dict, parent_dir: str | Path, out: str | Path, evaluation: dict | None = None) -> dict:
    """``evaluation`` = {text, reference, params}: score the artifact when built (see pipeline.derive)."""
    def build(parent_dir: Path, parent: dict, tmp: Path) -> dict:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # the graph alone: each weight is read from the parent's file as it is quantized
        model = onnx_io.load(parent_dir, load_external_data=False)
        tied = bool(params["quantize_tied"]) and find_tied(model) is not None
        exclude = list(params.get("nodes_to_exclude") or []) + (onnx_io.lm_head_nodes(model) if tied else [])
        logging.getLogger().setLevel(logging.ERROR)
        # and the quantizer's own logger, which has a handler of its own: one INFO line per MatMul
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        with onnx_io.weights_from(parent_dir):
            quant = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=_algo_config(params))
            try:
                quant.process()
            except ImportError as exc:
                raise PipelineError(f"int4.algorithm {params.get('algorithm')} needs a package that is not "
                                    f"installed ({exc.name}); use algorithm: rtn") from None
            q = quant.model.model
            shared = share_quantized_table(q, 4, int(params["block_size"]), params.get("accuracy_level")) if tied else None
        onnx_io.save_ir(onnx_io.to_ir(q, parent_dir.resolve()), tmp)  # the weights it kept, copied from the parent
        policy = {"weights": f"int4 {'symmetric' if params['symmetric'] else 'asymmetric'} blocks of "
                             f"{params['block_size']} ({params.get('algorithm', 'rtn')})",
                  "activations": "float32", "tied_embedding": shared or "fp32 (not quantized)",
                  "accuracy_level": params.get("accuracy_level"), "excluded_nodes": exclude}
        return {"metrics": {"op_counts": onnx_io.op_counts(q)},
                "extra": {"precision": "int4", "kv_dtype": "float32", "quant_policy": policy}}

    return derive(parent_dir, out, "int4", params, build, greedy_tokens=int(params["greedy_tokens"]),
                  evaluation=evaluation)
