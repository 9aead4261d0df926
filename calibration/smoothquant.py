"""SmoothQuant (Xiao et al., 2023) for ONNX graphs, on numpy 2 and onnxruntime alone.

For every group of projection MatMuls that read the same activation X (q/k/v share the attention
norm's output; gate/up share the MLP norm's), a per-input-channel factor
``s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha)`` moves the activation outliers into the weights:
``X W = (X / s)(diag(s) W)``. ``1/s`` is folded exactly into the graph where it can be (the preceding
RMSNorm's gamma for q/k/v and gate/up; up_proj's output columns for down_proj), otherwise a ``Mul``
is inserted (o_proj). Per-channel maxima come from the
calibration windows, fed through the reference runtime's feed builder, one window at a time."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline import onnx_io
from pipeline.log import Progress
from pipeline.runtime import GraphIO, make_session

NORM_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Mul")


def _groups(model, exclude: set[str]) -> dict[str, list]:
    init = {t.name for t in model.graph.initializer}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name not in exclude and node.input[1] in init and len(dims[node.input[1]]) == 2:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def activation_channel_max(model, tensors: list[str], config: dict, windows: np.ndarray, work: Path) -> dict:
    """Running per-channel max |x| of ``tensors`` over the calibration windows (bounded memory)."""
    from onnx import TensorProto, helper

    aug = type(model)()
    aug.CopyFrom(model)
    have = {o.name for o in aug.graph.output}
    for name in tensors:
        if name not in have:
            aug.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    onnx_io.save(aug, work)
    session = make_session(work / onnx_io.MODEL)
    io = GraphIO.from_onnx(work / onnx_io.MODEL, config)
    maxima: dict[str, np.ndarray] = {}
    progress = Progress("smoothquant stats", len(windows))
    for i, win in enumerate(windows):
        for name, value in zip(tensors, session.run(tensors, io.feeds(win[None]))):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
        progress.update(i + 1)
    return maxima


def smooth(model, config: dict, windows: np.ndarray, alpha: float, exclude: set[str], scratch: Path) -> dict:
    """Apply SmoothQuant in place; returns a summary for the manifest."""
    from onnx import helper, numpy_helper

    groups = _groups(model, exclude)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="sq-") as work:
        maxima = activation_channel_max(model, list(groups), config, windows, Path(work))
    init = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    folded = inserted = 0
    new_nodes = []
    ratios = []
    for x, members in groups.items():
        act = maxima[x].astype(np.float64)
        weights = [numpy_helper.to_array(init[m.input[1]]).astype(np.float64) for m in members]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-3, 1e3)
        ratios.append(float(act.max() / max(np.median(act), 1e-9)))
        for m, w in zip(members, weights):
            init[m.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), m.input[1]))
        target = _fold_target(x, producers, readers, init, members, len(s))
        if target is not None:
            kind, name = target
            if kind == "shared-gamma":  # the norm gets its own copy of a gamma other norms share, then folds
                norm, private = producers[x], f"{name}_{len(model.graph.initializer)}_smoothed"
                model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(init[name]), private))
                init[private] = model.graph.initializer[-1]
                norm.input[list(norm.input).index(name)] = private
                kind, name = "gamma", private
            t = numpy_helper.to_array(init[name]).astype(np.float64)
            t = t / s if kind == "gamma" else t / s[None, :]  # gamma, or the up_proj output columns
            init[name].CopyFrom(numpy_helper.from_array(t.astype(np.float32), name))
            folded += 1
        else:
            inv = f"{x}_smooth_inv_scale"
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            smoothed = f"{x}_smoothed"
            new_nodes.append((members[0], helper.make_node("Mul", [x, inv], [smoothed], name=f"{smoothed}_Mul")))
            for m in members:
                m.input[0] = smoothed
            inserted += 1
    for first_member, node in new_nodes:  # insert each Mul right before the first MatMul that reads it
        nodes = list(model.graph.node)
        model.graph.node.insert(nodes.index(first_member), node)
    return {"alpha": alpha, "groups": len(groups), "folded": folded, "mul_inserted": inserted,
            "median_outlier_ratio": float(np.median(ratios)) if ratios else None}


def _fold_target(x, producers, readers, init, members, channels) -> tuple[str, str] | None:
    """Where ``x / s`` can be folded exactly, without a new op:
    - ("gamma", name): x is an RMSNorm output (fused or decomposed) whose gamma only it reads;
    - ("shared-gamma", name): the same, with a gamma other norms read too (it gets a private copy);
    - ("columns", name): x = act(gate) * up, with ``up`` a projection read only here (down_proj's
      input): its output columns absorb 1/s.
    Readers of x other than the group may only be Shape ops (scaling does not change a shape)."""
    if any(r not in members and r.op_type != "Shape" for r in readers.get(x, [])):
        return None
    node = producers.get(x)
    if node is None or x != node.output[0]:
        return None
    gamma = _gamma(node, init, channels)
    if gamma is not None:  # shared: exporters store equal gammas once (a fresh model's are all ones)
        return ("gamma" if len(readers.get(gamma, [])) == 1 else "shared-gamma"), gamma
    if node.op_type == "Mul":
        for operand in node.input:
            up = producers.get(operand)
            if (up is not None and up.op_type == "MatMul" and up.input[1] in init
                    and len(readers.get(operand, [])) == 1 and len(readers.get(up.input[1], [])) == 1
                    and list(init[up.input[1]].dims)[-1] == channels):
                return "columns", up.input[1]
    return None


def _gamma(node, init: dict, channels: int) -> str | None:
    """The 1-D per-channel scale initializer of an RMSNorm (fused or decomposed as a final Mul)."""
    if node.op_type not in NORM_OPS:
        return None
    for name in node.input[1:] if node.op_type != "Mul" else node.input:
        t = init.get(name)
        if t is not None and list(t.dims) == [channels]:
            return name
    return None
