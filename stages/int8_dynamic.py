"""Stage `int8-dynamic`: ``quantize_dynamic``, per-channel INT8 weights on the projection MatMuls.

Embedding / tied lm_head policy (``quantize_tied``): the table is stored once as 8-bit blocks and
shared by GatherBlockQuantized + MatMulNBits (see pipeline/tied.py); with ``quantize_tied: false``
it stays FP32. Both were measured (README); quantizing it is what meets the size budget."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import onnx_io, store
from pipeline.derive import derive
from pipeline.tied import find_tied, share_quantized_table


def run(params: dict, parent_dir: str | Path, out: str | Path, evaluation: dict | None = None) -> dict:
    """``evaluation`` = {text, reference, params}: score the artifact when built (see pipeline.derive)."""
    def build(parent_dir: Path, parent: dict, tmp: Path) -> dict:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        model = onnx_io.load(parent_dir, load_external_data=False)
        tied = bool(params["quantize_tied"]) and find_tied(model) is not None
        exclude = list(params.get("nodes_to_exclude") or []) + (onnx_io.lm_head_nodes(model) if tied else [])
        logging.getLogger().setLevel(logging.ERROR)  # ORT's "please pre-process" advice on every call
        with store.scratch_dir(tmp, "int8d") as scratch:
            quantize_dynamic(str(parent_dir / onnx_io.MODEL), str(Path(scratch) / "model.onnx"),
                             per_channel=bool(params["per_channel"]), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
            q = onnx_io.load(scratch)
        shared = share_quantized_table(q, 8, int(params["tied_block_size"])) if tied else None
        onnx_io.save(q, tmp)
        policy = {"weights": "int8 symmetric" + (" per-channel" if params["per_channel"] else " per-tensor"),
                  "activations": "uint8 dynamic (per tensor, at run time)", "ops": ["MatMul (constant B)"],
                  "tied_embedding": shared or "fp32 (not quantized)", "excluded_nodes": exclude}
        return {"metrics": {"op_counts": onnx_io.op_counts(q)},
                "extra": {"precision": "int8-dynamic", "kv_dtype": "float32", "quant_policy": policy}}

    return derive(parent_dir, out, "int8-dynamic", params, build, greedy_tokens=int(params["greedy_tokens"]),
                  evaluation=evaluation)
