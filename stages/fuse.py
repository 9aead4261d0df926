"""Stage `fused`: ORT's transformer optimizer (model_type qwen3) fuses the RMSNorms (SimplifiedLayerNorm,
SkipSimplifiedLayerNorm); then our rewrite pattern (pipeline/fusions.py) turns each layer's attention,
QK-norm'd, into one GroupQueryAttention with the rotary embedding inside (caches of
``max_position_embeddings`` rows) and a KV cache that past and present can share.

Heads and hidden size come from the checkpoint config. If ORT's optimizer fuses a RotaryEmbedding
(other exports), its 131072-row caches are cut to ``max_position_embeddings`` too."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline import onnx_io
from pipeline.derive import derive
from pipeline.errors import PipelineError
from pipeline.fusions import fuse_attention
from pipeline.tied import retie_embedding

FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
             "Attention", "MultiHeadAttention", "GroupQueryAttention")


def trim_rotary_caches(model, max_positions: int) -> dict:
    """Slice every RotaryEmbedding cos/sin cache initializer to ``max_positions`` rows."""
    from onnx import numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    trimmed = {}
    for node in model.graph.node:
        if node.op_type != "RotaryEmbedding":
            continue
        for name in node.input[2:4]:
            tensor = init.get(name)
            if tensor is None or name in trimmed or tensor.dims[0] <= max_positions:
                continue
            arr = numpy_helper.to_array(tensor)[:max_positions]
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            trimmed[name] = [int(d) for d in tensor.dims]
    return trimmed


def run(params: dict, parent_dir: str | Path, out: str | Path, evaluation: dict | None = None) -> dict:
    """``evaluation`` = {text, reference, params}: score the artifact when built (see pipeline.derive)."""

    def build(parent_dir: Path, parent: dict, tmp: Path) -> dict:
        from onnxruntime.transformers.optimizer import optimize_model

        config = json.loads((parent_dir / "config.json").read_text())
        logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)
        optimizer = optimize_model(str(parent_dir / onnx_io.MODEL), model_type=params["model_type"],
                                   num_heads=int(config["num_attention_heads"]), hidden_size=int(config["hidden_size"]),
                                   opt_level=int(params["opt_level"]), use_gpu=False)
        model = optimizer.model
        del optimizer
        layers = int(config["num_hidden_layers"])
        if params["attention"] == "gqa" and config.get("use_sliding_window"):
            raise PipelineError("the checkpoint uses sliding-window attention, which the GQA fusion does not carry "
                                "over: set fused.attention: none")
        gqa = 0
        if params["attention"] == "gqa":
            model, gqa = fuse_attention(model, config, int(config["max_position_embeddings"]))
        if params["attention"] == "gqa" and gqa != layers:
            raise PipelineError(f"fused {gqa} of {layers} attention blocks into GroupQueryAttention: the export's "
                                f"attention is not the pattern pipeline/fusions.py knows (set fused.attention: none)")
        trimmed = trim_rotary_caches(model, int(config["max_position_embeddings"]))
        retied = retie_embedding(model)
        onnx_io.save(model, tmp)
        counts = onnx_io.op_counts(model)
        fused = {op: counts.get(op, 0) for op in FUSED_OPS}
        return {"metrics": {"fused_ops": fused, "op_counts": counts, "rotary_caches_trimmed_to": trimmed,
                            "retied_initializers": retied},
                "extra": {"precision": "fp32", "kv_dtype": "float32", "attention": params["attention"]}}

    return derive(parent_dir, out, "fused", params, build, parents=("export",),
                  require_greedy_match=True, greedy_tokens=int(params["greedy_tokens"]), evaluation=evaluation)
