"""The timing stage: latency of models on onnxruntime execution providers, optimizations off and on, and a gate.

Enters: labelled models (paths, bytes or ModelProtos) and :class:`LatencyOptions`. Leaves: a frozen
:class:`LatencyReport` (per provider x level x model: session creation and run statistics, speed-ups with
bootstrap confidence intervals); ``report.gate(1.02)`` -> :class:`GateResult`; ``render_latency(report)``
-> a rich Table; ``report.to_dict()`` -> JSON. Sessions come from :mod:`bnfold.check.runtime`.

The function is re-exported as ``bnfold.latency``; this package is named apart from it so that neither
shadows the other.
"""

from __future__ import annotations

from bnfold.check.runtime import CUDA_UNAVAILABLE_NOTE, LEVELS
from bnfold.timing.measure import ModelSource, ProgressCallback, latency
from bnfold.timing.options import LatencyOptions
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
    "LatencyOptions",
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
