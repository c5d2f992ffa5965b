"""Command-line options shared by several verbs (each defined once), and their parsing into the
arguments of the library call. Bad values are click usage errors (exit 2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from bnfold.pipeline import LatencyOptions, ShapesArg, VerifyOptions

__all__ = [
    "LEVEL_NAMES",
    "FiniteTolerance",
    "fold_shapes",
    "latency_args",
    "latency_options",
    "parsed",
    "quiet_option",
    "report_option",
    "shape_pairs",
    "verify_args",
    "verify_options",
]

LEVEL_NAMES = ("disable_all", "basic", "extended", "layout", "enable_all")


def _options(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


class FiniteTolerance(click.FloatRange):
    """A tolerance: a finite number >= 0 (click's FloatRange lets inf and nan through)."""

    name = "tolerance"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


report_option = click.option("--report", "report_path", type=click.Path(path_type=Path),
                             help="Write the JSON report here.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
latency_options = _options(  # `fold --latency` and the `latency` verb
    click.option("--max-slowdown", type=click.FloatRange(min=0, min_open=True), metavar="X",
                 help="Latency gate: exit 5 when the folded (second) model's median is more than X times "
                 "the original's on any measured configuration, e.g. 1.02. With fold, implies --latency."),
    click.option("--threads", type=click.IntRange(min=1),
                 help="intra-op threads for timing (default: onnxruntime's, one per physical core)."),
    click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True,
                 help="Timed runs per model and configuration, interleaved in rounds."),
    click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
                 help="Untimed warm-up runs per model and configuration."),
    click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
                 help="Rounds the runs are split into (model order alternates per round)."),
    click.option("--provider", "providers", multiple=True, metavar="NAME",
                 help="Execution provider: cpu, cuda, tensorrt, ... (repeatable; default: CPU, plus CUDA "
                 "when onnxruntime-gpu and a GPU work)."),
    click.option("--level", "levels", multiple=True, type=click.Choice(LEVEL_NAMES),
                 help="onnxruntime optimization level (repeatable; default: disable_all and enable_all)."),
    click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                 help="Draw the per-run latency distributions to FILE (.png or .svg; needs bnfold[plot]). "
                 "With fold, implies --latency."),
)
verify_options = _options(  # `fold` and the `verify` verb (--shape is declared by each)
    click.option("--rtol", type=FiniteTolerance(min=0),
                 help="Relative tolerance for float outputs (default by dtype: float32 1e-4, float16 1e-2, "
                 "bfloat16 8e-2, float64 1e-9). Integer and bool outputs are compared exactly."),
    click.option("--atol", type=FiniteTolerance(min=0),
                 help="Absolute tolerance for float outputs, taken literally (default by dtype: float32 1e-5, "
                 "float16 1e-2, bfloat16 8e-2, float64 1e-10, each times max(1, max|original output|))."),
    click.option("--inputs", "inputs_npz", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 metavar="FILE.npz", help="Real inputs, one array per input name (numpy.savez); replaces "
                 "generated data for those inputs."),
    click.option("--input-range", "input_ranges", multiple=True, metavar="NAME=LO,HI",
                 help="Generate this input uniformly in [LO, HI), e.g. ids=0,30522 for token ids "
                 "(integer inputs default to [0, 8), floats to N(0, 1)). Repeatable."),
    click.option("--seeds", default="0,1,2", show_default=True, metavar="N,N,...",
                 help="Seeds of the generated inputs: one comparison per seed and provider."),
)


# -- parsing into library arguments (bad values: usage errors, exit 2) ----------------------------------
def parsed(hint: str, parse: Callable[[str], Any], texts: tuple[str, ...]) -> list[Any]:
    try:
        return [parse(text) for text in texts]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from exc


def verify_args(inputs_npz: Path | None, input_ranges: tuple[str, ...], seeds: str, **tolerances: Any) -> VerifyOptions:
    """The verification options (--rtol, --atol, --inputs, --input-range, --seeds)."""
    from bnfold.check import parse_range_option
    from bnfold.pipeline import VerifyOptions

    ranges = dict(parsed("--input-range", parse_range_option, input_ranges))
    try:
        seed_list = tuple(int(part) for part in seeds.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {seeds!r}",
                                 param_hint="--seeds") from None
    if not seed_list:
        raise click.BadParameter("give at least one seed", param_hint="--seeds")
    return VerifyOptions(**tolerances, inputs=inputs_npz, input_ranges=ranges or None, seeds=seed_list)


def shape_pairs(shapes: tuple[str, ...], allow_bare: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """``--shape`` values as ``(name, dims)``; the name is ``""`` for ``1,3,224,224`` (with ``allow_bare``)."""
    from bnfold.check import parse_shape_option

    return parsed("--shape", lambda text: parse_shape_option(text, allow_bare=allow_bare), shapes)


def fold_shapes(shapes: tuple[str, ...]) -> ShapesArg:
    """``--shape`` of the fold verb: all without a name, in order (TorchScript inputs); else by name."""
    pairs = shape_pairs(shapes)
    return [dims for _, dims in pairs] if not any(name for name, _ in pairs) else dict(pairs)


def latency_args(max_slowdown: float | None, levels: tuple[str, ...], **opts: Any) -> LatencyOptions:
    """The timing options (--runs, --warmup, --rounds, --threads, --level) and the gate (--max-slowdown)."""
    from bnfold.pipeline import LatencyOptions

    return LatencyOptions(**opts, levels=levels or ("disable_all", "enable_all"), max_slowdown=max_slowdown)
