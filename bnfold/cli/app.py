"""The ``bnfold`` command: parse, call one library function, render, exit with a documented code.

``bnfold MODEL -o OUT`` is the main form (the ``fold`` verb is implied): :func:`bnfold.pipeline.fold_file`.
Other verbs: ``rules``, ``verify`` (:func:`bnfold.check.verify`), ``latency``
(:func:`bnfold.pipeline.time_files`). Errors are one line on stderr and an exit code from
:class:`bnfold.errors.ExitCode`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from bnfold._version import __version__
from bnfold.cli.options import (
    fold_shapes,
    latency_args,
    latency_options,
    quiet_option,
    report_option,
    shape_pairs,
    verify_args,
    verify_options,
)
from bnfold.errors import BnfoldError, ExitCode, OptionError, first_line
from bnfold.messages import one_line

if TYPE_CHECKING:
    from rich.console import Console

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["cli", "main"]

_GROUP_OPTIONS = {"--help", "-h", "--version", "--rules"}


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is not a verb, is the model of the implied ``fold`` verb."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in _GROUP_OPTIONS:
            args = ["fold", *args]
        return super().parse_args(ctx, args)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if not _is_terminal(stream) and "COLUMNS" not in os.environ:  # a log file: nothing wraps, no colour
        from bnfold.messages import LOG_WIDTH

        console: Console = _log_console(stderr=stderr, highlight=False, soft_wrap=True, no_color=True,
                                        width=LOG_WIDTH)
    else:
        console = Console(stderr=stderr, highlight=False, soft_wrap=False)
    console.on_broken_pipe = _quiet_broken_pipe  # type: ignore[method-assign]  # `bnfold rules | head`
    return console


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _log_console_class() -> type[Console]:
    from rich.console import Console

    from bnfold.messages import natural_width

    class LogConsole(Console):
        """Prints each table at its natural width, so no cell wraps in a log file."""

        def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
            for obj in objects:
                width = natural_width(self, obj)
                if width is not None and "width" not in kwargs:
                    super().print(obj, **kwargs, width=width, soft_wrap=False)
                else:
                    super().print(obj, **kwargs)

    return LogConsole


def _log_console(**kwargs: Any) -> Console:
    """A console for log files (the class is built on first use: rich is imported late)."""
    return _log_console_class()(**kwargs)


def _quiet_broken_pipe() -> None:
    """The reader went away (``| head``): stop quietly with success, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(0)


