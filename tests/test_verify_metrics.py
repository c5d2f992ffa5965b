"""bnfold.check.compare: the metrics of one output against its reference, non-finite rules, exactness of
integers, and the tolerance table.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bnfold.check import (
    Tolerances,
    compare_arrays,
)


def test_compare_arrays_figures():
    ref = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    got = ref + np.array([0, 1e-3, 0, 0], np.float32)
    r = compare_arrays("y", ref, got)
    err = float(np.float32(2.001) - np.float32(2.0))  # the float32 rounding of 1e-3 at 2.0
    assert not r.passed and r.mismatched == 1 and r.worst_index == (1,)
    assert r.rtol == 1e-4 and r.atol == pytest.approx(4e-5)  # 1e-5 x max(1, max|ref| = 4)
    assert r.max_abs == pytest.approx(err) and r.mean_abs == pytest.approx(err / 4)
    assert r.max_rel == pytest.approx(err / 2)
    assert r.needed_atol == pytest.approx(err - 1e-4 * 2)
    assert r.needed_rtol == pytest.approx((err - 4e-5) / 2)
    assert r.cosine == pytest.approx(1.0, abs=1e-6)
    assert "1 of 4 elements exceed atol 4e-05" in r.reason
    # what it would have needed is exactly enough
    assert compare_arrays("y", ref, got, Tolerances(atol=r.needed_atol * 1.001)).passed
    assert not compare_arrays("y", ref, got, Tolerances(atol=r.needed_atol * 0.99)).passed


def test_compare_arrays_quantile_and_cosine():
    ref = np.ones(1000)
    got = ref.copy()
    got[17] += 5.0
    r = compare_arrays("y", ref, got)
    assert r.max_abs == 5.0 and r.mean_abs == pytest.approx(0.005)
    assert r.p999_abs == pytest.approx(0.001 * 5.0)  # linear interpolation between the two largest
    assert compare_arrays("y", np.array([1.0, 0.0]), np.array([0.0, 1.0])).cosine == pytest.approx(0.0)
    assert compare_arrays("y", np.array([1.0, -2.0]), np.array([-1.0, 2.0])).cosine == pytest.approx(-1.0)


def test_nonfinite_rules():
    ref = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert compare_arrays("y", ref, ref.copy()).passed  # same NaN / same inf are equal
    bad = compare_arrays("y", ref, np.array([np.nan, np.inf, -np.inf, np.inf], np.float32))
    assert not bad.passed and bad.nonfinite_mismatched == 1 and bad.needed_atol is None
    assert bad.reason == "folded has inf at 1 of 4 positions where the other model is finite"
    flipped = compare_arrays("y", ref, np.array([np.nan, -np.inf, -np.inf, 1.0], np.float32))
    assert not flipped.passed and "different non-finite" in flipped.reason
    nan = compare_arrays("y", np.zeros(3, np.float16), np.array([0, np.nan, 0], np.float16))
    assert nan.reason == "folded has NaN at 1 of 3 positions where the other model is finite"


def test_shape_dtype_and_integer_exactness():
    a = np.zeros((2, 3), np.float32)
    assert (
        compare_arrays("y", a, np.zeros((3, 2), np.float32)).reason == "shape differs: original [2, 3], folded [3, 2]"
    )
    assert compare_arrays("y", a, a.astype(np.float16)).reason == "dtype differs: original float32, folded float16"
    ints = np.array([3, 1, 4], np.int64)
    off = compare_arrays("idx", ints, np.array([3, 2, 4], np.int64), Tolerances(rtol=0.5, atol=5))
    assert not off.passed and (off.rtol, off.atol) == (0.0, 0.0) and off.max_abs == 1.0  # overrides: floats only
    assert compare_arrays("m", np.array([True, False]), np.array([True, False])).passed
    assert not compare_arrays("m", np.array([True, False]), np.array([True, True])).passed


def test_tolerance_table_scaling_and_override():
    t = Tolerances()
    assert t.resolve(np.dtype(np.float32), 1000.0) == (1e-4, pytest.approx(1e-2))
    assert t.resolve(np.dtype(np.float32), 0.5) == (1e-4, 1e-5)  # scale never below 1
    assert t.resolve(np.dtype(np.float16), 2.0) == (1e-2, 2e-2)
    assert t.resolve(np.dtype(np.float64), 1.0) == (1e-9, 1e-10)
    assert t.resolve(np.dtype(ml_dtypes.bfloat16), 1.0) == (8e-2, 8e-2)
    assert t.resolve(np.dtype(ml_dtypes.float8_e4m3fn), 1.0) == (1.25, 1.25)  # 10 x eps
    assert Tolerances(rtol=1e-3, atol=1e-3).resolve(np.dtype(np.float32), 1000.0) == (1e-3, 1e-3)  # literal
    with pytest.raises(ValueError, match="atol must be"):
        Tolerances(atol=-1.0)
