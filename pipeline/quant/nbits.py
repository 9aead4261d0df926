"""Block quantization into ``MatMulNBits``' layout, importance-weighted: our own quantizer.

Why our own: ORT's MatMulNBitsQuantizer (RTN, k_quant, HQQ) chooses each block's scale from the
weights alone, and its GPTQ needs neural-compressor 2.x (numpy < 2). Here, as llama.cpp does with an
importance matrix, the scale of each block of ``block_size`` weights along the input is the one, among
candidates around the round-to-nearest scale, that minimises the rounding error *weighted by each
input channel's mean x^2* (pipeline/quant/imatrix.py): the error a channel adds to the output is its
weight error times its activation, so channels that carry large activations are rounded with care.

Layout (what onnxruntime's MatMulNBits reads): for ``x @ W`` with ``W`` (K, N), ``B`` is uint8
(N, K/block, block*bits/8), two 4-bit values a byte (low nibble first), ``scales`` float (N*K/block),
no zero points (symmetric: the default zero point 2^(bits-1))."""

from __future__ import annotations

import numpy as np

# Candidate scales, as llama.cpp's make_qx_quants tries them: the block's largest magnitude mapped to
# -(qmax_neg + t) for t in these steps.
_STEPS = tuple(0.1 * i for i in range(-9, 10))