@click.group(cls=_DefaultGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
@click.option("--rules", "list_rules", is_flag=True, help="List the fold rules and exit.")
@click.pass_context
def cli(ctx: click.Context, list_rules: bool) -> None:
    """Fold BatchNormalization into the preceding Conv / ConvTranspose / Gemm / MatMul, exactly.

    \b
    bnfold MODEL.onnx -o OUT.onnx      fold, verify, write (the default verb)
    bnfold rules                       list the rules and their refusal reasons
    bnfold latency A.onnx B.onnx       time B against A (CPU, CUDA), optional gate
    bnfold verify A.onnx B.onnx        check that B computes what A computes; name the fold that broke
    """
    if list_rules:
        ctx.invoke(rules_cmd)
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@contextmanager
def _running(show: bool) -> Iterator[Any]:
    """A transient progress line on stderr fed by the library's callback; its option errors as usage errors."""
    from rich.progress import Progress

    console = _console(stderr=True)  # not a terminal: no bar (rich would leave an empty line)
    with Progress(console=console, transient=True, disable=not (show and console.is_terminal)) as bar:
        task = bar.add_task("bnfold", total=None)
        try:
            yield lambda stage, done, total: bar.update(task, description=stage, completed=done, total=total)
        except OptionError as exc:
            if exc.option:
                raise click.BadParameter(str(exc), param_hint=exc.option) from exc
            raise click.UsageError(str(exc)) from exc


def _print_latency(console: Console, timing: Any, gate: Any) -> None:
    from bnfold.timing import render_gate, render_latency

    console.print(render_latency(timing))
    for note in timing.notes:
        console.print(f"note: {note}")
    if gate is not None:
        console.print(render_gate(gate))


@cli.command("latency")
@click.argument("baseline", type=click.Path(path_type=Path))  # checked by the library: exit 3, one line
@click.argument("candidate", type=click.Path(path_type=Path))
@latency_options
@click.option("--batch", type=click.IntRange(min=1), help="Batch size: replaces a dynamic first dimension.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DIMS",
              help="Input shape, e.g. x=1,3,224,224, or a symbolic dim, e.g. N=8 (repeatable).")
@click.option("--include-copies", is_flag=True,
              help="On a GPU provider, also time with host<->device copies (a separate, labelled row).")
@click.option("--no-io-binding", is_flag=True, help="Time session.run with numpy in/out instead of I/O binding.")
@report_option
@quiet_option
def latency_cmd(baseline: Path, candidate: Path, batch: int | None, shapes: tuple[str, ...], include_copies: bool,
                no_io_binding: bool, report_path: Path | None, quiet: bool, providers: tuple[str, ...],
                **latency_opts: Any) -> int:
    """Time CANDIDATE against BASELINE (e.g. original.onnx folded.onnx) on each provider and level.

    Speed-up = baseline median / candidate median, with a bootstrap confidence interval. With
    --max-slowdown, exits 5 when the candidate is slower than allowed on any measured configuration.
    """
    from bnfold.pipeline import time_files

    parsed = dict(shape_pairs(shapes, allow_bare=False))
    with _running(not quiet) as progress:
        run = time_files(baseline, candidate, latency=latency_args(**latency_opts), providers=providers,
                         batch=batch, shapes=parsed or None, include_copies=include_copies,
                         io_binding=not no_io_binding, report=report_path, progress=progress)
    if not quiet:
        _print_latency(_console(stderr=_to_stdout(report_path)), run.latency, run.gate)
    return int(run.exit_code)


def _to_stdout(report_path: Path | None) -> bool:
    """``--report -``: the JSON goes to standard output, the tables to standard error."""
    return report_path is not None and str(report_path) == "-"


@cli.command("fold")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the folded model "
              "(default: MODEL with '.folded' before the suffix). May equal MODEL: the write is atomic.")
@report_option
@click.option("--dry-run", is_flag=True, help="Fold and report, write no model.")
@click.option("--initializers-as-constants", is_flag=True,
              help="Treat initializers also listed as graph inputs (IR < 4 models) as constants.")
@click.option("--only", "only", multiple=True, metavar="RULE", help="Run only these rules (repeatable).")
@click.option("--skip", "skip", multiple=True, metavar="RULE", help="Do not run these rules (repeatable).")
@click.option("--no-clone", is_flag=True,
              help="Never clone a producer whose output has other users (or is a graph output); such a "
              "normalization is left with a reason instead.")
@click.option("--max-clone-bytes", type=click.IntRange(min=0), default=1 << 20, show_default=True, metavar="N",
              help="Largest extra weight (bytes of folded tensors) a clone of a shared producer may add.")
@click.option("--no-check", is_flag=True, help="Do not run onnx.checker on the input and output.")
@click.option("--shape", "shapes", multiple=True, metavar="[NAME=]DIMS",
              help="Input shape for verification (and TorchScript export): x=1,3,224,224, a symbolic dim "
              "N=8, or 1,3,224,224 for a single input (repeatable). Dynamic dims: what the model states, else the "
              "first size of 32, 64, ..., 640, 16, 8, 1 the original runs at (batch 1); "
              "TorchScript infers them from the first layer.")
@click.option("--no-verify", is_flag=True, help="Skip the numerical check of the folded model.")
@click.option("--force", is_flag=True, help="Write the folded model even when the check fails or a fold went "
              "unchecked (exit code stays 4 or 8).")
