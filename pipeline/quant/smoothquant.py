"""SmoothQuant (Xiao et al., 2023) for ONNX graphs, on numpy 2 and onnxruntime alone.

For every group of projection MatMuls that read the same activation X (q/k/v share the attention
norm's output; gate/up share the MLP norm's), a per-input-channel factor
``s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha)`` moves the activation outliers into the weights:
``X W = (X / s)(diag(s) W)``. ``1/s`` is folded exactly into the graph where it can be (the preceding
RMSNorm's gamma for q/k/v and gate/up; up_proj's output columns for down_proj), otherwise a ``Mul``
is inserted (o_proj). Per-channel maxima come from the
calibration windows, fed through the reference runtime's feed builder, one window at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.quant.imatrix import channel_statistics

NORM_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Mul")


def projection_groups(model, exclude: set[str]) -> dict[str, list]:
    init = {t.name for t in model.graph.initializer}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name not in exclude and node.input[1] in init and len(dims[node.input[1]]) == 2:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def activation_channel_max(graph, weights_dir: Path, tensors: list[str], config: dict, windows: np.ndarray,
                           work: Path) -> dict:
    """Running per-channel max |x| of ``tensors`` over the calibration windows (bounded memory)."""
    stats = channel_statistics(graph, weights_dir, tensors, config, windows, work, "smoothquant stats")
    return {name: s["max"] for name, s in stats.items()}


def smoothing_groups(graph, exclude: set[str]) -> list[str]:
    """The activations SmoothQuant scales: inputs shared by projection MatMuls (weights not needed)."""
    return list(projection_groups(graph, exclude))


class Weights:
    """The weights of a graph loaded without its data: read from the data file on demand, and rescaled
    lazily (each scaling recorded, applied when the tensor is written: :meth:`lazy`). Smoothing touches
    every projection; done on a ModelProto it held the model twice (protobuf keeps a replaced tensor's
    bytes in its arena)."""

    def __init__(self, graph, base_dir: Path):
        self.tensors = {t.name: t for t in graph.graph.initializer}
        self.base_dir = Path(base_dir)
        self.ops: dict[str, list] = {}

    def stored(self, name: str) -> np.ndarray:
        from onnx import TensorProto, helper, numpy_helper

        t = self.tensors[name]
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.memmap(self.base_dir / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                         shape=tuple(t.dims))

    def current(self, name: str) -> np.ndarray:
        a = self.stored(name)
        for kind, s in self.ops.get(name, []):
            a = a.astype(np.float64)
            a = a * s[:, None] if kind == "rows" else (a / s if kind == "gamma" else a / s[None, :])
            a = a.astype(np.float32)
        return np.asarray(a)

    def scale(self, name: str, kind: str, s: np.ndarray) -> None:
        """kind: "rows" (W * s per input channel), "gamma" (g / s), "columns" (W / s per output column)."""
        self.ops.setdefault(name, []).append((kind, s))

    def lazy(self, model) -> None:
        """Give the rescaled initializers of ``model`` (onnx-ir, from the same graph) their new values."""
        import onnx_ir as ir

        for name in self.ops:
            if name not in model.graph.initializers:  # quantized and dropped (pipeline/quant/nbits.py)
                continue
            value = model.graph.initializers[name]
            value.const_value = ir.LazyTensor(lambda name=name: ir.tensor(self.current(name)),
                                              dtype=value.const_value.dtype, shape=value.const_value.shape, name=name)


def smoothquant_factors(model, weights: Weights, maxima: dict, alpha: float, exclude: set[str]) -> dict:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha)`` per group's input channel (the
    groups whose activation has maxima)."""
    factors = {}
    for x, members in projection_groups(model, exclude).items():
        if x not in maxima:
            continue
        act = maxima[x].astype(np.float64)
        wmax = np.max([np.abs(weights.current(m.input[1])).max(axis=1) for m in members], axis=0).astype(np.float64)
        s = np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        factors[x] = np.clip(s, 1e-3, 1e3)
    return factors


def smooth(model, weights: Weights, maxima: dict, alpha: float, exclude: set[str], fold_only: bool = False) -> dict:
    """Apply SmoothQuant to ``model`` (a ModelProto without its weights: graph edits in place, weight
    scalings recorded in ``weights``), with the activation maxima of :func:`activation_channel_max`;
    returns a summary for the manifest."""
    factors = smoothquant_factors(model, weights, maxima, alpha, exclude)
    ratios = [float(maxima[x].max() / max(np.median(maxima[x]), 1e-9)) for x in factors]
    summary = scale_inputs(model, weights, factors, exclude, fold_only)
    summary.pop("scaled")
    return {"alpha": alpha, **summary, "median_outlier_ratio": float(np.median(ratios)) if ratios else None}


def scale_inputs(model, weights: Weights, factors: dict[str, np.ndarray], exclude: set[str],
                 fold_only: bool = False) -> dict:
    """``X W = (X / s)(diag(s) W)`` for each activation ``X`` in ``factors``: the projections' weight rows
    scaled by ``s``, ``1/s`` folded into the graph where that is exact (:func:`_fold_target`), else a
    ``Mul`` inserted, or (``fold_only``) that group left as it is. Graph edits in place; weight
    scalings recorded in ``weights``; ``scaled`` in the summary lists the activations scaled. Shared by SmoothQuant and AWQ-style scaling (pipeline/quant/nbits.py)."""
    from onnx import helper, numpy_helper

    groups = projection_groups(model, exclude)
    init = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    folded = inserted = skipped = 0
    new_nodes, scaled = [], []
    for x, s in factors.items():
        members = groups[x]
        target = _fold_target(x, producers, readers, init, members, len(s))
        if target is None and fold_only:
            skipped += 1
            continue
        scaled.append(x)
        for m in members:
            weights.scale(m.input[1], "rows", s)
        if target is not None:
            kind, name = target
            if kind == "shared-gamma":  # the norm gets its own copy of a gamma other norms share, then folds
                norm, private = producers[x], f"{name}_{len(model.graph.initializer)}_smoothed"
                model.graph.initializer.append(numpy_helper.from_array(weights.current(name), private))
                init[private] = weights.tensors[private] = model.graph.initializer[-1]
                norm.input[list(norm.input).index(name)] = private
                kind, name = "gamma", private
            weights.scale(name, "gamma" if kind == "gamma" else "columns", s)
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
    return {"groups": len(factors), "folded": folded, "mul_inserted": inserted,
            **({"left_unscaled": skipped} if fold_only else {}), "scaled": scaled}


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
