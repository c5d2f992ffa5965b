"""How models are timed, and the gate: the timing stage's options (imports nothing heavy)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_LEVELS", "LatencyOptions"]

DEFAULT_LEVELS: tuple[str, ...] = ("disable_all", "enable_all")


@dataclass(frozen=True)
class LatencyOptions:
    """Providers, levels, runs and inputs of a measurement (see :func:`bnfold.timing.latency`), and the gate."""

    runs: int = 100
    """Timed runs per model and configuration, split into ``rounds`` interleaved rounds."""
    warmup: int = 10
    """Untimed runs per model and configuration first."""
    rounds: int = 10
    creations: int = 3
    """Timed session creations per model and configuration."""
    threads: int | None = None
    """intra_op_num_threads (None: onnxruntime's default)."""
    levels: tuple[str, ...] = DEFAULT_LEVELS
    """onnxruntime optimization levels (names or enums)."""
    providers: str | Sequence[str] | None = None
    """None/"auto": CPU, plus CUDA when it really works; or names ("cpu", "cuda", full names)."""
    shapes: Mapping[str, Sequence[int] | int] | None = None
    """Input name -> shape, or symbolic dim -> value."""
    batch: int | None = None
    """Replaces a dynamic first dimension."""
    io_binding: bool = True
    include_copies: bool = False
    baseline: str | None = None
    """The label speed-ups and the gate are relative to ("original" if present, else the first)."""
    seed: int = 0
    confidence: float = 0.95
    resamples: int = 2000
    device_id: int = 0
    max_slowdown: float | None = None
    """Gate: exit code 5 when a candidate's median exceeds this many times the baseline's anywhere."""
    plot: str | os.PathLike[str] | None = None
    """Draw the per-run latency distributions here (PNG or SVG by suffix; needs ``bnfold[plot]``)."""

    def __post_init__(self) -> None:
        if isinstance(self.levels, str):
            object.__setattr__(self, "levels", (self.levels,))
        else:
            object.__setattr__(self, "levels", tuple(self.levels) or DEFAULT_LEVELS)
