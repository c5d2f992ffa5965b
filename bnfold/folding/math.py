"""Every formula of every fold: pure numpy, float64, no graph plumbing (the ONNX rules and the torch stage
both call these; nothing else computes a folded value).

An inference BatchNormalization is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta  =  scale * x + shift
    scale = gamma / sqrt(var + eps)
    shift = beta - mean * scale

A linear producer ``x = W (*) a + b`` followed by ``y = scale * x + shift`` (per output channel ``c``)
becomes ``y = (scale[c] * W[c]) (*) a + (scale[c] * b[c] + shift[c])``. Every function here works in
float64 and the caller rounds each folded tensor exactly once with :func:`round_to`.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from bnfold.io.dtypes import is_native_float

__all__ = [
    "Affine",
    "RoundingError",
    "WeightLayout",
    "bn_affine",
    "compose",
    "fold_bias",
    "fold_into_conv_input",
    "fold_into_linear_input",
    "op_affine",
    "round_to",
    "scale_axis",
    "scale_grouped_axis1",
]


class RoundingError(ValueError):
    """A folded tensor cannot be represented in the model's dtype (overflow or non-finite)."""


@dataclass(frozen=True)
class Affine:
    """``y = scale * x + shift`` per channel, float64, both of shape ``[C]``."""

    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float, *, eps_float32: bool = True
) -> Affine:
    """The inference BatchNormalization as ``scale * x + shift``, in float64.

    Follows onnxruntime's evaluation order: ``(x - mean) / sqrt(var + eps) * gamma + beta``. The
    ``eps`` attribute is a float32 in ONNX, so it is first rounded to float32 as the runtime does
    (``eps_float32``); torch adds a float64 ``eps`` to float64 statistics as it is.
    """
    g, b, m, v = (np.asarray(t, dtype=np.float64).reshape(-1) for t in (gamma, beta, mean, var))
    eps64 = float(np.float32(eps)) if eps_float32 else float(eps)
    scale = g / np.sqrt(v + eps64)
    return Affine(scale=scale, shift=b - m * scale)


def compose(first: Affine, then: Affine) -> Affine:
    """``then(first(x))`` as one affine map."""
    return Affine(scale=first.scale * then.scale, shift=first.shift * then.scale + then.shift)


