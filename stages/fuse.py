"""Stage `fused`: ORT's transformer optimizer (model_type qwen3) fuses the RMSNorms (SimplifiedLayerNorm,
SkipSimplifiedLayerNorm); then our rewrite pattern (pipeline/fusions.py) turns each layer's attention,
QK-norm'd, into one GroupQueryAttention with the rotary embedding inside (caches of
``max_position_embeddings`` rows) and a KV cache that past and present can share.

The rotary caches follow the config's ``rope_scaling`` (YaRN, linear; another type is refused in one
line before any work). The lm_head gets an optional ``logits_to_keep`` input (pipeline/fusions.py
``select_logits``), so every artifact built on this one can compute logits for the last position of a
prompt only.

Heads and hidden size come from the checkpoint config. If ORT's optimizer fuses a RotaryEmbedding
(other exports), its 131072-row caches are cut to ``max_position_embeddings`` too."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from pipeline import compat, onnx_io, store
from pipeline.errors import PipelineError
from pipeline.runner import BuildResult, Inputs, Stage
from pipeline.schema import Fused
from pipeline.fusions import fuse_attention, rotary_caches, select_logits
from pipeline.tied import retie_embedding

FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
             "Attention", "MultiHeadAttention", "GroupQueryAttention")


def trim_rotary_caches(model, max_positions: int) -> dict:
    """Slice every RotaryEmbedding cos/sin cache initializer of an onnx-ir model to ``max_positions`` rows."""
    import onnx_ir as ir

    trimmed = {}
    for node in model.graph:
        if node.op_type != "RotaryEmbedding":
            continue
        for value in node.inputs[2:4]:
            tensor = value.const_value if value is not None else None
            if tensor is None or value.name in trimmed or tensor.shape[0] <= max_positions:
                continue
            value.const_value = ir.tensor(np.ascontiguousarray(tensor.numpy()[:max_positions]), name=value.name)
            trimmed[value.name] = [int(d) for d in value.const_value.shape]
    return trimmed


def build(inputs: Inputs, config: Fused, tmp: Path) -> BuildResult:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_by_onnxruntime, optimize_model

    parent_dir = inputs.dir

    model_config = json.loads((parent_dir / "config.json").read_text())
    compat.quiet_ort_quantizers()
    layers = int(model_config["num_hidden_layers"])
    if config.attention == "gqa" and model_config.get("use_sliding_window"):
        raise PipelineError("the checkpoint uses sliding-window attention, which the GQA fusion does not carry "
                            "over: set fused.attention: none")
    if config.attention == "gqa":
        rotary_caches(model_config, 1)  # an unsupported rope_scaling is refused before any work
    with store.scratch_dir(tmp, "ort") as scratch:
        scratch = Path(scratch).resolve()
        # ORT's graph optimizations (constant folding, which its fusions need) run in an ORT session
        # that writes its result with external data; the fusions then see the graph alone, and the
        # weights stay on disk until onnx-ir streams them into the artifact. (optimize_model would
        # load every weight into a ModelProto, then copy them: 6x the model's bytes at 0.6B.)
        optimized = optimize_by_onnxruntime(str(parent_dir / onnx_io.MODEL), use_gpu=False,
                                            optimized_model_path=str(scratch / onnx_io.MODEL),
                                            opt_level=config.opt_level,
                                            disabled_optimizers=["ConstantSharing"], save_as_external_data=True)
        # Its symbolic shape inference reads a few small initializers (norm weights) by a path relative
        # to the working directory: run it from the one holding the weights.
        with onnx_io.weights_from(scratch), contextlib.redirect_stdout(io.StringIO()):
            optimizer = optimize_model(onnx.load(optimized, load_external_data=False),
                                       model_type=config.model_type, num_heads=int(model_config["num_attention_heads"]),
                                       hidden_size=int(model_config["hidden_size"]), opt_level=0, use_gpu=False)
        model = onnx_io.to_ir(optimizer.model, scratch)
        del optimizer
        gqa = 0
        if config.attention == "gqa":
            model, gqa = fuse_attention(model, model_config, int(model_config["max_position_embeddings"]))
        if config.attention == "gqa" and gqa != layers:
            raise PipelineError(f"fused {gqa} of {layers} attention blocks into GroupQueryAttention: the export's "
                                f"attention is not the pattern pipeline/fusions.py knows (set fused.attention: none)")
        trimmed = trim_rotary_caches(model, int(model_config["max_position_embeddings"]))
        selected = select_logits(model)
        if not selected:
            raise PipelineError("the lm_head (the MatMul making `logits`) was not found: the export is not the "
                                "causal-LM graph pipeline/fusions.py knows")
        retied = retie_embedding(model)
        onnx_io.save_ir(model, tmp)
        del model
    graph = onnx_io.load(tmp, load_external_data=False)
    counts = onnx_io.op_counts(graph)
    fused = {op: counts.get(op, 0) for op in FUSED_OPS}
    return BuildResult(metrics={"fused_ops": fused, "op_counts": counts, "rotary_caches_trimmed_to": trimmed,
                                "retied_initializers": retied,
                                "logits_to_keep_input": bool(selected)},
                       extra={"precision": "fp32", "kv_dtype": "float32", "attention": config.attention})


STAGE = Stage(name="fused", section="fused", config=Fused, build=build, parents=("export",),
              require_greedy_match=True, keep_outputs=True,
              precision="fp32", summary="FP32, fused: RMSNorm / SkipRMSNorm and one GroupQueryAttention per layer (rotary inside, "
                      "shareable KV buffer), lm_head on the positions asked for (`logits_to_keep`)")
