"""A :class:`Comparison` as rich renderables for the terminal. Builds them; never prints."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bnfold.check.compare import OutputComparison, figure
from bnfold.check.result import Comparison

__all__ = ["render_comparison"]


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def _runtime(comparison: Comparison) -> str:
    """What ran both models: torch for a TorchScript check, else onnxruntime with its optimizations off."""
    if comparison.providers and all(p.startswith("torch") for p in comparison.providers):
        return "both archives run in torch, no grad"
    return f"onnxruntime {comparison.environment.onnxruntime}, optimizations off"


def render_comparison(comparison: Comparison) -> RenderableType:
    """One row per provider and output (the worst seed), then failures, localisation and notes."""
    seeds = ", ".join(map(str, comparison.seeds)) if comparison.seeds else "supplied inputs"
    status = Text("passed", style="green") if comparison.passed else Text("FAILED", style="bold red")
    inputs = ", ".join(f"{i.name}[{','.join(map(str, i.shape))}] {i.dtype} {i.source}"
                       + (f" (shape: {i.shape_source})" if i.shape_source else "") for i in comparison.inputs)
    table = Table(
        title=Text.assemble(f"Verification on {', '.join(map(_short, comparison.providers)) or '-'}: ", status),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        caption=(
            f"{_runtime(comparison)}; seeds: {seeds}; "
            f"inputs: {inputs}. Pass: |folded - original| <= atol + rtol x |original|; "
            "'needed': the smallest atol that passes at that rtol. Worst seed shown; all in the JSON report."
        ),
        caption_justify="left",
    )
    several = len({r.provider for r in comparison.runs}) > 1
    if several:
        table.add_column("Provider", no_wrap=True)
    table.add_column("Output", overflow="fold", min_width=6)
    for name in ("max abs", "max rel", "cosine", "needed", "atol", "rtol"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    grouped: dict[tuple[str, str], list[OutputComparison]] = {}
    for run in comparison.runs:
        for out in run.outputs:
            grouped.setdefault((run.provider, out.name), []).append(out)
    for (provider, name), outs in grouped.items():
        w = max(outs, key=lambda o: o.severity)  # the worst seed
        cells: list[str | Text] = [
            name,
            figure(w.max_abs),
            figure(w.max_rel),
            "-" if w.cosine is None else f"{w.cosine:.6f}",
            figure(w.needed_atol),
            figure(w.atol),
            figure(w.rtol),
            Text("ok", style="green") if all(o.passed for o in outs) else Text("FAIL", style="bold red"),
        ]
        table.add_row(*([_short(provider)] if several else []), *cells)
    lines: list[RenderableType] = [table]
    for problem in comparison.problems:
        lines.append(Text(f"problem: {problem}", style="red"))
    for shown, (failed_run, failed) in enumerate(comparison.failures()):
        if shown == 5:
            lines.append(Text("... more failures in the JSON report", style="dim"))
            break
        seed = "" if failed_run.seed is None else f" seed {failed_run.seed}"
        what = failed_run.error if failed is None else f"{failed.name}: {failed.reason}"
        lines.append(Text(f"{_short(failed_run.provider)}{seed}: {what}", style="red"))
    if comparison.localisation is not None:
        lines.append(Text(comparison.localisation.message, style="bold"))
    if comparison.per_fold is not None:
        lines.append(Text(f"each fold alone: {comparison.per_fold.summary}", style="bold"))
    for fig in comparison.sensitivity[:5]:
        lines.append(Text(f"{_short(fig.provider)} seed {fig.seed}: {fig.line}", style="dim"))
    if comparison.decided_by == "model sensitivity":
        lines.append(Text("decided by the model's own rounding spread: every fold is exact alone and every error "
                          "lies within the spread", style="green"))
    lines += [Text(f"note: {note}", style="dim") for note in comparison.notes]
    return Group(*lines)
