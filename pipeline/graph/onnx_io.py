"""Saving and checking ONNX artifacts.

Every artifact stores its graph as ``model.onnx`` plus one external-data file ``model.onnx_data``,
whatever the model's size: the same layout (and code path) for the 16 MB built-in model as for an
8 GB Qwen3-4B, where protobuf's 2 GB limit makes external data mandatory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import PipelineError, first_line

MODEL = "model.onnx"
DATA = "model.onnx_data"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def load(artifact_dir: str | Path, load_external_data: bool = True):
    import onnx

    path = Path(artifact_dir) / MODEL
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:
        raise PipelineError(f"{path} cannot be read as ONNX ({type(exc).__name__}: {str(exc)[:200]}); "
                            f"the file is truncated or damaged, rebuild or re-pull the artifact") from None


def save(model, out_dir: str | Path) -> Path:
    import onnx

    out_dir = Path(out_dir)
    for stale in (out_dir / MODEL, out_dir / DATA):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(out_dir / MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA, size_threshold=1024, convert_attribute=False)
    return out_dir / MODEL


def load_ir(path: str | Path):
    """An onnx-ir model whose weights stay on disk (memory-mapped when read, written tensor by tensor by
    :func:`save_ir`): graph edits on a multi-GB model without a copy of its weights in Python."""
    import onnx_ir as ir

    path = Path(path)
    path = path / MODEL if path.is_dir() else path
    try:
        return ir.load(str(path))
    except Exception as exc:
        raise PipelineError(f"{path} cannot be read as ONNX ({type(exc).__name__}: {str(exc)[:200]}); "
                            f"the file is truncated or damaged, rebuild or re-pull the artifact") from None


def to_ir(model_proto, base_dir: str | Path):
    """An onnx-ir model from a ModelProto loaded without its external data (``load_external_data=False``)
    from ``base_dir``: its weights stay lazy references into that directory."""
    import onnx_ir as ir

    model = ir.serde.deserialize_model(model_proto)
    ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def save_ir(model, out_dir: str | Path) -> Path:
    """Save an onnx-ir model in the artifact layout (model.onnx + model.onnx_data), streaming tensors."""
    import onnx_ir as ir

    out_dir = Path(out_dir)
    for stale in (out_dir / MODEL, out_dir / DATA):
        stale.unlink(missing_ok=True)
    # ir.save moves initializers into the new data file, but a node attribute's tensor (a Constant's
    # value, which optimum's export stores externally) would keep its offset into the old file: such
    # tensors are small, so they are read into the graph first.
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy(), name=attr.value.name))
    ir.save(model, str(out_dir / MODEL), external_data=DATA, size_threshold_bytes=1024)
    return out_dir / MODEL


# torch's exporter folds these ops when all their inputs are constant; ConstantOfShape it leaves as a node.
_NOT_FOLDED = {"ConstantOfShape"}
_LAZY_BYTES = 1 << 20


def fold_constants(model) -> dict[str, int]:
    """Fold, in an onnx-ir model, every node whose inputs are all constants (initializers or Constant
    outputs), as torch's exporter does with ``do_constant_folding=True``, but lazily for large tensors:
    a ``Transpose`` of a weight becomes an initializer computed from the memory-mapped source when
    :func:`save_ir` writes it, one tensor at a time. The export runs torch's exporter without folding
    because its folding (and the merge of its external files) holds a second copy of every weight in
    memory. The table a ``Gather`` looks up stays as ``Transpose(table)`` for a tied lm_head: stored once.

    Not onnxscript's ``optimizer.fold_constants``: it reads every constant input into memory and folds
    more than torch (Casts and shape arithmetic), so the graph would no longer be the one our fusions and
    quantizers were written for. Small nodes are evaluated by onnx's reference evaluator.
    Returns the number of folded nodes by op type."""
    import numpy as np
    import onnx_ir as ir
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    tables = {n.inputs[0] for n in graph if n.op_type == "Gather" and n.inputs[0] is not None
              and n.inputs[0].is_initializer()}

    def value_of(v):
        if v is None:
            return None
        if v.const_value is not None and v.is_initializer():
            return v.const_value
        producer = v.producer()
        if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
            attr = producer.attributes.get("value")
            return attr.value if attr is not None else None
        return None

    folded: dict[str, int] = {}
    for node in list(graph):
        if node.op_type in _NOT_FOLDED or node.op_type == "Constant" or node.domain not in ("", "ai.onnx") \
                or not node.inputs or len(node.outputs) != 1:
            continue
        consts = [value_of(v) for v in node.inputs]
        if any(c is None for c, v in zip(consts, node.inputs) if v is not None):
            continue
        out = node.outputs[0]
        if node.op_type == "Transpose" and node.inputs[0] in tables:
            continue
        src = consts[0]
        if node.op_type == "Transpose" and src.nbytes > _LAZY_BYTES:
            perm = tuple(node.attributes["perm"].value) if "perm" in node.attributes \
                else tuple(reversed(range(len(src.shape))))
            shape = ir.Shape([src.shape[i] for i in perm])
            tensor = ir.LazyTensor(lambda src=src, perm=perm: ir.tensor(np.ascontiguousarray(src.numpy().transpose(perm))),
                                   dtype=src.dtype, shape=shape, name=out.name)
        else:
            proto = ir.serde.serialize_node(node)
            feeds = {v.name: c.numpy() for v, c in zip(node.inputs, consts) if v is not None}
            (result,) = ReferenceEvaluator(proto).run(None, feeds)
            tensor = ir.tensor(np.asarray(result), name=out.name)
        name = out.name
        if all(v is None or not v.is_initializer() for v in node.inputs):  # as torch: Constants fold to a Constant
            constant = ir.node("Constant", [], attributes={"value": tensor}, name=f"{node.name}_folded")
            graph.insert_before(node, constant)
            value = constant.outputs[0]
        else:
            value = ir.Value(shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        out.replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        value.name = name
        if value.producer() is None:
            graph.register_initializer(value)
        folded[node.op_type] = folded.get(node.op_type, 0) + 1
    for node in reversed(list(graph)):  # the weights and Constants nothing reads any more
        if not any(o.uses() or o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output():
            graph.initializers.pop(name)
    return folded


def weights_from(artifact_dir: str | Path):
    """Context for library code running on a graph loaded without its weights (``load_external_data=False``)
    from ``artifact_dir``: onnx's ``numpy_helper.to_array`` (used by ORT's tools) resolves an external
    tensor's file against the working directory, so each tensor is read from disk when needed, one at a
    time, instead of the whole model being loaded first."""
    import contextlib

    return contextlib.chdir(Path(artifact_dir).resolve())


def beside_weights(graph, weights_dir: str | Path, out_dir: str | Path, link: bool = True) -> Path:
    """Save ``graph`` (a ModelProto loaded without its external data from ``weights_dir``, changed in
    its graph only) into ``out_dir`` with the same weights, hard-linked (``link``, for onnxruntime
    alone: onnx refuses to read a hard-linked data file) or copied: onnxruntime runs it without the
    weights ever passing through Python. (ORT refuses symlinks that lead out of the model's directory.)"""
    import os

    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(graph, str(out_dir / MODEL))
    src, dst = Path(weights_dir) / DATA, out_dir / DATA
    if src.is_file():
        try:
            if not link:
                raise OSError("a copy was asked for")
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return out_dir / MODEL


def without_lm_head(graph):
    """``graph`` (a ModelProto, loaded without its weights or with them) with its ``logits`` output
    replaced by the lm_head's input, and the lm_head (and any node only it needed) removed by onnx-ir's
    unused-node pass; the weights that stay keep their external-data references. Unchanged when no
    lm_head is found."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    head = lm_head_nodes(graph)
    if not head:
        return graph
    model = ir.from_proto(graph)
    x = next(n for n in model.graph if n.name == head[0]).inputs[0]
    if x.type is None:
        x.type = ir.TensorType(ir.DataType.FLOAT)
    outputs = model.graph.outputs
    kept = [x if v.name == "logits" else v for v in outputs]
    outputs.clear()
    outputs.extend(kept)
    return ir.to_proto(RemoveUnusedNodesPass()(model).model)


def check(path: str | Path) -> None:
    """The ONNX checker by path, so external data is allowed. Not its full check: that runs ONNX's shape
    inference, which does not know the com.microsoft ops of our fused and quantized graphs (and loading
    the graph in onnxruntime, which every stage then does, is the stricter test)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise PipelineError(f"{path} fails the ONNX checker: {first_line(exc, 300)}") from None


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def lm_head_nodes(model) -> list[str]:
    """Names of the MatMul/Gemm nodes that produce ``logits`` (walking back through Cast/Identity)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type in ("Cast", "Identity", "Reshape"):
        node = producers.get(node.input[0])
    return [node.name] if node is not None and node.op_type in ("MatMul", "Gemm") else []


def embedding_nodes(model) -> list[str]:
    """Gather nodes that look up an initializer table with the token ids."""
    init = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in init]


def activation_matmuls(model) -> list[str]:
    init = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in init]
