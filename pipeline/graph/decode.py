"""Decode steps that read each KV group once: every GroupQueryAttention becomes
``If(one token into in-place buffers, deep enough, grouped attention, the GroupQueryAttention as it was)``.

ORT's CPU GroupQueryAttention multiplies each query head by its KV head on its own, so a group of g query
heads reads the KV cache g times a decode step (Qwen3-4B: 32 over 8, four reads; benchmarks/gqa_decode.py
measures it). The grouped branch does the same step with plain ops over the buffers the runtime binds as
past and present alike: ``ScatterND`` writes the step's rotated key and value into the bound buffer (input
and output are one buffer, so nothing is copied), the g query heads of a group are the rows of one
``FusedMatMul(transB)`` against their KV head, then ``Softmax`` and ``MatMul`` with the values. Prefill
(more than one token), a concatenated past (optimum's: no room in the buffer) and short depths take the
other branch, the original node, unchanged.

Applied when our runtime opens a session (pipeline/consumer/runtime.py), not in the artifact: the file
stays the graph onnxruntime-genai and optimum run. Written with onnx's helpers, not onnxscript's pattern
rewriter (pipeline/graph/fusions.py), because the consumer that runs it needs onnx and onnxruntime only.
"""

from __future__ import annotations

import numpy as np

# GroupQueryAttention attributes the grouped branch does not reproduce: a node that sets any of them to
# something other than its default keeps its own kernel at every step.
_UNSUPPORTED = {"local_window_size": -1, "softcap": 0.0, "smooth_softmax": 0, "kv_cache_bit_width": 0,
                "rotary_interleaved": 0, "qk_output": 0}
PREFIX = "grouped_decode"


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _eligible(node, inits: dict, float_heads: dict[str, int]) -> bool:
    """A GroupQueryAttention the grouped branch reproduces: separate q/k/v, rotary over the whole head
    inside the op, no window, soft-cap or quantized cache, a float32 KV cache bound from the graph's inputs."""
    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.input) < 9:
        return False
    attrs = _attrs(node)
    if any(attrs.get(k, d) != d for k, d in _UNSUPPORTED.items()) or attrs.get("do_rotary", 0) != 1:
        return False
    head_dim = float_heads.get(node.input[3])
    if node.input[1] == "" or head_dim is None:  # packed q/k/v in one input; or not a float32 cache input
        return False
    cos = inits.get(node.input[7])
    # rotary over the whole head only (a partial rotary, Phi-3's, keeps the kernel)
    heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads")
    # the head counts as ints > 0 (a file from elsewhere may say anything: ORT then refuses it, in one line)
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads > 0 and kv_heads > 0):
        return False
    return cos is not None and len(cos.dims) == 2 and 2 * cos.dims[1] == head_dim and heads % kv_heads == 0


def _float32_cache_inputs(model) -> dict[str, int]:
    """{name: head_dim} of the graph inputs of element type float32 and static last dimension (the KV
    buffers the runtime binds, (B, kv_heads, L, head_dim)). The grouped branch computes in float32: ORT's CPU
    FusedMatMul has no float16 kernel, so the fp16 artifact keeps its kernel."""
    from onnx import TensorProto

    found = {}
    for v in model.graph.input:
        t = v.type.tensor_type
        if t.elem_type == TensorProto.FLOAT and len(t.shape.dim) == 4 and t.shape.dim[3].HasField("dim_value"):
            found[v.name] = t.shape.dim[3].dim_value
    return found


