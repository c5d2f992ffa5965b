"""Terminal rendering of a :class:`LatencyReport` (and of a gate result) with rich."""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from bnfold.timing.result import GateResult, LatencyReport

__all__ = ["render_gate", "render_latency"]


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render_latency(report: LatencyReport) -> Table:
    """One section per configuration, one row per model.

    Speed-up = baseline median / model median, with its bootstrap CI; green when the whole interval is
    above 1 (faster), red when below (slower).
    """
    settings = report.settings
    threads = settings.threads if settings.threads is not None else "onnxruntime default"
    shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in settings.shapes.items())
    table = Table(
        title="Latency (ms per run)",
        box=box.SIMPLE_HEAD,
        caption=(
            f"{settings.runs} timed runs per model in {settings.rounds} interleaved rounds, after "
            f"{settings.warmup} warm-up runs. Spread: IQR. Threads: {threads} (no spin-waiting, so the "
            f"idle session does not take the timed one's cores). Inputs: {shapes}. "
            f"Create: median of {settings.creations} session creations. Speed-up: {settings.baseline} "
            f"median / model median, {settings.confidence:.0%} bootstrap CI."
        ),
        caption_justify="left",
    )
    table.add_column("Config", overflow="fold")
    table.add_column("Model", overflow="fold")
    for name in ("Create", "Median", "p90", "p99", "Min", "IQR"):
        table.add_column(name, justify="right", overflow="fold")
    table.add_column(f"Speed-up ({settings.confidence:.0%} CI)", justify="right", overflow="fold")
    for i, cfg in enumerate(report.configs):
        if i:
            table.add_section()
        title = cfg.config.label
        if cfg.config.device == "cpu" and cfg.config.io == "copies":
            title += " / session.run"
        for row, (label, meas) in enumerate(cfg.models.items()):
            speed = cfg.speedup(label)
            if speed is None:
                ratio = Text("baseline" if label == settings.baseline else "", style="dim")
            else:
                style = "green" if speed.ci_low > 1 else "red" if speed.ci_high < 1 else ""
                ratio = Text(f"x{speed.ratio:.3f} ({speed.ci_low:.2f}-{speed.ci_high:.2f})", style=style)
            run = meas.run
            table.add_row(
                Text(title, style="bold") if row == 0 else "",
                label,
                _ms(meas.creation.median_ms),
                _ms(run.median_ms),
                _ms(run.p90_ms),
                _ms(run.p99_ms),
                _ms(run.min_ms),
                _ms(run.iqr_ms),
                ratio,
            )
    return table


def render_gate(result: GateResult) -> Text:
    """The gate's one-line verdict, coloured."""
    return Text(result.message, style="bold green" if result.passed else "bold red")
