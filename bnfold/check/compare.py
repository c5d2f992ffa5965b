"""Comparison metrics and tolerances: one tensor of the folded model against the original's.

An element passes when ``|folded - original| <= atol + rtol * |original|`` (numpy's ``allclose`` rule, the
original as reference). Non-finite values: NaN in both at the same place is equal, the same infinity in
both is equal; NaN or inf against anything else is a failure whatever the tolerance. Different shape or
dtype is a failure.

Default tolerances per output dtype (``atol`` is multiplied by ``max(1, max|original|)`` of that output,
so a logit tensor in the thousands is judged relative to its own scale):

==========  =========  ==============  =====================================================
dtype       rtol       atol (x scale)  why
==========  =========  ==============  =====================================================
float64     1e-9       1e-10           a fold done in float32 by mistake (~1e-7) still fails
float32     1e-4       1e-5            measured: correct folds stay under 3e-6 x scale (20 layers)
float16     1e-2       1e-2            measured: correct folds stay under 4e-3 x scale (20 layers)
bfloat16    8e-2       8e-2            8x the float16 figures: bfloat16 has 3 fewer mantissa bits
other float 10 x eps   10 x eps        float8 / float4 variants
int, bool   exact      exact           an index or a mask is right or wrong
==========  =========  ==============  =====================================================

``rtol=`` / ``atol=`` (``--rtol`` / ``--atol``) override the float rows and are taken literally (no
scaling); integer and bool outputs stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import ml_dtypes
import numpy as np

from bnfold.io.dtypes import is_float

__all__ = [
    "DEFAULT_TOLERANCES",
    "RULE",
    "OutputComparison",
    "Tolerances",
    "compare_arrays",
    "figure",
]

DEFAULT_TOLERANCES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "float64": (1e-9, 1e-10),
        "float32": (1e-4, 1e-5),
        "float16": (1e-2, 1e-2),
        "bfloat16": (8e-2, 8e-2),
    }
)
"""dtype name -> (rtol, atol before scaling by ``max(1, max|original|)``)."""

RULE = "|folded - original| <= atol + rtol * |original|"


def _num(x: float | None) -> float | None:
    """Finite floats as is; None for 'not applicable' (JSON has no inf/nan)."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


@dataclass(frozen=True)
class Tolerances:
    """Tolerance policy: the dtype defaults above, with optional literal overrides for float outputs."""

    rtol: float | None = None
    atol: float | None = None
    judge_as: str | None = None
    """Judge float outputs by this dtype's defaults (a bfloat16 model checked widened to float32)."""

    def __post_init__(self) -> None:
        for name, value in (("rtol", self.rtol), ("atol", self.atol)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    def resolve(self, dtype: np.dtype, ref_max_abs: float) -> tuple[float, float]:
        """(rtol, atol) for one output of ``dtype`` whose reference peaks at ``ref_max_abs``."""
        dtype = np.dtype(dtype)
        if not is_float(dtype):
            return 0.0, 0.0
        name = self.judge_as or dtype.name
        if name in DEFAULT_TOLERANCES:
            rtol, atol = DEFAULT_TOLERANCES[name]
        else:
            eps = float(ml_dtypes.finfo(dtype).eps)
            rtol = atol = 10 * eps
        scale = max(1.0, ref_max_abs) if math.isfinite(ref_max_abs) else 1.0
        return (
            self.rtol if self.rtol is not None else rtol,
            self.atol if self.atol is not None else atol * scale,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "rule": RULE,
            "rtol_override": self.rtol,
            "atol_override": self.atol,
            "defaults": {k: {"rtol": r, "atol": a} for k, (r, a) in DEFAULT_TOLERANCES.items()},
            "default_atol_scaled_by": "max(1, max|original|) per output",
            "integer_and_bool": "exact",
            "float_outputs_judged_as": self.judge_as,
        }


@dataclass(frozen=True)
class OutputComparison:
    """One tensor compared between the original (reference) and the folded model.

    Error figures are over the positions where both values are finite; None where they do not apply
    (shape or dtype mismatch, no finite element; needed_* when no tolerance would pass).
    """

    name: str
    passed: bool
    reason: str
    """One line; empty when passed."""
    dtype: str
    shape: tuple[int, ...]
    size: int
    rtol: float
    atol: float
    max_abs: float | None = None
    max_rel: float | None = None
    """Over elements with a non-zero reference."""
    mean_abs: float | None = None
    p999_abs: float | None = None
    """99.9th percentile of the absolute error."""
    cosine: float | None = None
    ref_max_abs: float | None = None
    needed_atol: float | None = None
    """Smallest atol that passes at this rtol."""
    needed_rtol: float | None = None
    """Smallest rtol that passes at this atol."""
    mismatched: int = 0
    nonfinite_mismatched: int = 0
    worst_index: tuple[int, ...] | None = None

    @property
    def severity(self) -> tuple[bool, bool, float]:
        """Sort key, larger is worse: failing, then beyond any tolerance, then needed_atol / atol."""
        return (not self.passed, self.needed_atol is None, (self.needed_atol or 0.0) / max(self.atol, 1e-300))

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "passed": self.passed,
            "reason": self.reason,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "size": self.size,
            "rtol": self.rtol,
            "atol": self.atol,
            "max_abs": _num(self.max_abs),
            "max_rel": _num(self.max_rel),
            "mean_abs": _num(self.mean_abs),
            "p999_abs": _num(self.p999_abs),
            "cosine": _num(self.cosine),
            "ref_max_abs": _num(self.ref_max_abs),
            "needed_atol": _num(self.needed_atol),
            "needed_rtol": _num(self.needed_rtol),
            "mismatched": self.mismatched,
            "nonfinite_mismatched": self.nonfinite_mismatched,
            "worst_index": None if self.worst_index is None else list(self.worst_index),
        }