@verify_options
@click.option("--opset", type=click.IntRange(min=7), default=17, show_default=True,
              help="TorchScript input with -o OUT.onnx: the ONNX opset to export to.")
@click.option("--eval", "eval_mode", is_flag=True,
              help="TorchScript input saved in training mode: put it in eval mode before folding.")
@quiet_option
@click.option("--latency", "measure_latency", is_flag=True,
              help="Time the original and the folded model (see `bnfold latency --help`).")
@latency_options
def fold_cmd(model: Path, output: Path | None, report_path: Path | None, dry_run: bool,
             initializers_as_constants: bool, only: tuple[str, ...], skip: tuple[str, ...], no_clone: bool,
             max_clone_bytes: int, no_check: bool, shapes: tuple[str, ...], no_verify: bool, force: bool,
             rtol: float | None, atol: float | None, inputs_npz: Path | None, input_ranges: tuple[str, ...],
             seeds: str, opset: int, eval_mode: bool, quiet: bool, measure_latency: bool,
             providers: tuple[str, ...], **latency_opts: Any) -> int:
    """Fold MODEL and write the result to -o OUT.

    MODEL may be ONNX, a TorchScript archive or a torch.export archive (.pt2), recognised by content;
    a .pt2 is folded into a .pt2 (or, with -o OUT.onnx, exported by the dynamo exporter and folded there),
    checked in torch. TorchScript with -o OUT.onnx is
    exported to ONNX (BatchNorm kept) and folded there; with any other suffix a TorchScript archive is
    written, verified in torch.
    """
    from bnfold.check import render_comparison
    from bnfold.folding.options import FoldOptions
    from bnfold.pipeline import fold_file
    from bnfold.report import render_fold

    options = FoldOptions(initializers_as_constants=initializers_as_constants, only=frozenset(only) or None,
                          skip=frozenset(skip), clone=not no_clone, max_clone_bytes=max_clone_bytes,
                          check=not no_check)
    timed = measure_latency or latency_opts["max_slowdown"] is not None or latency_opts["plot"] is not None
    with _running(not quiet) as progress:
        run = fold_file(
            model, output, dry_run=dry_run, options=options, shapes=fold_shapes(shapes),
            verify=not no_verify, force=force, providers=providers, opset=opset, eval_mode=eval_mode,
            verify_options=verify_args(inputs_npz, input_ranges, seeds, rtol=rtol, atol=atol),
            latency=latency_args(**latency_opts) if timed else None, report=report_path, progress=progress,
        )
    console = _console(stderr=_to_stdout(report_path))
    if not quiet:
        render_fold(console, run.to_report())
        if run.comparison is not None:
            console.print(render_comparison(run.comparison))
        if run.latency is not None:
            _print_latency(console, run.latency, run.gate)
    if run.verification_failed:
        outcome = "written anyway (--force)" if run.written else "nothing written (--force writes anyway)"
        click.echo(f"bnfold: {run.check_message}; {outcome}", err=True)
    elif run.per_fold is not None and not quiet:
        click.echo(f"bnfold: {run.check_message}", err=True)
    return int(run.exit_code)


@cli.command("verify")
@click.argument("original", type=click.Path(path_type=Path))  # checked below: exit 3, one line
@click.argument("folded", type=click.Path(path_type=Path))
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="Execution provider: cpu, cuda (repeatable; default: CPU, plus CUDA when onnxruntime-gpu and "
              "a GPU work). Each provider compares FOLDED with ORIGINAL on that same provider.")
@click.option("--shape", "shapes", multiple=True, metavar="[NAME=]DIMS",
              help="Input shape: x=1,3,224,224, a symbolic dim N=8, or 1,3,224,224 for a single input "
              "(repeatable). Dynamic dims default to 1 (first) and 16.")
