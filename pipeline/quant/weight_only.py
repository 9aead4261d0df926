"""Calibrated weight-only quantization to ``MatMulNBits``: the projections' input channels optionally
rescaled first (SmoothQuant for int8 compute, AWQ-style for int4), then every projection quantized in
blocks by pipeline/quant/nbits.py, its rounding weighted by the importance matrix.

Scaling ``X W = (X / s)(diag(s) W)`` is folded exactly into the graph (RMSNorm gamma, up_proj's
columns: pipeline/quant/smoothquant.py), never as a new op by default, so the artifact keeps the parent's
graph and speed. Weights are read one tensor at a time from the parent's data file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.graph import onnx_io
from pipeline.graph.tied import find_tied, share_quantized_table
from pipeline.log import Progress, info
from pipeline.quant import gptq as gptq_lib
from pipeline.quant import nbits
from pipeline.quant.imatrix import Imatrix
from pipeline.quant.smoothquant import Weights, projection_groups, scale_inputs, smoothquant_factors


def awq_factors(im: Imatrix, groups: dict, alpha: float) -> dict[str, np.ndarray]:
    """s_j = mean(x_j^2)^(alpha/2), normalised to a geometric mean of 1: channels that carry large
    activations get finer weights (their weights grow by s, their activations shrink by it)."""
    out = {}
    for x in groups:
        if x not in im.mean_sq or alpha == 0:
            continue
        rms = np.sqrt(np.maximum(im.mean_sq[x].astype(np.float64), 1e-12))
        s = np.power(rms, alpha)
        out[x] = np.clip(s / np.exp(np.log(s).mean()), 1e-3, 1e3)
    return out


def quantize_with_imatrix(inputs, tmp: Path, why: str, *, nodes_to_exclude: list[str], **options) -> tuple:
    """:func:`quantize` with the importance matrix the stage was handed (``inputs.use``, for ``why``), as
    int4 (imatrix, awq) and int8-dynamic (smoothing) run it: (its policy fields, the artifact's op
    counts, the manifest's ``uses`` entry)."""
    from pipeline.quant import imatrix

    im_dir, im_manifest = inputs.use("imatrix", why)
    im = imatrix.load(im_dir, im_manifest, inputs.manifest)
    summary, q = quantize(inputs.dir, tmp, exclude=set(nodes_to_exclude), im=im, **options)
    fields = {"tied_embedding": summary.pop("tied_embedding", "fp32 (not quantized)"), **summary,
              "excluded_nodes": list(nodes_to_exclude)}
    return fields, {"op_counts": onnx_io.op_counts(q)}, {"imatrix": im_manifest["artifact_id"]}


def quantize(parent_dir: Path, tmp: Path, *, bits: int, block_size: int, accuracy_level: int | None,
             exclude: set[str], im: Imatrix, smooth_alpha: float | None = None,
             awq_alpha: float | None = None, weighted: bool = False, int8_fraction: float = 0.0,
             tied: tuple[int, int] | None = None, gptq: bool = False) -> tuple[dict, object]:
    """Write the quantized artifact's model into ``tmp``; returns (policy summary, the graph for op counts).
    ``tied``: (bits, block size) of the shared embedding / lm_head table, or None to leave it float.
    ``gptq``: the projections rounded by GPTQ with their inputs' Hessians (pipeline/quant/gptq.py)."""
    parent_dir = Path(parent_dir).resolve()
    graph = onnx_io.load(parent_dir, load_external_data=False)
    tied = tied if tied and find_tied(graph) is not None else None
    if tied:
        exclude = exclude | set(onnx_io.lm_head_nodes(graph))
    weights = Weights(graph, parent_dir)
    groups = projection_groups(graph, exclude)
    summary: dict = {}
    factors: dict[str, np.ndarray] = {}
    if smooth_alpha is not None or awq_alpha is not None:
        if smooth_alpha is not None:
            kind, alpha = "smoothquant", smooth_alpha
            factors = smoothquant_factors(graph, weights, im.max, alpha, exclude)
        else:
            kind, alpha = "awq", awq_alpha
            factors = awq_factors(im, groups, alpha)
        done = scale_inputs(graph, weights, factors, exclude, fold_only=True)
        factors = {x: factors[x] for x in done.pop("scaled")}  # groups with no exact fold stay unscaled
        summary[kind] = {"alpha": alpha, **done}
    importance = None
    if weighted:  # each channel's energy after the scaling: mean((x / s)^2)
        importance = {}
        for x, members in groups.items():
            if x in im.mean_sq:
                imp = im.mean_sq[x].astype(np.float64) / (factors[x] ** 2 if x in factors else 1.0)
                for m in members:
                    importance[m.input[1]] = imp.astype(np.float32)
    names = [m.input[1] for members in groups.values() for m in members]
    bits_of = {n: bits for n in names}
    if int8_fraction > 0:
        bits_of.update({n: 8 for n in _most_sensitive(weights, names, bits, block_size, importance, int8_fraction)})
        summary["int8_projections"] = sorted(n for n, b in bits_of.items() if b == 8)
    info(f"quantizing {len(names)} projections to {bits} bits in blocks of {block_size}"
         + (" (importance-weighted scales)" if importance else ""))
    if gptq:
        counts = _gptq(graph, weights, parent_dir, tmp, im, groups, factors, bits_of, block_size, accuracy_level,
                       importance)
        summary["gptq"] = {"damp": gptq_lib.DAMP, "tokens": int(im.windows.size)}
    else:
        counts = nbits.to_matmulnbits(graph, weights, bits_of, block_size, accuracy_level, importance)
    summary["matmulnbits"] = {str(b): c for b, c in sorted(counts.items())}
    if tied:
        graph_head = find_tied(graph)[1]
        imp = im.mean_sq.get(graph_head.input[0]) if weighted else None
        with onnx_io.weights_from(parent_dir):
            summary["tied_embedding"] = share_quantized_table(graph, tied[0], tied[1], accuracy_level, imp)
    model = onnx_io.to_ir(graph, parent_dir)
    weights.lazy(model)  # rescaled gammas / up_proj columns, written as the model is saved
    onnx_io.save_ir(model, tmp)
    return summary, graph


def _gptq(graph, weights: Weights, parent_dir: Path, tmp: Path, im: Imatrix, groups: dict, factors: dict,
          bits_of: dict[str, int], block_size: int, accuracy_level: int | None, importance: dict | None) -> dict:
    """Every projection in ``bits_of`` rounded by GPTQ: the Hessians of its input collected on the parent
    graph over the imatrix's own calibration windows, a chunk of activations at a time (memory bounded by
    gptq.HESSIAN_BYTES), scaled as the input was (x / s: H / s s^T) where AWQ scaled it."""
    import json

    from pipeline.errors import PipelineError
    from pipeline.ops import store

    windows = im.windows
    if windows is None:
        raise PipelineError("int4.algorithm gptq needs the imatrix's calibration tokens, which this imatrix (made "
                            "by an older pipeline) does not keep: rebuild it (pipeline imatrix)")
    config = json.loads((parent_dir / "config.json").read_text())
    vocab = config.get("vocab_size")
    if windows.ndim != 2 or windows.dtype.kind not in "iu" or not isinstance(vocab, int) or \
            windows.size == 0 or windows.min() < 0 or windows.max() >= vocab:
        raise PipelineError(f"the imatrix's calibration tokens are not token windows of this model (shape "
                            f"{windows.shape}, {windows.dtype}): rebuild it (pipeline imatrix)")
    parent = onnx_io.load(parent_dir, load_external_data=False)
    sizes = {x: len(im.mean_sq[x]) for x, members in groups.items()
             if x in im.mean_sq and any(m.input[1] in bits_of for m in members)}
    parts = gptq_lib.chunks(sizes)
    counts: Counter = Counter()
    for i, chunk in enumerate(parts):
        label = "gptq hessians" + (f" {i + 1}/{len(parts)}" if len(parts) > 1 else "")
        with store.scratch_dir(tmp, "gptq") as scratch:
            hs = gptq_lib.hessians(parent, parent_dir, chunk, config, windows, Path(scratch), label)
        by_weight = {}
        for x in chunk:
            h = hs.pop(x)
            if x in factors:
                s = factors[x].astype(np.float32)
                h = h / np.outer(s, s)
            rounder = gptq_lib.Rounder(h)  # one inverse Hessian for every projection reading x
            by_weight.update({m.input[1]: rounder for m in groups[x] if m.input[1] in bits_of})
        info(f"gptq: rounding {len(by_weight)} projections" + (f" (chunk {i + 1}/{len(parts)})" if len(parts) > 1 else ""))
        part = {n: bits_of[n] for n in by_weight}
        counts.update(nbits.to_matmulnbits(graph, weights, part, block_size, accuracy_level, importance, by_weight))
        del by_weight, hs
    rest = {n: b for n, b in bits_of.items() if n not in {m.input[1] for x in sizes for m in groups[x]}}
    if rest:  # a projection whose input the imatrix did not record: the importance-weighted rounding
        counts.update(nbits.to_matmulnbits(graph, weights, rest, block_size, accuracy_level, importance))
    return dict(counts)


def _most_sensitive(weights: Weights, names: list[str], bits: int, block_size: int, importance: dict | None,
                    fraction: float) -> list[str]:
    """The ``fraction`` of projections whose ``bits``-bit rounding disturbs their output most under the
    calibration activations (importance-weighted relative error, pipeline/nbits.weighted_error)."""
    progress = Progress("ranking projections", len(names))
    errors = {}
    for i, n in enumerate(names):
        w = weights.current(n)
        errors[n] = nbits.weighted_error(np.ascontiguousarray(w.T), bits, block_size,
                                         None if importance is None else importance.get(n))
        progress.update(i + 1)
    k = int(round(fraction * len(names)))
    return sorted(errors, key=errors.get, reverse=True)[:k]
