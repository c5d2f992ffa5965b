"""folding/math.py: the formulas on their own, against float64 references and hand-made cases."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bnfold.folding.math import Affine, RoundingError, WeightLayout, fold_bias, op_affine, round_to

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_bfloat16_is_rounded_once_from_float64() -> None:
    """Just above a bfloat16 halfway point, but equal to it in float32: a cast through float32 rounds to
    even (down); one rounding from float64 goes up."""
    above_half = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8], dtype=np.float64)
    got = round_to(above_half, BF16, "w").astype(np.float64)
    assert got.tolist() == [1 + 2**-7, -(1 + 2**-7), 1.0]  # the exact halfway case ties to even


def test_bfloat16_rounding_matches_exact_nearest_on_random_values() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20000) * np.exp(rng.uniform(-30, 30, 20000))
    got = round_to(x, BF16, "w").astype(np.float64)  # no neighbour of the result is nearer to x
    lo = np.nextafter(got.astype(BF16), np.array(-np.inf, BF16)).astype(np.float64)
    hi = np.nextafter(got.astype(BF16), np.array(np.inf, BF16)).astype(np.float64)
    assert np.all(np.abs(got - x) <= np.abs(lo - x)) and np.all(np.abs(got - x) <= np.abs(hi - x))


def test_overflow_is_refused_not_inf() -> None:
    with pytest.raises(RoundingError, match="overflows float16"):
        round_to(np.array([70000.0]), np.dtype(np.float16), "weight")


@pytest.mark.parametrize(("layout", "shape", "channels"), [
    (WeightLayout(0), (6, 2, 3, 3), 6),                # Conv [M, C/g, k, k]
    (WeightLayout(1, groups=3), (6, 2, 3, 3), 6),      # ConvTranspose [C, M/g, k, k], 3 groups
    (WeightLayout(1), (4, 5), 5),                      # Gemm B [K, N]
    (WeightLayout(-1), (2, 4, 5), 5),                  # MatMul [..., K, N]
])
def test_weight_layout_scales_exactly_the_output_channels(layout: WeightLayout, shape: tuple[int, ...],
                                                          channels: int) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, channels)
    assert layout.channels(w.shape) == channels
    got = layout.scale(w, scale)
    for c in range(channels):  # channel c alone: scaling it by 2 changes exactly its own weights
        probe = np.ones(channels)
        probe[c] = 2.0
        changed = layout.scale(w, probe) != w.astype(np.float64)
        assert np.count_nonzero(changed) == w.size // channels
        assert np.allclose(got[changed], w.astype(np.float64)[changed] * scale[c], rtol=0, atol=0)


def test_bias_of_a_gemm_broadcasts_on_its_last_axis_with_beta() -> None:
    affine = Affine(np.array([2.0, 3.0]), np.array([1.0, -1.0]))
    c = np.array([[1.0], [10.0]])  # [M, 1]: becomes [M, N]
    assert fold_bias(c, affine, beta=0.5, flat=False).tolist() == [[2.0, 0.5], [11.0, 14.0]]
    assert fold_bias(None, affine).tolist() == [1.0, -1.0]


@pytest.mark.parametrize(("op", "const_first", "x", "expected"), [
    ("Mul", False, 3.0, 6.0), ("Add", False, 3.0, 5.0), ("Sub", False, 3.0, 1.0), ("Sub", True, 3.0, -1.0),
    ("Div", False, 3.0, 1.5),
])
def test_elementwise_ops_are_affine_maps(op: str, const_first: bool, x: float, expected: float) -> None:
    found = op_affine(op, np.array([2.0]), const_first)
    assert found is not None and float(found.scale[0] * x + found.shift[0]) == expected


def test_division_by_a_zero_constant_is_not_a_map() -> None:
    assert op_affine("Div", np.array([1.0, 0.0])) is None
