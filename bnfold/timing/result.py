"""Typed results of a latency measurement, the gate, and their JSON form (schema ``bnfold.latency/1``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bnfold.errors import ExitCode, GateFailedError
from bnfold.timing.providers import MeasureConfig
from bnfold.timing.stats import SPREAD, LatencyStats, Speedup

__all__ = [
    "SCHEMA",
    "ConfigResult",
    "GateCheck",
    "GateResult",
    "LatencyReport",
    "LatencySettings",
    "ModelMeasurement",
]

SCHEMA = "bnfold.latency/1"


@dataclass(frozen=True)
class ModelMeasurement:
    """One model in one configuration: session creation times and per-run latency."""

    label: str
    creation: LatencyStats
    run: LatencyStats
    session_providers: tuple[str, ...] = ()  # what the session reported (CUDA first, CPU fallback after)

    def to_dict(self, *, samples: bool = False) -> dict[str, object]:
        return {
            "label": self.label,
            "creation": self.creation.to_dict(samples=samples),
            "run": self.run.to_dict(samples=samples),
            "session_providers": list(self.session_providers),
        }


@dataclass(frozen=True)
class ConfigResult:
    """Every model measured under one configuration, with the speed-ups against the baseline.

    ``block_sizes``: measured runs per round (the same for every model). ``block_order``: the order in
    which the model blocks ran, one tuple per round (alternating, see ``interleaved_schedule``).
    """

    config: MeasureConfig
    models: Mapping[str, ModelMeasurement]
    speedups: tuple[Speedup, ...] = ()
    block_sizes: tuple[int, ...] = ()
    block_order: tuple[tuple[str, ...], ...] = ()

    def speedup(self, candidate: str) -> Speedup | None:
        return next((s for s in self.speedups if s.candidate == candidate), None)

    def to_dict(self, *, samples: bool = False) -> dict[str, object]:
        return {
            **self.config.to_dict(),
            "models": {k: m.to_dict(samples=samples) for k, m in self.models.items()},
            "speedups": [s.to_dict() for s in self.speedups],
            "block_sizes": list(self.block_sizes),
            "block_order": [list(r) for r in self.block_order],
        }


@dataclass(frozen=True)
class GateCheck:
    """``slowdown`` = candidate median / baseline median in one configuration."""

    config: str
    provider: str
    level: str
    io: str
    baseline: str
    candidate: str
    baseline_median_ms: float
    candidate_median_ms: float
    slowdown: float
    passed: bool

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GateResult:
    """Outcome of :meth:`LatencyReport.gate`: failed when any configuration is slower than allowed."""

    max_slowdown: float
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def offending(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.passed else ExitCode.GATE_FAILED

    @property
    def message(self) -> str:
        """One line for the user."""
        if self.passed:
            worst = max(self.checks, key=lambda c: c.slowdown)
            return (
                f"latency gate passed: worst slowdown x{worst.slowdown:.3f} ({worst.config}) <= x{self.max_slowdown:g}"
            )
        parts = ", ".join(f"{c.config} x{c.slowdown:.3f}" for c in self.offending)
        candidate = self.offending[0].candidate
        return f"latency gate failed: {candidate} slower than x{self.max_slowdown:g} on {parts}"

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GateFailedError(self.message)

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "max_slowdown": self.max_slowdown,
            "checks": [c.to_dict() for c in self.checks],
            "offending": [c.config for c in self.offending],
        }


@dataclass(frozen=True)
class LatencySettings:
    """Everything that was asked for, as it was resolved (shapes after batch substitution)."""

    providers: tuple[str, ...]
    levels: tuple[str, ...]
    runs: int
    warmup: int
    rounds: int
    creations: int
    threads: int | None  # intra_op_num_threads; None = onnxruntime's default (one per physical core)
    batch: int | None
    shapes: Mapping[str, tuple[int, ...]]
    io_binding: bool
    include_copies: bool
    seed: int
    confidence: float
    resamples: int
    baseline: str
    spread: str = SPREAD
    block_warmup: int = 1  # untimed runs at the start of every block, after switching model

    def to_dict(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["providers"] = list(self.providers)
        out["levels"] = list(self.levels)
        out["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        return out


@dataclass(frozen=True)
class LatencyReport:
    configs: tuple[ConfigResult, ...]
    settings: LatencySettings
    environment: Mapping[str, object] = field(default_factory=dict)
    """A :class:`bnfold.environment.Environment` (a mapping of its JSON form) from :func:`bnfold.latency`."""
    notes: tuple[str, ...] = ()

    @property
    def baseline(self) -> str:
        return self.settings.baseline

    def gate(self, max_slowdown: float) -> GateResult:
        """Fail if, in any configuration, candidate median / baseline median > ``max_slowdown``."""
        if not max_slowdown > 0:
            raise ValueError(f"max_slowdown must be > 0, got {max_slowdown}")
        checks: list[GateCheck] = []
        for cfg in self.configs:
            base = cfg.models.get(self.baseline)
            if base is None:
                continue
            for label, meas in cfg.models.items():
                if label == self.baseline:
                    continue
                slowdown = meas.run.median_ms / base.run.median_ms
                checks.append(
                    GateCheck(
                        config=cfg.config.label,
                        provider=cfg.config.provider,
                        level=cfg.config.level,
                        io=cfg.config.io,
                        baseline=self.baseline,
                        candidate=label,
                        baseline_median_ms=base.run.median_ms,
                        candidate_median_ms=meas.run.median_ms,
                        slowdown=slowdown,
                        passed=slowdown <= max_slowdown,
                    )
                )
        if not checks:
            raise ValueError("the latency gate needs a baseline and at least one other model measured")
        return GateResult(max_slowdown=max_slowdown, checks=tuple(checks))

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draw the per-run latency distributions to ``path`` (PNG or SVG); needs ``bnfold[plot]``."""
        from bnfold.timing.plot import plot_report

        return plot_report(self, path)

    def to_dict(self, *, samples: bool = False) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "environment": dict(self.environment),
            "settings": self.settings.to_dict(),
            "notes": list(self.notes),
            "configs": [c.to_dict(samples=samples) for c in self.configs],
        }