def group_decode_attention(model, min_positions: int) -> int:
    """Rewrite ``model`` (an ONNX ModelProto, weights not needed) in place; returns how many
    GroupQueryAttention nodes got the grouped decode branch. ``min_positions``: the grouped branch runs
    from this many positions on (below, the kernel's per-head reads are cheaper than the extra ops)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    heads_of = _float32_cache_inputs(model)
    targets = [n for n in graph.node if _eligible(n, inits, heads_of)]
    if not targets:
        return 0
    first = targets[0]
    q0, past_k0, seqlens, total = first.input[0], first.input[3], first.input[5], first.input[6]
    shared = []

    def const(name, array):
        shared.append(helper.make_node("Constant", [], [f"{PREFIX}/{name}"],
                                       value=numpy_helper.from_array(np.asarray(array), f"{PREFIX}/{name}")))
        return f"{PREFIX}/{name}"

    def node(op, inputs, name, **attrs):
        out = f"{PREFIX}/{name}"
        shared.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # One condition and one set of positions for every layer: one token this step, a buffer with room for
    # it (the runtime's in-place buffers; optimum's concatenated past has none), and deep enough.
    one_1d = const("one_1d", np.array([1], dtype=np.int64))
    zero, one = const("zero", np.array(0, dtype=np.int64)), const("one", np.array(1, dtype=np.int64))
    b111 = const("b111", np.array([-1, 1, 1, 1], dtype=np.int64))
    step_len = node("Shape", [q0], "step_len", start=1, end=2)
    capacity = node("Shape", [past_k0], "capacity", start=2, end=3)
    total64 = node("Cast", [node("Reshape", [total, one_1d], "total_1d")], "total64", to=TensorProto.INT64)
    one_token = node("Equal", [step_len, one_1d], "one_token")
    room = node("GreaterOrEqual", [capacity, total64], "room")
    deep = node("GreaterOrEqual", [total64, const("min_positions", np.array([min_positions], dtype=np.int64))], "deep")
    cond = node("Squeeze", [node("And", [node("And", [one_token, room], "one_and_room"), deep], "cond_1d")], "cond")
    # each row's new position (its length - 1 = seqlens_k), as position ids (B, 1) and as the key column
    # that may be attended to (-inf past it: the rest of the buffer)
    pos = node("Cast", [seqlens], "pos", to=TensorProto.INT64)                  # (B,)
    pos_ids = node("Unsqueeze", [pos, one_1d], "pos_ids")                       # (B, 1)
    columns = node("Range", [zero, node("Squeeze", [capacity], "capacity_0d"), one], "columns")  # (C,)
    pos4 = node("Reshape", [pos, b111], "pos4")                                 # (B,1,1,1)
    beyond = node("Greater", [columns, pos4], "beyond")                         # (B,1,1,C)
    mask = node("Where", [beyond, const("ninf", np.array(-np.inf, dtype=np.float32)),
                          const("fzero", np.array(0.0, dtype=np.float32))], "mask")
    batch = node("Shape", [q0], "batch", start=0, end=1)
    rows4 = node("Reshape", [node("Range", [zero, node("Squeeze", [batch], "batch_0d"), one], "rows"), b111], "rows4")
    index_of = {}

    def indices(kv_heads: int) -> str:
        """ScatterND's indices (B, kv_heads, 1, 3) = (row, kv head, position), one set per kv_heads value."""
        if kv_heads not in index_of:
            shape = node("Concat", [batch, const(f"kv{kv_heads}", np.array([kv_heads, 1, 1], dtype=np.int64))],
                         f"idx_shape_{kv_heads}", axis=0)
            heads = const(f"heads{kv_heads}", np.arange(kv_heads, dtype=np.int64).reshape(1, -1, 1, 1))
            index_of[kv_heads] = node("Concat", [node("Expand", [rows4, shape], f"rows_x_{kv_heads}"),
                                                 node("Expand", [heads, shape], f"heads_x_{kv_heads}"),
                                                 node("Expand", [pos4, shape], f"pos_x_{kv_heads}")],
                                      f"idx_{kv_heads}", axis=3)
        return index_of[kv_heads]

    replaced = {}
    for n, gqa in enumerate(targets):
        a = _attrs(gqa)
        heads, kv_heads = a["num_heads"], a["kv_num_heads"]
        group, head_dim = heads // kv_heads, heads_of[gqa.input[3]]
        scale = a.get("scale") or head_dim ** -0.5
        q, k, v, past_k, past_v, _, _, cos, sin = gqa.input[:9]
        p = f"{PREFIX}/l{n}"
        out, present_k, present_v = gqa.output[:3]
        then = [
            # rotary as the kernel applies it (the head size from the cos cache's width: the whole head)
            helper.make_node("RotaryEmbedding", [q, pos_ids, cos, sin], [f"{p}/q_rot"], domain="com.microsoft",
                             interleaved=0),
            helper.make_node("RotaryEmbedding", [k, pos_ids, cos, sin], [f"{p}/k_rot"], domain="com.microsoft",
                             interleaved=0),
            helper.make_node("Constant", [], [f"{p}/kv_shape"],
                             value=numpy_helper.from_array(np.array([-1, kv_heads, 1, head_dim], dtype=np.int64))),
            helper.make_node("Constant", [], [f"{p}/q_shape"],
                             value=numpy_helper.from_array(np.array([-1, kv_heads, group, head_dim], dtype=np.int64))),
            helper.make_node("Constant", [], [f"{p}/o_shape"],
                             value=numpy_helper.from_array(np.array([-1, 1, heads * head_dim], dtype=np.int64))),
            # one token: (B, 1, kv_heads * D) is already (B, kv_heads, 1, D) in memory
            helper.make_node("Reshape", [f"{p}/k_rot", f"{p}/kv_shape"], [f"{p}/k4"]),
            helper.make_node("Reshape", [v, f"{p}/kv_shape"], [f"{p}/v4"]),
            helper.make_node("ScatterND", [past_k, indices(kv_heads), f"{p}/k4"], [f"{p}/present_k"]),
            helper.make_node("ScatterND", [past_v, indices(kv_heads), f"{p}/v4"], [f"{p}/present_v"]),
            # query head h reads KV head h // group (GroupQueryAttention's mapping): a group is g rows
            helper.make_node("Reshape", [f"{p}/q_rot", f"{p}/q_shape"], [f"{p}/q4"]),
            helper.make_node("FusedMatMul", [f"{p}/q4", f"{p}/present_k"], [f"{p}/scores"], domain="com.microsoft",
                             transB=1, alpha=float(scale)),
            helper.make_node("Add", [f"{p}/scores", mask], [f"{p}/masked"]),
            helper.make_node("Softmax", [f"{p}/masked"], [f"{p}/probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}/probs", f"{p}/present_v"], [f"{p}/o4"]),
            helper.make_node("Reshape", [f"{p}/o4", f"{p}/o_shape"], [f"{p}/out"]),
        ]
        then_graph = helper.make_graph(then, f"{p}/grouped", [], [
            helper.make_tensor_value_info(f"{p}/out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{p}/present_k", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{p}/present_v", TensorProto.FLOAT, None)])
        kernel = helper.make_node(gqa.op_type, list(gqa.input), [f"{p}/k_out", f"{p}/k_present_k", f"{p}/k_present_v"],
                                  name=f"{gqa.name or p}/kernel", domain=gqa.domain)
        kernel.attribute.extend(gqa.attribute)
        else_graph = helper.make_graph([kernel], f"{p}/kernel", [], [
            helper.make_tensor_value_info(f"{p}/k_out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{p}/k_present_k", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{p}/k_present_v", TensorProto.FLOAT, None)])
        replaced[id(gqa)] = helper.make_node("If", [cond], [out, present_k, present_v], name=gqa.name or p,
                                             then_branch=then_graph, else_branch=else_graph)
    nodes = list(graph.node)
    at = nodes.index(first)
    rewritten = nodes[:at] + shared + [replaced.get(id(x), x) for x in nodes[at:]]
    del graph.node[:]
    graph.node.extend(rewritten)
    return len(targets)
