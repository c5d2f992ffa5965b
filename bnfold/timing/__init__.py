"""Latency of models on onnxruntime execution providers, with optimizations off and on, and a CI gate.

``latency({"original": a, "folded": b})`` -> :class:`LatencyReport`; ``report.gate(1.02)`` ->
:class:`GateResult`; ``render_latency(report)`` -> a rich Table; ``report.to_dict()`` -> JSON.

The package is ``bnfold.timing``; the function is re-exported as ``bnfold.latency``.
"""

from __future__ import annotations

from bnfold.runtime import CUDA_UNAVAILABLE_NOTE, LEVELS
from bnfold.timing.measure import ModelSource, ProgressCallback, latency
from bnfold.timing.providers import MeasureConfig
from bnfold.timing.render import render_gate, render_latency
from bnfold.timing.result import (
    ConfigResult,
    GateCheck,
    GateResult,
    LatencyReport,
    LatencySettings,
    ModelMeasurement,
)
from bnfold.timing.stats import LatencyStats, Speedup

__all__ = [
    "CUDA_UNAVAILABLE_NOTE",
    "LEVELS",
    "ConfigResult",
    "GateCheck",
    "GateResult",
    "LatencyReport",
    "LatencySettings",
    "LatencyStats",
    "MeasureConfig",
    "ModelMeasurement",
    "ModelSource",
    "ProgressCallback",
    "Speedup",
    "latency",
    "render_gate",
    "render_latency",
]
