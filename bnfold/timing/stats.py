"""Pure statistics for latency samples: summaries, the run schedule, the speed-up and its bootstrap CI.

Nothing here touches onnxruntime, so every function can be tested with synthetic numbers.

Spread is the interquartile range (p75 - p25), in milliseconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SPREAD",
    "LatencyStats",
    "Speedup",
    "bootstrap_ratio_ci",
    "interleaved_schedule",
    "split_runs",
    "summarize",
]

SPREAD = "iqr"
"""Name of the spread statistic: interquartile range, p75 - p25."""

_MAX_CHUNK_ELEMENTS = 2_000_000  # bound on resamples x samples held at once by the bootstrap


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one set of timings, in milliseconds. ``samples_ms`` keeps the raw values in run order."""

    n: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    iqr_ms: float
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        return summarize(samples_ms)

    def to_dict(self, *, samples: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "n": self.n,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
            "iqr_ms": self.iqr_ms,
        }
        if samples:
            out["samples_ms"] = list(self.samples_ms)
        return out


def summarize(samples_ms: Sequence[float]) -> LatencyStats:
    """Summarize timings given in milliseconds. Percentiles use numpy's linear interpolation."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("summarize needs a non-empty 1-D sequence of timings")
    p25, p50, p75, p90, p99 = np.percentile(arr, [25, 50, 75, 90, 99])
    return LatencyStats(
        n=int(arr.size),
        median_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        min_ms=float(arr.min()),
        max_ms=float(arr.max()),
        mean_ms=float(arr.mean()),
        iqr_ms=float(p75 - p25),
        samples_ms=tuple(float(x) for x in arr),
    )


def split_runs(runs: int, rounds: int) -> tuple[int, ...]:
    """Split ``runs`` measured runs into at most ``rounds`` blocks whose sizes differ by at most one."""
    if runs < 1 or rounds < 1:
        raise ValueError(f"runs and rounds must be >= 1 (got runs={runs}, rounds={rounds})")
    rounds = min(rounds, runs)
    base, extra = divmod(runs, rounds)
    return tuple(base + (1 if r < extra else 0) for r in range(rounds))


def interleaved_schedule(labels: Sequence[str], rounds: int) -> tuple[tuple[str, ...], ...]:
    """Order of the model blocks in each round: as given in even rounds, reversed in odd ones.

    With two models A, B: ``A B | B A | A B | ...``, so neither model always runs first after a switch
    and a machine drifting over time (thermal, frequency, background load) touches both alike.
    """
    forward = tuple(labels)
    backward = tuple(reversed(forward))
    return tuple(forward if r % 2 == 0 else backward for r in range(rounds))


def _blocks(samples: Sequence[float], block_sizes: Sequence[int]) -> list[np.ndarray]:
    arr = np.asarray(samples, dtype=np.float64)
    if sum(block_sizes) != arr.size:
        raise ValueError(f"block sizes {tuple(block_sizes)} do not add up to {arr.size} samples")
    edges = np.cumsum([0, *block_sizes])
    return [arr[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _resampled_medians(blocks: list[np.ndarray], rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Medians of ``resamples`` stratified bootstrap resamples (each block resampled within itself)."""
    n = sum(b.size for b in blocks)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n)
    medians = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        parts = [blk[rng.integers(0, blk.size, size=(k, blk.size))] for blk in blocks]
        medians[start : start + k] = np.median(np.concatenate(parts, axis=1), axis=1)
    return medians


def bootstrap_ratio_ci(
    baseline_ms: Sequence[float],
    candidate_ms: Sequence[float],
    *,
    block_sizes: Sequence[int] | None = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int | Sequence[int] = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``median(baseline) / median(candidate)``.

    Both sample sets are resampled independently. With ``block_sizes`` (the runs per round), resampling
    is stratified by round: each round's block is resampled within itself, which keeps the interleaved
    design (equal share of each round) in every resample. Deterministic for a given ``seed``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    base_blocks = _blocks(baseline_ms, block_sizes or [len(baseline_ms)])
    cand_blocks = _blocks(candidate_ms, block_sizes or [len(candidate_ms)])
    rng = np.random.default_rng(seed)
    ratios = _resampled_medians(base_blocks, rng, resamples) / _resampled_medians(cand_blocks, rng, resamples)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class Speedup:
    """``ratio`` = baseline median / candidate median: above 1 means the candidate is faster.

    ``ci_low``/``ci_high``: bootstrap confidence interval of the ratio at ``confidence``.
    ``creation_ratio``: the same ratio for the median session creation time (no interval).
    """

    baseline: str
    candidate: str
    ratio: float
    ci_low: float
    ci_high: float
    confidence: float
    creation_ratio: float

    @property
    def slowdown(self) -> float:
        """candidate median / baseline median (the gate's quantity): above 1 means the candidate is slower."""
        return 1.0 / self.ratio

    def to_dict(self) -> dict[str, object]:
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "ratio": self.ratio,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
            "creation_ratio": self.creation_ratio,
        }
