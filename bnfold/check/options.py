"""How a folded model is checked: the check stage's options (imports nothing heavy)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_SEEDS", "VerifyOptions"]

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
