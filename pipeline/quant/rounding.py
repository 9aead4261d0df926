"""Calibration statistics on a coarse grid, so that another CPU's kernels give the same artifact.

ORT's MLAS picks its kernels from the CPU (AVX2, AVX-512, VNNI) with no switch, so a calibration run
on another machine can give ranges and channel maxima that differ in the last bits, and with them
other quantization scales and another artifact id. Rounded outward to ``bits`` mantissa bits (the
range can only widen, by less than 2^-bits of itself), a last-bit difference changes nothing unless
it crosses a grid point: with 4 bits a value moves by at most 1/16 of itself, and a difference of
1e-6 relative crosses a grid point with probability about 1e-5."""

from __future__ import annotations

import numpy as np


def outward(x, bits: int, up: bool):
    """``x`` on a grid of ``bits`` mantissa bits: rounded towards +inf (``up``) or -inf. bits 0: unchanged."""
    x = np.asarray(x)
    if bits <= 0:
        return x
    mantissa, exponent = np.frexp(x.astype(np.float64))  # x = mantissa * 2**exponent, |mantissa| in [0.5, 1)
    scale = float(1 << (bits + 1))
    step = np.ceil if up else np.floor
    return np.ldexp(step(mantissa * scale) / scale, exponent).astype(x.dtype)


def coarsen_ranges(ranges, bits: int):
    """ORT's calibration ranges (TensorsData: lowest, highest per tensor), widened onto the grid."""
    from onnxruntime.quantization.calibrate import TensorData

    if bits <= 0:
        return ranges
    for name in list(ranges.keys()):
        td = ranges[name]
        fields = {k: getattr(td, k) for k in td._attrs}  # ORT's TensorData keeps its field names there
        fields["lowest"] = outward(td.lowest, bits, up=False)
        fields["highest"] = outward(td.highest, bits, up=True)
        ranges[name] = TensorData(**fields)
    return ranges


def coarsen_maxima(maxima: dict, bits: int) -> dict:
    """SmoothQuant's per-channel activation maxima, rounded up onto the grid."""
    return {name: outward(m, bits, up=True) for name, m in maxima.items()}