@verify_options
@report_option
@quiet_option
def verify_cmd(original: Path, folded: Path, providers: tuple[str, ...], shapes: tuple[str, ...],
               report_path: Path | None, quiet: bool, **verify_opts: Any) -> int:
    """Check that FOLDED computes what ORIGINAL computes (for instance a model folded by another tool).

    Both run on onnxruntime with optimizations off, on the same inputs, for each provider and seed. Exits 4
    when they differ, naming the first fold (a BatchNormalization output now written by another op) whose
    output diverges.
    """
    from bnfold.check import render_comparison, verify
    from bnfold.io.paths import STDOUT, check_input_file, check_output_path, check_run_paths
    from bnfold.io.report_file import PendingReport

    for path in (original, folded):
        check_input_file(path)
    if report_path is not None and str(report_path) != STDOUT:
        check_output_path(report_path, "--report")
        check_run_paths([original, folded], report=report_path)
    parsed, opts = dict(shape_pairs(shapes)), verify_args(**verify_opts)
    comparison = verify(original, folded, providers=list(providers) or None, shapes=parsed or None,
                        rtol=opts.rtol, atol=opts.atol, inputs=opts.inputs, input_ranges=opts.input_ranges,
                        seeds=opts.seeds)
    code = 0 if comparison.passed else int(ExitCode.VERIFY_FAILED)
    if report_path is not None:
        PendingReport(report_path).write({
            "schema": "bnfold.verify-report/1", "bnfold_version": __version__, "original": str(original),
            "folded": str(folded), "verification": comparison.to_dict(), "exit_code": code})
    if not quiet:
        _console(stderr=_to_stdout(report_path)).print(render_comparison(comparison))
    if not comparison.passed:
        click.echo(f"bnfold: {comparison.summary}", err=True)
    return code


@cli.command("rules")
@click.option("--full", is_flag=True, help="Print each rule's whole header (Before / After / Conditions).")
def rules_cmd(full: bool = False) -> int:
    """List the fold rules: name, summary, and (with --full) conditions and refusal reasons."""
    from bnfold.report import render_rules

    console = _console()
    for renderable in render_rules(full):
        console.print(renderable)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps every outcome to an exit code, never a traceback."""
    from bnfold.io.signals import handle_termination

    with handle_termination():  # SIGTERM, SIGHUP: cleaned up like Ctrl-C, exit 128 + signal
        _main(argv)


def _main(argv: list[str] | None) -> None:

    def fail(text: str, code: int) -> NoReturn:  # one unwrapped line on stderr (rich would wrap long paths)
        click.echo(text, err=True)
        sys.exit(code)

    from bnfold.io.signals import Terminated

    try:
        rv = cli.main(args=argv, prog_name="bnfold", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        exc.show()
        sys.exit(ExitCode.USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort) as exc:
        signalled = exc if isinstance(exc, Terminated) else exc.__cause__ or exc.__context__
        if isinstance(signalled, Terminated):
            import signal

            name = signal.Signals(signalled.signum).name
            fail(f"bnfold: terminated ({name}); no partial output was left behind", signalled.exit_code)
        fail("bnfold: interrupted; no partial output was left behind", ExitCode.INTERRUPTED)
    except BnfoldError as exc:
        fail(f"bnfold: error: {one_line(str(exc))}", exc.exit_code)
    except MemoryError:
        fail("bnfold: error: out of memory", ExitCode.INTERNAL)
    except Exception as exc:  # a bug: still one line, with a hint for the report
        click.echo(f"bnfold: internal error: {type(exc).__name__}: {one_line(first_line(exc))} "
                   "(set BNFOLD_DEBUG=1 for a traceback; please report)", err=True)
        if os.environ.get("BNFOLD_DEBUG"):  # pragma: no cover
            raise
        sys.exit(ExitCode.INTERNAL)
    sys.exit(int(rv or 0) if isinstance(rv, int) else 0)
