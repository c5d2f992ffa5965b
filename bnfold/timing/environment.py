"""The environment of a latency measurement, as the JSON dict ``benchmarks/latency.py`` prints (the type
is :class:`bnfold.environment.Environment`)."""

from __future__ import annotations

from collections.abc import Sequence

from bnfold.environment import Environment

__all__ = ["collect_environment"]


def collect_environment(measured_providers: Sequence[str]) -> dict[str, object]:
    """:meth:`Environment.capture` for a measurement on ``measured_providers``, as a dict."""
    return Environment.capture(measured_providers=measured_providers).to_dict()
