"""How a folded model is checked: the check stage's options (imports nothing heavy)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_SEEDS", "VerifyOptions", "parse_range_option", "parse_shape_option"]

DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class VerifyOptions:
    """Inputs, tolerances and runtimes of a check (see :func:`bnfold.check.verify`)."""

    rtol: float | None = None
    """Literal relative tolerance for float outputs (None: by dtype, :mod:`bnfold.check.compare`)."""
    atol: float | None = None
    """Literal absolute tolerance for float outputs (None: by dtype, scaled by the output's magnitude)."""
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    """One run per seed for generated inputs."""
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None
    """Real inputs: name -> array, or a ``.npz`` path; the same for every seed."""
    input_ranges: Mapping[str, tuple[float, float]] | None = None
    """Input name -> half-open range ``[lo, hi)`` of generated values."""
    shapes: Mapping[str, Sequence[int] | int] | None = None
    """Input name -> full shape, or symbolic dim name -> value; ``""``: the only input."""
    providers: Sequence[str] | None = None
    """Execution providers (None: CPU, plus CUDA where it really runs)."""
    threads: int | None = None
    """onnxruntime intra-op threads (None: its default)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))


def parse_shape_option(text: str, *, allow_bare: bool = False) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` (or ``1x3x224x224``) -> ``("x", (1, 3, 224, 224))``.

    ``"batch=4"`` -> ``("batch", (4,))`` names a symbolic dim. With ``allow_bare``, ``"1,3,224,224"`` ->
    ``("", (1, 3, 224, 224))``: the shape of a model's only input. Raises ValueError with a one-line message.
    """
    name, sep, dims = text.rpartition("=")
    if allow_bare and not sep:
        name, sep = "", "="
    elif not sep or not name:
        raise ValueError(f"expected NAME=DIMS such as x=1,3,224,224, got {text!r}")
    if not dims.strip():
        raise ValueError(f"expected NAME=DIMS such as x=1,3,224,224, got {text!r}")
    parts = [p.strip() for p in dims.replace("x", ",").split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"dims must be integers separated by commas, got {dims!r} in {text!r}") from None
    if any(v < 0 for v in values):
        raise ValueError(f"dims must be >= 0, got {dims!r} in {text!r}")
    return name, values


def parse_range_option(text: str) -> tuple[str, tuple[float, float]]:
    """``"ids=0,30522"`` -> ``("ids", (0, 30522))``: the half-open range ``[lo, hi)`` of generated values."""
    name, sep, rng = text.rpartition("=")
    parts = rng.split(",")
    if not sep or not name or len(parts) != 2:
        raise ValueError(f"expected NAME=LO,HI such as ids=0,1000, got {text!r}")
    try:
        lo, hi = (int(p) if p.strip().lstrip("+-").isdigit() else float(p) for p in parts)
    except ValueError:
        raise ValueError(f"LO and HI must be numbers, got {rng!r} in {text!r}") from None
    if not lo < hi:
        raise ValueError(f"LO must be below HI, got {rng!r} in {text!r}")
    return name, (lo, hi)