def _levels(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None,
                    rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (N, K) quantized along K in blocks: (packed uint8 (N, K/block, block*bits/8), scales (N, K/block)).

    Without ``importance``: round to nearest with the block's largest magnitude on the widest level
    (llama.cpp's Q4_0 / Q8_0: -8 for 4 bits, +-127 for 8). With ``importance`` (K,): the scale among
    :data:`_STEPS` that minimises sum_j c_j (w_j - d q_j)^2, d refitted by weighted least squares, with
    c_j = importance_j * sqrt(mean_row(w^2) + w_j^2) as llama.cpp weighs it (lower KLD than importance
    alone: docs/choices.md).
    Done ``rows`` rows at a time, so temporaries stay small beside a 151,936-row table."""
    n, k = w.shape
    lo, hi = _levels(bits)
    nb = -(-k // block_size)
    if nb * block_size != k:
        # An input size that is not a multiple of the block size (SmolLM2's 576 against blocks of 128):
        # the last block is padded with zeros, as MatMulNBits reads it (its K attribute is the true size,
        # the padded weights meet no input). Zeros round to level 0 and leave the block's scale alone.
        pad = nb * block_size - k
        w = _Padded(w, pad)
        if importance is not None:
            importance = np.concatenate([np.asarray(importance, dtype=np.float32), np.zeros(pad, np.float32)])
        k = nb * block_size
    rows = rows or max(1, (1 << 22) // k)
    packed = np.empty((n, nb, block_size * bits // 8), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=np.float32)
    imp = None
    if importance is not None:
        imp = np.maximum(np.asarray(importance, dtype=np.float32), 1e-12).reshape(1, nb, block_size)
    for start in range(0, n, rows):
        x = np.asarray(w[start:start + rows], dtype=np.float32).reshape(-1, nb, block_size)
        weight = None if imp is None else importance_weights(imp, x, (x * x).mean(axis=(1, 2), keepdims=True))
        q, d = _round(x, bits, lo, hi, weight)
        packed[start:start + rows] = pack(q, bits)
        scales[start:start + rows] = d
    return packed, scales


def importance_weights(imp: np.ndarray, x: np.ndarray, row_energy: np.ndarray) -> np.ndarray:
    """How much each weight's rounding error counts: llama.cpp's importance x sqrt(mean row w^2 + w^2)
    (measured better than importance alone: docs/choices.md)."""
    return imp * np.sqrt(row_energy + x * x)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed levels (..., block) as MatMulNBits stores them: offset by 2^(bits-1), two 4-bit values a
    byte (low nibble first)."""
    lo, _ = _levels(bits)
    q = (q.astype(np.int16) - lo).astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q


class _Padded:
    """``w`` (N, K) read ``rows`` at a time with ``pad`` zero columns on the right: no padded copy of a
    whole table is ever made."""

    def __init__(self, w, pad: int):
        self.w, self.pad = w, pad
        self.shape = (w.shape[0], w.shape[1] + pad)

    def __getitem__(self, rows):
        block = np.asarray(self.w[rows], dtype=np.float32)
        return np.pad(block, ((0, 0), (0, self.pad)))


def _round(x: np.ndarray, bits: int, lo: int, hi: int, imp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(levels, scales) for blocks ``x`` (R, nb, B)."""
    idx = np.abs(x).argmax(axis=-1)[..., None]
    peak = np.take_along_axis(x, idx, axis=-1)[..., 0]  # signed largest magnitude
    peak = np.where(peak == 0, 1.0, peak).astype(np.float32)
    if bits == 8:
        d = np.abs(peak) / hi  # symmetric +-127 (Q8_0)
    else:
        d = peak / lo  # the largest magnitude on the widest level, -8 (Q4_0)
    q = np.clip(np.rint(x / d[..., None]), lo, hi)
    if imp is None:
        return q.astype(np.int8), d
    best_q, best_d = q, d
    lx = (imp * x * q).sum(-1)
    l2 = (imp * q * q).sum(-1)
    best = np.where(l2 > 0, lx * lx / np.maximum(l2, 1e-30), 0.0)
    best_d = np.where(l2 > 0, lx / np.maximum(l2, 1e-30), d)
    top = lo if bits == 4 else -hi
    for t in _STEPS:
        inv = (top - t) / peak  # 1 / candidate scale
        cq = np.clip(np.rint(x * inv[..., None]), lo, hi)
        lx = (imp * x * cq).sum(-1)
        l2 = (imp * cq * cq).sum(-1)
        score = np.where(l2 > 0, lx * lx / np.maximum(l2, 1e-30), 0.0)
        better = score > best
        if better.any():
            best = np.where(better, score, best)
            best_d = np.where(better, lx / np.maximum(l2, 1e-30), best_d)
            best_q = np.where(better[..., None], cq, best_q)
    # levels refitted for the chosen scale (the scale changed from the candidate's by the refit)
    best_d = np.where(best_d == 0, 1.0, best_d).astype(np.float32)
    q = np.clip(np.rint(x / best_d[..., None]), lo, hi)
    better_refit = (imp * (x - best_d[..., None] * q) ** 2).sum(-1) <= (imp * (x - best_d[..., None] * best_q) ** 2).sum(-1)
    q = np.where(better_refit[..., None], q, best_q)
    return q.astype(np.int8), best_d


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, bits: int, k: int | None = None) -> np.ndarray:
    """(N, K) float32 from :func:`quantize_blocks`' output (``k``: the true input size, where the last
    block was padded)."""
    lo, _ = _levels(bits)
    if bits == 4:
        packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    q = packed.astype(np.float32) + lo
    return (q * scales[..., None]).reshape(scales.shape[0], -1)[:, :k]


def weighted_error(w: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None) -> float:
    """The importance-weighted rounding error of ``w`` (N, K), relative to its weighted energy: how much
    of a projection's output (under the calibration activations) its quantization disturbs."""
    packed, scales = quantize_blocks(w, bits, block_size, importance)
    err = dequantize_blocks(packed, scales, bits, w.shape[1]) - w
    imp = np.ones(w.shape[1], np.float32) if importance is None else np.asarray(importance, np.float32)
    return float((np.square(err) @ imp).sum() / max((np.square(w) @ imp).sum(), 1e-30))


def to_matmulnbits(model, weights, bits_of: dict[str, int], block_size: int, accuracy_level: int | None,
                   importance: dict[str, np.ndarray] | None = None,
                   rounders: dict | None = None) -> dict[str, int]:
    """Replace each ``MatMul(x, W)`` whose weight ``W`` is in ``bits_of`` by ``MatMulNBits`` at that
    many bits, in ``model`` (a ModelProto loaded without its weights; ``weights``: a
    pipeline.quant.smoothquant.Weights over it, so scalings recorded there are applied first). Each
    weight is read, quantized and dropped in turn; one in ``rounders`` is rounded by that function of
    (w (N, K), bits, block_size) -> (packed, scales) instead (GPTQ's: pipeline/quant/gptq.py). Returns the
    count per bit width."""
    from onnx import helper, numpy_helper

    nodes = list(model.graph.node)
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    init = {t.name: t for t in model.graph.initializer}
    out, counts, drop = [], {}, set()
    for node in nodes:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if name not in bits_of:
            out.append(node)
            continue
        bits = bits_of[name]
        w = weights.current(name)  # (K, N)
        k, n = w.shape
        imp = None if importance is None else importance.get(name)
        if rounders and name in rounders:
            packed, scales = rounders[name](np.ascontiguousarray(w.T), bits, block_size)
        else:
            packed, scales = quantize_blocks(np.ascontiguousarray(w.T), bits, block_size, imp)
        del w
        q_name, s_name = f"{name}_Q{bits}", f"{name}_scales"
        model.graph.initializer.extend([numpy_helper.from_array(packed, q_name),
                                        numpy_helper.from_array(scales.reshape(-1), s_name)])
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size}
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        out.append(helper.make_node("MatMulNBits", [node.input[0], q_name, s_name], list(node.output),
                                    name=f"{node.name}_Q{bits}", domain="com.microsoft", **attrs))
        counts[bits] = counts.get(bits, 0) + 1
        if readers[name] == 1:
            drop.add(name)
    del model.graph.node[:]
    model.graph.node.extend(out)
    keep = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    weights.tensors = {t.name: t for t in model.graph.initializer} | {n: init[n] for n in drop}
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts
