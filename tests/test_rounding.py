"""Calibration statistics on a coarse grid (pipeline/quant/rounding.py): last-bit differences between two
CPUs' kernels do not reach the quantization scales."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.quant.rounding import coarsen_maxima, coarsen_ranges, outward

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32).filter(lambda v: abs(v) > 1e-30)


@given(finite)
def test_rounding_is_outward_and_within_its_grid(v):
    x = np.float32(v)
    up, down = outward(x, 4, up=True), outward(x, 4, up=False)
    assert down <= x <= up
    assert abs(up - x) <= abs(x) / 16 and abs(x - down) <= abs(x) / 16
    assert outward(up, 4, up=True) == up  # already on the grid


def test_a_few_ulps_apart_give_the_same_value():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 10).astype(np.float32)
    for ulps in (1, 8, 64):
        y = x + ulps * np.spacing(x)  # another kernel's last bits
        same = outward(x, 4, up=True) == outward(y, 4, up=True)
        assert same.mean() > 0.99, (ulps, same.mean())
    np.testing.assert_array_equal(outward(x, 0, up=True), x)  # 0 bits: as computed


def test_ort_ranges_and_smoothquant_maxima_are_coarsened():
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData

    ranges = TensorsData(CalibrationMethod.MinMax, {"a": (np.float32(-0.3001), np.float32(2.7183))})
    out = coarsen_ranges(ranges, 4)["a"]
    assert out.lowest == np.float32(-0.3125) and out.highest == np.float32(2.75)
    assert out.lowest.dtype == np.float32 and out.highest.dtype == np.float32
    m = coarsen_maxima({"x": np.array([0.3001, 1.0], np.float32)}, 4)["x"]
    np.testing.assert_array_equal(m, np.array([0.3125, 1.0], np.float32))
