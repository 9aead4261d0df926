"""The tied embedding / lm_head, quantized once and shared.

Qwen3 ties ``lm_head.weight`` to ``embed_tokens.weight``. The export stores the table once (the
lm_head MatMul reads ``Transpose(table)``). Quantizing it as two separate ops would store it twice,
so here one block-quantized table (MatMulNBits layout: uint8 blobs, per-block float scales, default
zero point 2^(bits-1), pipeline/quant/nbits.py) feeds both a ``MatMulNBits`` (lm_head) and a ``GatherBlockQuantized``
(embedding lookup), the way onnxruntime-genai's builder shares embeddings."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.graph.onnx_io import embedding_nodes, lm_head_nodes
from pipeline.quant.nbits import quantize_blocks


def retie_embedding(model) -> list[str]:
    """Store the tied table once, in an onnx-ir model: an initializer equal to ``embed_table.T`` (the
    lm_head's weight, as the export writes it without optimum's post-processing, or as ORT's optimizer
    folds it) is replaced by a ``Transpose(embed_table)`` node. onnxruntime folds the transpose in memory
    when the session starts. Tensors are compared memory-mapped, never copied. Returns the names removed."""
    import onnx_ir as ir

    graph = model.graph
    tables = {n.inputs[0] for n in graph if n.op_type == "Gather" and n.inputs[0] is not None
              and n.inputs[0].is_initializer() and n.inputs[0].const_value is not None}
    removed = []
    for table in tables:
        e = table.const_value
        if len(e.shape) != 2:
            continue
        for name, v in list(graph.initializers.items()):
            t = v.const_value
            if v is table or t is None or tuple(t.shape) != (e.shape[1], e.shape[0]) or t.dtype != e.dtype:
                continue
            et, tt = e.numpy(), t.numpy()
            if not (np.array_equal(tt[:, 0], et[0]) and np.array_equal(tt, et.T)):  # first row: a cheap no
                continue
            node = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name=f"{name}_retied")
            graph.insert_before(graph[0], node)
            v.replace_all_uses_with(node.outputs[0])
            graph.initializers.pop(name)
            node.outputs[0].name = name
            removed.append(name)
    return removed


def find_tied(model):
    """(embedding Gather node, lm_head node, table initializer name), or None when not tied."""
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    init = {t.name: t for t in model.graph.initializer}
    gathers = [nodes[n] for n in embedding_nodes(model)]
    heads = [nodes[n] for n in lm_head_nodes(model)]
    if len(gathers) != 1 or len(heads) != 1 or heads[0].op_type != "MatMul":
        return None
    gather, head = gathers[0], heads[0]
    table = gather.input[0]
    src = producers.get(head.input[1])
    if src is not None and src.op_type == "Transpose" and src.input[0] == table:
        return gather, head, table
    other = init.get(head.input[1])
    if other is not None and list(other.dims) == list(reversed(init[table].dims)):
        from onnx import TensorProto, numpy_helper

        if TensorProto.EXTERNAL in (other.data_location, init[table].data_location):
            # Two stored tables: an untied lm_head (Llama 3.1, Mistral, Phi-3). A tied one stored twice is
            # re-tied as Transpose(table) by the fuse stage (retie_embedding), so only a graph in memory
            # (built, not loaded from an artifact) is compared here.
            return None
        if np.array_equal(numpy_helper.to_array(other).T, numpy_helper.to_array(init[table])):
            return gather, head, table
    return None


def table_block(hidden: int, block_size: int) -> int:
    """The block size of the shared table: ``block_size``, or where it does not divide the hidden size the
    largest power of two (at least 16) that does. GatherBlockQuantized reads the table unpadded (its
    output is as wide as its data), so the padding a projection's last block gets (nbits.quantize_blocks)
    is no option here."""
    block = block_size
    while hidden % block and block > 16:
        block //= 2
    if hidden % block:
        raise PipelineError(f"the tied table's width {hidden} has no block size of 16 or more dividing it: set "
                            f"quantize_tied: false (the table stays float)")
    return block


def share_quantized_table(model, bits: int, block_size: int, accuracy_level: int | None = None,
                          importance=None) -> dict:
    """Replace the tied Gather + lm_head MatMul with GatherBlockQuantized + MatMulNBits over one table.
    ``importance``: the lm_head input's mean x^2 per hidden channel (pipeline/quant/imatrix.py), to weigh the
    rounding (pipeline/quant/nbits.py); None: round to nearest."""
    from onnx import helper, numpy_helper

    found = find_tied(model)
    if found is None:
        raise PipelineError("the graph has no tied embedding / lm_head pair to share (set quantize_tied: false)")
    gather, head, table = found
    init = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(init[table])  # (vocab, hidden)
    vocab, hidden = w.shape
    block_size = table_block(hidden, block_size)
    packed, scales = quantize_blocks(w, bits, block_size, importance)
    nb = hidden // block_size
    q_name, s_name = f"{table}_q{bits}", f"{table}_q{bits}_scales"
    new_inits = [
        numpy_helper.from_array(packed, q_name),
        numpy_helper.from_array(scales.reshape(-1), s_name),
        numpy_helper.from_array(np.array([vocab, nb * block_size * bits // 8], dtype=np.int64), f"{q_name}_2d_shape"),
        numpy_helper.from_array(np.array([vocab, nb], dtype=np.int64), f"{s_name}_2d_shape"),
    ]
    attrs = {"K": hidden, "N": vocab, "bits": bits, "block_size": block_size}
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    new_nodes = [
        helper.make_node("MatMulNBits", [head.input[0], q_name, s_name], list(head.output),
                         name=f"{head.name}_MatMulNBits", domain="com.microsoft", **attrs),
        helper.make_node("Reshape", [q_name, f"{q_name}_2d_shape"], [f"{q_name}_2d"], name=f"{q_name}_reshape"),
        helper.make_node("Reshape", [s_name, f"{s_name}_2d_shape"], [f"{s_name}_2d"], name=f"{s_name}_reshape"),
        helper.make_node("GatherBlockQuantized", [f"{q_name}_2d", gather.input[1], f"{s_name}_2d"],
                         list(gather.output), name=f"{gather.name}_GatherBlockQuantized", domain="com.microsoft",
                         gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits),
    ]
    # replace in place: the Reshapes read only initializers, so the order stays topological
    others = [n for n in model.graph.node if n is not gather and n is not head]
    readers = {i for n in others for i in n.input}
    nodes = []
    for n in model.graph.node:
        if n is gather:
            nodes += new_nodes[1:]
        elif n is head:
            nodes.append(new_nodes[0])
        elif n.op_type == "Transpose" and n.input[0] == table and n.output[0] not in readers:
            continue  # the Transpose that fed the float lm_head
        else:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    readers = {i for n in nodes for i in n.input}
    if table not in readers:
        model.graph.initializer.remove(init[table])
    model.graph.initializer.extend(new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"table": table, "bits": bits, "importance_weighted": importance is not None, "block_size": block_size, "vocab": int(vocab), "hidden": int(hidden),
            "ops": ["GatherBlockQuantized", "MatMulNBits"]}