def scale_axis(weight: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` (float64) multiplied by ``scale`` broadcast along ``axis``."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    if is_native_float(weight.dtype):  # one pass, no float64 copy of the weight first (same values)
        return np.multiply(weight, scale.reshape(shape), dtype=np.float64)
    return np.asarray(weight, dtype=np.float64) * scale.reshape(shape)


def scale_grouped_axis1(weight: np.ndarray, scale: np.ndarray, groups: int) -> np.ndarray:
    """ConvTranspose weight ``[C_in, C_out/g, k...]``: output channel ``g*(C_out/g) + j`` is column ``j`` of
    the rows of group ``g``. Returns ``weight * scale`` on that layout, float64."""
    w = np.asarray(weight, dtype=np.float64)
    c_in, per_group = w.shape[0], w.shape[1]
    rest = w.shape[2:]
    w = w.reshape((groups, c_in // groups, per_group, *rest))
    s = scale.reshape((groups, 1, per_group) + (1,) * len(rest))
    return (w * s).reshape((c_in, per_group, *rest))


def fold_bias(bias: np.ndarray | None, affine: Affine, *, beta: float = 1.0, flat: bool = True) -> np.ndarray:
    """``scale * (beta * bias) + shift`` per channel, float64 (a missing bias is zero: the shift).

    ``flat``: the bias holds one value per channel (Conv's ``B``), returned as ``[C]``; otherwise it
    broadcasts against the channels on its last axis (a Gemm's ``C`` of shape ``[N]``, ``[1, N]``,
    ``[M, 1]``, ``[M, N]``; a MatMul's bias Add) and the result has the broadcast shape.
    """
    if bias is None:
        return affine.shift.copy()
    b64 = np.asarray(bias, dtype=np.float64)
    if flat:
        b64 = b64.reshape(-1)
    if beta != 1.0:
        b64 = beta * b64
    return b64 * affine.scale + affine.shift


def fold_into_conv_input(
    weight: np.ndarray, bias: np.ndarray | None, affine: Affine, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """``Conv(scale * x + shift, W, B)`` as ``Conv(x, W', B')`` for a Conv that pads nothing: float64 ``(W', B')``.

    ``weight`` is ``[M, C/groups, k...]``; ``affine`` has ``C`` channels. Input channel
    ``c = g * (C/groups) + j`` feeds the output channels of group ``g``: ``W'[m, j] = W[m, j] * scale[c]``,
    ``B'[m] = B[m] + sum over j, k of W[m, j, k] * shift[c]``.
    """
    w = np.asarray(weight, dtype=np.float64)
    m, per_group = w.shape[0], w.shape[1]
    spatial = (1,) * (w.ndim - 2)
    group_of_row = np.arange(m) // (m // groups)
    scale = affine.scale.reshape(groups, per_group)[group_of_row]  # [M, C/groups]
    shift = affine.shift.reshape(groups, per_group)[group_of_row]
    w_new = w * scale.reshape(m, per_group, *spatial)
    b_new = np.sum(w * shift.reshape(m, per_group, *spatial), axis=tuple(range(1, w.ndim)))
    if bias is not None:
        b_new = b_new + np.asarray(bias, dtype=np.float64).reshape(-1)
    return w_new, b_new


def fold_into_linear_input(weight: np.ndarray, affine: Affine, features_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scale * x + shift) @ W`` as ``x @ W' + c`` for a linear op whose weight has its input features
    on ``features_axis`` (Gemm ``B`` / MatMul: 0; Gemm with ``transB`` / torch Linear ``[out, in]``: 1):
    float64 ``(W', c)`` with ``W' = W * scale`` along the features and ``c[k] = sum over f of shift[f] * W[f, k]``
    (the caller adds it to its bias: Gemm ``alpha * c + beta * C``)."""
    w64 = np.asarray(weight, dtype=np.float64)
    by_feature = w64 if features_axis == 0 else w64.T  # [F, K]
    return scale_axis(weight, affine.scale, features_axis), affine.shift @ by_feature


def op_affine(op: str, values: np.ndarray, const_first: bool = False) -> Affine | None:
    """``op(x, c)`` (or ``op(c, x)`` with ``const_first``) as ``scale * x + shift`` with ``c = values``
    (float64, per channel): Mul ``(c, 0)``, Add ``(1, c)``, ``x - c`` ``(1, -c)``, ``c - x`` ``(-1, c)``,
    ``x / c`` ``(1/c, 0)``. None for ``x / c`` when ``c`` holds a zero. (``c / x`` is not affine in ``x``:
    a ValueError, like any other op.)"""
    ones, zeros = np.ones_like(values), np.zeros_like(values)
    if op == "Mul":
        return Affine(values, zeros)
    if op == "Add":
        return Affine(ones, values)
    if op == "Sub":
        return Affine(-ones, values) if const_first else Affine(ones, -values)
    if op != "Div" or const_first:
        raise ValueError(f"{op} with the constant {'first' if const_first else 'second'} is not affine in x")
    if np.any(values == 0):
        return None
    return Affine(1.0 / values, zeros)


@dataclass(frozen=True)
class WeightLayout:
    """Where a linear op's output channels lie in its weight: each producer declares this once
    (:mod:`bnfold.folding.producers` for ONNX ops, :mod:`bnfold.torch.producers` for torch ops).

    ``axis`` is the output-channel axis (negative: from the end); ``groups > 1`` splits that axis per group
    (ConvTranspose's ``[C_in, C_out/g, k...]``: output channel ``g * C_out/g + j`` is column ``j`` of the
    rows of group ``g``).
    """

    axis: int
    groups: int = 1

    def channels(self, shape: tuple[int, ...]) -> int:
        """Output channels of a weight of ``shape``."""
        return int(shape[self.axis]) * (self.groups if self.groups > 1 else 1)

    def scale(self, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """``weight`` with output channel ``c`` multiplied by ``scale[c]``, float64."""
        if self.groups > 1:
            return scale_grouped_axis1(weight, scale, self.groups)
        return scale_axis(weight, scale, self.axis % weight.ndim)


def _to_bfloat16(v64: np.ndarray, dt: np.dtype) -> np.ndarray:
    """float64 -> bfloat16 with a single round-to-nearest-even.

    ml_dtypes before 0.7 casts float64 to bfloat16 through float32 (double rounding: ``1 + 2**-8 + 2**-30``
    becomes 1.0, not 1.0078125); 0.7 rounds once but takes ~0.8 s to import, and bnfold accepts
    ml_dtypes >= 0.4. Rounding to float32 *to odd* first (truncate, then set the last bit when inexact)
    keeps the final rounding exact whichever version is installed (tests/test_math.py).
    """
    v32 = v64.astype(np.float32)
    too_far = np.abs(v32.astype(np.float64)) > np.abs(v64)
    v32 = np.where(too_far, np.nextafter(v32, np.float32(0)), v32)
    inexact = v32.astype(np.float64) != v64
    bits = v32.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32).astype(dt)


def round_to(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Round float64 ``values`` once to ``dtype``; refuse if that overflows or is not finite.

    ``what`` names the tensor in the error message.
    """
    v64 = np.asarray(values, dtype=np.float64)
    dt = np.dtype(dtype)
    if is_native_float(dt):  # fast path: a non-finite input stays non-finite, so checking the
        with np.errstate(over="ignore", invalid="ignore"):  # rounded result decides; explained below
            out = v64.astype(dt)
        if np.isfinite(out).all():
            return out
    if not np.all(np.isfinite(v64)):
        bad = int(np.size(v64) - np.count_nonzero(np.isfinite(v64)))
        raise RoundingError(f"folded {what} has {bad} non-finite value(s) (NaN or inf)")
    dt = np.dtype(dtype)
    if dt == np.float64:
        return v64.copy()
    if dt.name == "bfloat16":
        out = _to_bfloat16(v64, dt)
    elif np.issubdtype(dt, np.floating):
        with np.errstate(over="ignore"):
            out = v64.astype(dt)
    else:
        raise RoundingError(f"folded {what}: dtype {dt.name} is not a floating-point type")
    if not np.all(np.isfinite(out.astype(np.float64))):
        limit = float(ml_dtypes.finfo(dt).max)
        peak = float(np.max(np.abs(v64)))
        raise RoundingError(f"folded {what} overflows {dt.name} (largest magnitude {peak:.6g} > {limit:.6g})")
    return out
