"""Stage `fused`: ORT's transformer optimizer (the family's ``ort_optimizer``) fuses the RMSNorms (SimplifiedLayerNorm,
SkipSimplifiedLayerNorm); then our rewrite pattern (pipeline/graph/fusions.py) turns each layer's attention,
QK-norm'd, into one GroupQueryAttention with the rotary embedding inside (caches of
``max_position_embeddings`` rows) and a KV cache that past and present can share.

The rotary caches follow the config's ``rope_scaling`` (YaRN, linear; another type is refused in one
line before any work). The lm_head gets an optional ``logits_to_keep`` input (pipeline/graph/fusions.py
``select_logits``), so every artifact built on this one can compute logits for the last position of a
prompt only.

Heads and hidden size come from the checkpoint config. If ORT's optimizer fuses a RotaryEmbedding
(other exports), its 131072-row caches are cut to ``max_position_embeddings`` too."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline import compat, families
from pipeline.errors import PipelineError
from pipeline.graph import onnx_io
from pipeline.graph.fusions import fuse_attention, rotary_caches, select_logits
from pipeline.graph.tied import retie_embedding
from pipeline.log import info
from pipeline.onnx_post import OnnxStage
from pipeline.ops import store
from pipeline.runner import BuildResult, Inputs
from pipeline.schema import PosInt, Section


class Fused(Section):
    opt_level: Literal[0, 1, 2, 99]
    attention: Literal["gqa", "none"]
    greedy_tokens: int = PosInt


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


def withhold_weights(graph) -> tuple:
    """(graph, {name: external-data entries}): ``graph`` (loaded without its weights) with every
    initializer of 2+ dimensions stored in its data file turned into a graph input of its type and shape
    (what is withheld is only read back afterwards, never changed)."""
    from onnx import TensorProto, helper

    withheld = {}
    keep = []
    for t in graph.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL and len(t.dims) >= 2:
            withheld[t.name] = (t.data_type, list(t.dims), {e.key: e.value for e in t.external_data})
            graph.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(keep)
    return graph, withheld


def restore_weights(model, withheld: dict, weights_dir: Path) -> None:
    """Put :func:`withhold_weights`' tensors back, in an onnx-ir model, as initializers read lazily from
    ``weights_dir`` (the parent's data file: nothing is copied until the artifact is written)."""
    import onnx_ir as ir

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    for name, (dtype, dims, ext) in withheld.items():
        value = inputs.get(name)
        if value is None:  # dropped by the optimizer: nothing reads it
            continue
        graph.inputs.remove(value)
        if not value.uses():  # a weight the optimizer left unused (it was unused in the export too)
            continue
        value.const_value = ir.ExternalTensor(ext["location"], int(ext.get("offset", 0)),
                                              int(ext["length"]) if "length" in ext else None,
                                              ir.DataType(dtype), shape=ir.Shape(dims), name=name,
                                              base_dir=str(weights_dir))
        graph.register_initializer(value)


def build(inputs: Inputs, config: Fused, tmp: Path) -> BuildResult:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_by_onnxruntime, optimize_model

    parent_dir = inputs.dir

    model_config = json.loads((parent_dir / "config.json").read_text())
    compat.quiet_ort_quantizers()
    layers = int(model_config["num_hidden_layers"])
    family = families.of(model_config, f"{parent_dir}")
    if config.attention == "gqa" and (why := family.unfusable(model_config)):
        raise PipelineError(f"the fused attention (one GroupQueryAttention per layer, one window for every layer, "
                            f"as Mistral's) cannot compute this checkpoint's: {why}. Set fused.attention: none")
    if config.attention == "gqa":
        rotary_caches(model_config, 1)  # an unsupported rope_scaling is refused before any work
    with store.scratch_dir(tmp, "ort") as scratch:
        scratch = Path(scratch).resolve()
        # ORT's graph optimizations (constant folding, which its fusions need) run in an ORT session
        # that writes its result; the fusions then see the graph alone, and the weights stay on disk until
        # onnx-ir streams them into the artifact. (optimize_model would load every weight into a
        # ModelProto, then copy them, several times the model's bytes.) The session is given the graph with
        # its projection and embedding tables withheld (graph inputs of the same type and shape): nothing
        # of ORT's basic level rewrites a weight matrix except by folding a copy of the tied table's
        # transpose, which the retie below removes again, and a session holding every weight copies
        # them all (anonymous memory the size of the model: docs/real-shapes.md). They are put back after.
        skeleton, withheld = withhold_weights(onnx_io.load(parent_dir, load_external_data=False))
        skeleton = onnx_io.beside_weights(skeleton, parent_dir, scratch / "in")  # the small ones are read from it
        optimized = optimize_by_onnxruntime(str(skeleton), use_gpu=False,
                                            optimized_model_path=str(scratch / onnx_io.MODEL),
                                            opt_level=config.opt_level,
                                            disabled_optimizers=["ConstantSharing"], save_as_external_data=True)
        shutil.rmtree(skeleton.parent)  # its link to the parent's data (onnx-ir reads no linked file)
        # Its symbolic shape inference reads a few small initializers (norm weights) by a path relative
        # to the working directory: run it from the one holding the weights.
        with onnx_io.weights_from(scratch), contextlib.redirect_stdout(io.StringIO()):
            optimizer = optimize_model(onnx.load(optimized, load_external_data=False),
                                       model_type=family.ort_optimizer, num_heads=int(model_config["num_attention_heads"]),
                                       hidden_size=int(model_config["hidden_size"]), opt_level=0, use_gpu=False)
        model = onnx_io.to_ir(optimizer.model, scratch)
        del optimizer
        restore_weights(model, withheld, parent_dir.resolve())
        gqa = packed = 0
        if config.attention == "gqa":
            model, gqa, packed = fuse_attention(model, model_config, int(model_config["max_position_embeddings"]),
                                                family)
        if config.attention == "gqa" and gqa != layers:
            raise PipelineError(f"fused {gqa} of {layers} attention blocks into GroupQueryAttention: the export's "
                                f"attention is not the pattern pipeline/graph/fusions.py knows (set fused.attention: none)")
        if gqa and packed != gqa:  # exact either way; only slower (three MatMuls per layer instead of one)
            info(f"note: q/k/v packed into one MatMul in {packed} of {gqa} layers: the export's projections are "
                 f"not the {family.projections!r} form pipeline/families/{family.model_type}.py declares")
        trimmed = trim_rotary_caches(model, int(model_config["max_position_embeddings"]))
        selected = select_logits(model)
        if not selected:
            raise PipelineError("the lm_head (the MatMul making `logits`) was not found: the export is not the "
                                "causal-LM graph pipeline/graph/fusions.py knows")
        retied = retie_embedding(model)
        onnx_io.save_ir(model, tmp)
        del model
    graph = onnx_io.load(tmp, load_external_data=False)
    counts = onnx_io.op_counts(graph)
    fused = {op: counts.get(op, 0) for op in FUSED_OPS}
    return BuildResult(metrics={"fused_ops": fused, "op_counts": counts, "rotary_caches_trimmed_to": trimmed,
                                "retied_initializers": retied, "packed_qkv_layers": packed,
                                "logits_to_keep_input": bool(selected)},
                       extra={"precision": "fp32", "kv_dtype": "float32", "attention": config.attention})


STAGE = OnnxStage(name="fused", verb="fuse", section="fused", config=Fused, build=build, parents=("export",),
                  require_greedy_match=True, keep_outputs=True,
                  precision="fp32", summary="FP32, fused: RMSNorm / SkipRMSNorm and one GroupQueryAttention per layer (rotary inside, "
                      "shareable KV buffer), lm_head on the positions asked for (`logits_to_keep`)")
