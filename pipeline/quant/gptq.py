"""GPTQ into ``MatMulNBits``' layout: each projection's blocks rounded one input channel at a time, the
rounding error of each channel pushed onto the channels not yet rounded through the inverse Hessian of
the layer's input (Frantar et al., 2022, "GPTQ"), so that the *output* error under the calibration
activations is small, not each weight's.

Why our own: the maintained GPTQ libraries (gptqmodel, auto-round, ORT's neural-compressor path) quantize
torch ``nn.Linear`` modules of a Hugging Face model; our int4 stage starts from the fused ONNX graph
(its weights already AWQ-scaled and folded into the RMSNorm gammas, in MatMul's (K, N) layout), and
ORT's own GPTQ needs neural-compressor 2.x (numpy < 2). The algorithm is ~40 lines of linear algebra on
the weights we already stream one at a time; a library would need the torch model in RAM beside them.

What is ours beyond the paper: each block's scale is chosen, at the block's start, by
pipeline/quant/nbits.py's importance-weighted search (llama.cpp's, with the Hessian's diagonal as the
importance), and the Hessians come from the float graph in one calibration pass over the imatrix's own
token windows (not layer by layer through the quantized model: one pass, the activations every other
int4 algorithm sees). Memory is bounded: Hessians are collected for as many activations as fit
:data:`HESSIAN_BYTES` at a time, a calibration pass per such chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.quant import nbits

HESSIAN_BYTES = 2 << 30  # float32 X^T X per activation: Qwen3-0.6B needs 1.8 GB (one pass), 4B 17.9 GB (9 passes)
DAMP = 0.01              # the paper's: 1 % of the mean diagonal added, so that H is invertible on few tokens


def chunks(sizes: dict[str, int], budget: int = HESSIAN_BYTES) -> list[list[str]]:
    """Activations (name -> channels) grouped so that each group's float32 K x K Hessians fit ``budget``."""
    out: list[list[str]] = [[]]
    used = 0
    for name, k in sizes.items():
        need = 4 * k * k
        if out[-1] and used + need > budget:
            out.append([])
            used = 0
        out[-1].append(name)
        used += need
    return [c for c in out if c]


def hessians(graph, weights_dir: Path, tensors: list[str], config: dict, windows: np.ndarray, work: Path,
             label: str) -> dict[str, np.ndarray]:
    """sum over calibration tokens of x x^T (float32, K x K) for each of ``tensors``."""
    from pipeline.quant.imatrix import channel_statistics

    return {name: s["xtx"] for name, s in channel_statistics(graph, weights_dir, tensors, config, windows, work,
                                                             label, outer=True).items()}


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, as GPTQ uses it; the damping grows
    tenfold (at most 4 times) where H is too ill-conditioned for it."""
    h = h.astype(np.float64)
    if not np.isfinite(h).all():
        raise PipelineError("gptq: the calibration activations are not finite (inf or NaN in a projection's "
                            "input): the parent graph overflows on the calibration text")
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # a channel the calibration never lit: plain rounding, its error goes nowhere
    mean = float(np.mean(np.diag(h)))
    for attempt in range(5):
        try:
            hd = h + (damp * 10 ** attempt) * mean * np.eye(len(h))
            inv = np.linalg.inv(hd)
            return np.linalg.cholesky((inv + inv.T) / 2).T
        except np.linalg.LinAlgError:
            continue
    raise PipelineError("gptq: an input's Hessian is not positive definite even with 10,000x the damping: "
                        "use int4.algorithm awq")


class Rounder:
    """GPTQ for every projection that reads one input: its Hessian's inverse factor computed once (q, k
    and v share theirs, gate and up theirs). Called as nbits.to_matmulnbits' rounders are."""

    def __init__(self, h: np.ndarray, damp: float = DAMP):
        self.h, self.damp, self._factor = h, damp, {}

    def factor(self, kp: int) -> tuple[np.ndarray, np.ndarray]:
        """(upper Cholesky factor of the damped inverse, diagonal) of H padded to ``kp`` channels (K not a
        multiple of the block: the padded channels hold zero weights and take no error)."""
        if kp not in self._factor:
            k = len(self.h)
            H = np.eye(kp, dtype=np.float64)
            H[:k, :k] = self.h
            self._factor = {kp: (_inverse_cholesky(H, self.damp).astype(np.float32),
                                 np.maximum(np.diag(H)[None, :], 1e-12).astype(np.float32))}
        return self._factor[kp]

    def __call__(self, w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        return quantize(w, self, bits, block_size)


def quantize(w: np.ndarray, h, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (N, K), ``h`` the inputs' x x^T (K, K) or its :class:`Rounder`: (packed, scales) as
    :func:`nbits.quantize_blocks` gives them (blocks of ``block_size`` along K, symmetric, MatMulNBits' layout)."""
    n, k = w.shape
    lo, hi = nbits._levels(bits)
    nb = -(-k // block_size)
    kp = nb * block_size
    W = np.zeros((n, kp), np.float32)
    W[:, :k] = w
    U, diag = (h if isinstance(h, Rounder) else Rounder(h)).factor(kp)
    row_energy = (W * W).mean(axis=1, keepdims=True)
    Q = np.empty((n, kp), np.int8)
    scales = np.empty((n, nb), np.float32)
    for b in range(nb):
        s, e = b * block_size, (b + 1) * block_size
        Wb = W[:, s:e]  # a view: updated in place as the block's channels are rounded
        weight = nbits.importance_weights(diag[:, s:e], Wb, row_energy)
        _, d = nbits._round(Wb[:, None, :], bits, lo, hi, weight[:, None, :])
        d = d[:, 0]
        Ub = U[s:e, s:e]
        err = np.empty((n, block_size), np.float32)
        for j in range(block_size):
            col = Wb[:, j]
            q = np.clip(np.rint(col / d), lo, hi)
            Q[:, s + j] = q
            err[:, j] = (col - q * d) / Ub[j, j]
            Wb[:, j + 1:] -= np.outer(err[:, j], Ub[j, j + 1:])
        W[:, e:] -= err @ U[s:e, e:]
        scales[:, b] = d
    return nbits.pack(Q.reshape(n, nb, block_size), bits), scales
