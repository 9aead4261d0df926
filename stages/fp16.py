"""Stage `fp16`: the GPU artifact, via ORT's ``OnnxModel.convert_float_to_float16``.

Policy (recorded in the manifest): weights and KV cache in float16; ``logits`` kept float32 so
scoring/sampling see full-precision values; ops in ``fp16.op_block_list`` stay float32 (by default
only ORT's own default block list). The graph stays valid on the CPU EP, so it is checked here."""

from __future__ import annotations

from pathlib import Path

from pipeline import onnx_io
from pipeline.derive import derive


def run(params: dict, parent_dir: str | Path, out: str | Path, evaluation: dict | None = None) -> dict:
    """``evaluation`` = {text, reference, params}: score the artifact when built (see pipeline.derive)."""
    def build(parent_dir: Path, parent: dict, tmp: Path) -> dict:
        from onnxruntime.transformers import float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        model = OnnxModel(onnx_io.load(parent_dir))
        keep_io = list(params.get("keep_io_types") or [])
        block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(params.get("op_block_list") or []))
        model.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=keep_io, op_block_list=block,
                                       node_block_list=list(params.get("node_block_list") or []))
        onnx_io.save(model.model, tmp)
        io_types = {v.name: _elem(v) for v in list(model.model.graph.input) + list(model.model.graph.output)}
        kv = next((t for n, t in io_types.items() if n.startswith("past_key_values")), None)
        policy = {"io_types": io_types, "kv_dtype": kv, "keep_io_types": keep_io,
                  "op_block_list_extra": list(params.get("op_block_list") or []),
                  "node_block_list": list(params.get("node_block_list") or [])}
        return {"metrics": {"op_counts": onnx_io.op_counts(model.model)},
                "extra": {"precision": "fp16", "kv_dtype": kv, "fp16_policy": policy}}

    return derive(parent_dir, out, "fp16", params, build, greedy_tokens=int(params["greedy_tokens"]),
                  evaluation=evaluation)


def _elem(value_info) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()
