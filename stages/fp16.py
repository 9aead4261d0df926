"""Stage `fp16`: the GPU artifact, via ORT's ``OnnxModel.convert_float_to_float16``.

Policy (recorded in the manifest): weights and KV cache in float16; ``logits`` kept float32 so
scoring/sampling see full-precision values; ops in ``fp16.op_block_list`` stay float32 (by default
only ORT's own default block list). The graph stays valid on the CPU EP, so it is checked here."""

from __future__ import annotations

from pathlib import Path

from onnx import TensorProto

from pipeline import compat
from pipeline.graph import onnx_io
from pipeline.onnx_post import OnnxStage
from pipeline.runner import BuildResult, Inputs
from pipeline.schema import PosInt, Section


class FP16(Section):
    keep_io_types: list[str]
    op_block_list: list[str]
    node_block_list: list[str]
    greedy_tokens: int = PosInt



def build(inputs: Inputs, config: FP16, tmp: Path) -> BuildResult:
    parent_dir = inputs.dir
    from onnxruntime.transformers.onnx_model import OnnxModel

    # ORT's converter runs on the graph alone (weights left on disk): it rewrites the graph and
    # retypes every converted initializer, and for one stored externally it only changes the type.
    # Those are converted here, one tensor at a time as onnx-ir writes them, with ORT's own
    # float16 rounding. (On the whole ModelProto it held the weights three times over.)
    proto = onnx_io.load(parent_dir, load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT
                and t.data_location == TensorProto.EXTERNAL}
    model = OnnxModel(proto)
    keep_io = list(config.keep_io_types)
    # Its shape inference reads a few small initializers by a path relative to the working directory.
    with onnx_io.weights_from(parent_dir), compat.ort_float16_on_graph_alone() as float16:
        block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(config.op_block_list))
        model.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=keep_io, op_block_list=block,
                                       node_block_list=list(config.node_block_list))
    graph = model.model
    retyped = {t.name for t in graph.graph.initializer if t.name in external and t.data_type == TensorProto.FLOAT16}
    io_types = {v.name: _elem(v) for v in list(graph.graph.input) + list(graph.graph.output)}
    counts = onnx_io.op_counts(graph)
    ir_model = onnx_io.to_ir(graph, parent_dir.resolve())
    del model, graph, proto
    for name in retyped:
        value = ir_model.graph.initializers[name]
        value.const_value = _to_float16(value.const_value, float16.convert_np_to_float16)
    onnx_io.save_ir(ir_model, tmp)
    kv = next((t for n, t in io_types.items() if n.startswith("past_key_values")), None)
    policy = {"io_types": io_types, "kv_dtype": kv, "keep_io_types": keep_io,
              "op_block_list_extra": list(config.op_block_list),
              "node_block_list": list(config.node_block_list)}
    return BuildResult(metrics={"op_counts": counts}, extra={"precision": "fp16", "kv_dtype": kv, "fp16_policy": policy})


STAGE = OnnxStage(name="fp16", section="fp16", config=FP16, build=build, parents=("export", "fused"), default_parent="fused",
                  precision="fp16", summary="FP16 weights and KV cache, float32 logits: the GPU artifact")


def _to_float16(stored, convert):
    """A lazy float16 tensor from ``stored``: an external float32 tensor the converter retyped."""
    import onnx_ir as ir

    src = ir.ExternalTensor(stored.location, stored.offset, stored.length, ir.DataType.FLOAT, shape=stored.shape,
                            name=stored.name, base_dir=stored.base_dir)
    return ir.LazyTensor(lambda: ir.tensor(convert(src.numpy())), dtype=ir.DataType.FLOAT16, shape=stored.shape,
                         name=stored.name)


def _elem(value_info) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()
