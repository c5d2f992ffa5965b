"""A picture of a :class:`LatencyReport`: per-run latency distributions, one panel per configuration.

Each panel (provider x optimization level x I/O mode) shows, per model, the distribution of its timed
runs (a violin and the runs themselves), the median as a bar with its value, and, for each model other
than the baseline, the speed-up (baseline median / model median) with its bootstrap confidence interval.

matplotlib is optional (``pip install 'bnfold[plot]'``) and imported only when a picture is drawn. The
figure is drawn without pyplot (the Agg canvas for PNG), so no global backend or state is switched. The
format follows the file's suffix: ``.png`` or ``.svg``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import MissingDependencyError, OptionError, OutputError

if TYPE_CHECKING:
    from bnfold.timing.result import ConfigResult, LatencyReport

__all__ = ["PLOT_FORMATS", "check_plot_path", "plot_report"]

PLOT_FORMATS = (".png", ".svg")
_INSTALL = "pip install 'bnfold[plot]'"
_MAX_POINTS = 400  # runs drawn as points per model and panel (all of them are in the violin and median)


def _figure_class() -> Any:
    """matplotlib's ``Figure``, or a one-line MissingDependencyError.

    The figure is drawn without pyplot, so no global backend or state is touched: ``Figure.savefig``
    renders PNG with the Agg canvas and SVG with the SVG one.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(f"drawing the latency plot needs matplotlib: {_INSTALL}") from None
    return Figure


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """Refuse, before any timing, a plot that could not be written: wrong suffix, missing directory, or
    matplotlib missing. Returns the path."""
    out = Path(os.fspath(path))
    if out.suffix.lower() not in PLOT_FORMATS:
        raise OptionError(f"{out}: the plot is drawn as PNG or SVG; name a file ending in .png or .svg", "--plot")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: directory {out.parent} does not exist")
    _figure_class()
    return out


def _panel(ax: Any, cfg: ConfigResult, baseline: str, confidence: float) -> None:
    labels = list(cfg.models)
    samples = [np.asarray(cfg.models[label].run.samples_ms, dtype=np.float64) for label in labels]
    if not all(s.size for s in samples):  # a report rebuilt without its samples: medians only
        samples = [np.asarray([cfg.models[label].run.median_ms]) for label in labels]
    positions = np.arange(1, len(labels) + 1)
    colors = ["#4C72B0" if label == baseline else "#DD8452" for label in labels]
    if all(s.size > 1 for s in samples):
        parts = ax.violinplot(samples, positions=positions, widths=0.8, showextrema=False)
        for body, color in zip(parts["bodies"], colors, strict=True):
            body.set_facecolor(color)
            body.set_alpha(0.35)
    rng = np.random.default_rng(0)  # jitter only: the picture is the same for the same report
    for pos, values, color in zip(positions, samples, colors, strict=True):
        shown = values if values.size <= _MAX_POINTS else values[:: math.ceil(values.size / _MAX_POINTS)]
        ax.scatter(pos + rng.uniform(-0.12, 0.12, shown.size), shown, s=6, color=color, alpha=0.6, linewidths=0)
    for pos, label in zip(positions, labels, strict=True):
        median = cfg.models[label].run.median_ms
        ax.hlines(median, pos - 0.32, pos + 0.32, colors="black", linewidth=2)
        ax.annotate(f"{median:.3g} ms", (pos + 0.34, median), va="center", fontsize=8)
    notes = []
    base = cfg.models.get(baseline)
    for speed in cfg.speedups:
        if base is not None and speed.candidate in cfg.models and speed.ci_low > 0:
            # the interval on the candidate's own scale: baseline median / speed-up bounds
            pos = positions[labels.index(speed.candidate)] - 0.4
            low, high = base.run.median_ms / speed.ci_high, base.run.median_ms / speed.ci_low
            ax.vlines(pos, low, high, colors="black", linewidth=1.2)
            ax.hlines([low, high], pos - 0.04, pos + 0.04, colors="black", linewidth=1.2)
        notes.append(f"{speed.candidate}: x{speed.ratio:.3f} [{speed.ci_low:.3f}, {speed.ci_high:.3f}]")
    title = cfg.config.label
    if notes:
        title += f"\nspeed-up, {confidence:.0%} CI: " + "; ".join(notes)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_xlim(0.3, len(labels) + 0.9)
    ax.set_ylabel("ms per run", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_report(report: LatencyReport, path: str | os.PathLike[str]) -> Path:
    """Draw ``report`` to ``path`` (PNG or SVG by suffix) and return the path.

    Raises MissingDependencyError without matplotlib, OptionError for another suffix, OutputError when
    the file cannot be written.
    """
    out = check_plot_path(path)
    configs = report.configs
    if not configs:
        raise ValueError("the latency report has no measured configuration to draw")
    levels = len(dict.fromkeys(c.config.level for c in configs))
    ncols = max(1, min(len(configs), levels))
    nrows = math.ceil(len(configs) / ncols)
    width = 2.2 + 1.6 * max(len(c.models) for c in configs)
    fig = _figure_class()(figsize=(width * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, cfg in zip(axes.flat, configs, strict=False):
        _panel(ax, cfg, report.baseline, report.settings.confidence)
    for ax in list(axes.flat)[len(configs):]:
        ax.set_visible(False)
    s = report.settings
    threads = s.threads if s.threads is not None else "default"
    fig.suptitle(f"Latency per run: {s.runs} runs per model in {s.rounds} interleaved rounds, "
                 f"threads {threads}; bar = median, bracket = speed-up CI on the model's scale", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(out, format=out.suffix.lower().lstrip("."), dpi=110)
    except OSError as exc:
        raise OutputError(f"{out}: {exc.strerror or exc}") from exc
    return out