def figure(x: float | None) -> str:
    """A figure for a message or a table: three significant digits; ``-`` for None."""
    return "-" if x is None else f"{x:.3g}"


def _nonfinite_reason(ref: np.ndarray, got: np.ndarray, bad: np.ndarray) -> str:
    n, size = int(bad.sum()), bad.size
    r, g = ref[bad], got[bad]
    for label, a, b in (("folded", g, r), ("original", r, g)):
        for kind, test in (("NaN", np.isnan), ("inf", np.isinf)):
            k = int((test(a) & np.isfinite(b)).sum())
            if k:
                return f"{label} has {kind} at {k} of {size} positions where the other model is finite"
    return f"{n} of {size} positions hold different non-finite values (NaN vs inf, or +inf vs -inf)"


def compare_arrays(
    name: str, reference: object, candidate: object, tolerances: Tolerances | None = None
) -> OutputComparison:
    """Compare ``candidate`` (folded) against ``reference`` (original) element by element."""
    tolerances = tolerances or Tolerances()
    ref, got = np.asarray(reference), np.asarray(candidate)
    dtype, shape, size = ref.dtype.name, tuple(int(n) for n in ref.shape), int(ref.size)
    if ref.dtype != got.dtype or ref.shape != got.shape:
        what = "dtype" if ref.dtype != got.dtype else "shape"
        a = ref.dtype.name if what == "dtype" else list(ref.shape)
        b = got.dtype.name if what == "dtype" else list(got.shape)
        return OutputComparison(
            name, False, f"{what} differs: original {a}, folded {b}", dtype, shape, size, rtol=0.0, atol=0.0
        )
    if ref.dtype.kind in "OSU" or ref.dtype.kind == "c":
        equal = ref == got
        if ref.dtype.kind == "c":
            equal |= np.isnan(ref) & np.isnan(got)
        n = int((~equal).sum())
        reason = f"{n} of {ref.size} elements differ" if n else ""
        return OutputComparison(name, n == 0, reason, dtype, shape, size, rtol=0.0, atol=0.0, mismatched=n)

    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    fin_r, fin_g = np.isfinite(r), np.isfinite(g)
    same_nonfinite = (np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g))
    bad = ~(fin_r & fin_g) & ~same_nonfinite
    both = fin_r & fin_g
    with np.errstate(invalid="ignore", over="ignore"):
        d_full = np.where(both, np.abs(r - g), 0.0)
    d, rv = d_full[both], np.abs(r[both])
    ref_max = float(rv.max()) if rv.size else 0.0
    rtol, atol = tolerances.resolve(ref.dtype, ref_max)
    exceed = d > atol + rtol * rv
    n_bad, n_exceed = int(bad.sum()), int(exceed.sum())

    max_abs = mean_abs = p999 = max_rel = cosine = needed_atol = needed_rtol = None
    worst: tuple[int, ...] | None = None
    if d.size:
        max_abs, mean_abs, p999 = float(d.max()), float(d.mean()), float(np.quantile(d, 0.999))
        nz = rv > 0
        max_rel = float((d[nz] / rv[nz]).max()) if nz.any() else 0.0
        nr, ng = float(np.linalg.norm(rv)), float(np.linalg.norm(g[both]))
        both_zero = 1.0 if nr == ng else 0.0
        cosine = both_zero if nr == 0.0 or ng == 0.0 else float(np.dot(r[both], g[both]) / (nr * ng))
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(d_full)), ref.shape)) if ref.ndim else ()
    elif ref.size == 0:
        max_abs = mean_abs = p999 = max_rel = 0.0
        cosine = 1.0
    if n_bad == 0:
        needed_atol = float(max(0.0, (d - rtol * rv).max())) if d.size else 0.0
        over = d > atol
        if not over.any():
            needed_rtol = 0.0
        elif (rv[over] > 0).all():
            needed_rtol = float(((d[over] - atol) / rv[over]).max())
    reason = ""
    if n_bad:
        reason = _nonfinite_reason(r, g, bad)
    elif n_exceed:
        reason = (
            f"{n_exceed} of {ref.size} elements exceed atol {figure(atol)} + rtol {figure(rtol)} x |original|; "
            f"max abs error {figure(max_abs or 0.0)} at {list(worst) if worst is not None else '?'}"
        )
    return OutputComparison(
        name,
        passed=not reason,
        reason=reason,
        dtype=dtype,
        shape=shape,
        size=size,
        rtol=rtol,
        atol=atol,
        max_abs=max_abs,
        max_rel=max_rel,
        mean_abs=mean_abs,
        p999_abs=p999,
        cosine=cosine,
        ref_max_abs=ref_max,
        needed_atol=needed_atol,
        needed_rtol=needed_rtol,
        mismatched=n_bad + n_exceed,
        nonfinite_mismatched=n_bad,
        worst_index=worst,
    )
