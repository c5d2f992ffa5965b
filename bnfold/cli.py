"""The ``bnfold`` command: parse, call one library function, render, exit with a documented code.

``bnfold MODEL -o OUT`` is the main form (the ``fold`` verb is implied). Other verbs: ``rules``, ``verify``,
``latency``.
Errors are one line on stderr and an exit code from :class:`bnfold.errors.ExitCode`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from bnfold import __version__
from bnfold.errors import BnfoldError, ExitCode, first_line

__all__ = ["cli", "main"]

_TORCH_SUFFIXES = {".pt", ".pth", ".ts", ".torchscript", ".jit"}
_GROUP_OPTIONS = {"--help", "-h", "--version", "--rules"}


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is not a verb, is the model of the implied ``fold`` verb."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in _GROUP_OPTIONS:
            args = ["fold", *args]
        return super().parse_args(ctx, args)


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False, soft_wrap=False)
    console.on_broken_pipe = _quiet_broken_pipe  # type: ignore[method-assign]  # `bnfold rules | head`
    return console


def _quiet_broken_pipe() -> None:
    """The reader went away (``| head``): stop quietly with success, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(0)


def _check_writable(path: Path | None) -> None:
    """Fail early, before any output exists, when ``path`` cannot be written."""
    from bnfold.errors import OutputError

    if path is None:
        return
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: directory {path.parent} does not exist")


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


_LEVEL_NAMES = ("disable_all", "basic", "extended", "layout", "enable_all")


def _latency_options(f: Any) -> Any:
    """Timing options shared by `fold --latency` and the `latency` verb (defined once)."""
    options = [
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
        click.option("--level", "levels", multiple=True, type=click.Choice(_LEVEL_NAMES),
                     help="onnxruntime optimization level (repeatable; default: disable_all and enable_all)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _measure_latency(
    models: dict[str, Any],
    opts: dict[str, Any],
    quiet: bool,
    **extra: Any,
) -> tuple[dict[str, Any], int, list[Any]]:
    """Run bnfold.latency() with a progress bar; returns (JSON, gate exit code, what to print)."""
    from rich.progress import Progress

    from bnfold.timing import latency, render_gate, render_latency

    with Progress(console=_console(stderr=True), transient=True, disable=quiet) as progress:
        task = progress.add_task("latency", total=None)

        def tick(label: str, done: int, total: int) -> None:
            progress.update(task, description=f"latency: {label}", completed=done, total=total)

        try:
            report = latency(
                models,
                providers=list(opts["providers"]) or None,
                levels=opts["levels"] or ("disable_all", "enable_all"),
                runs=opts["runs"],
                warmup=opts["warmup"],
                rounds=opts["rounds"],
                threads=opts["threads"],
                progress=tick,
                **extra,
            )
        except ValueError as exc:  # an option value the library refuses (e.g. a level this onnxruntime lacks)
            raise click.UsageError(str(exc)) from exc
    gate = report.gate(opts["max_slowdown"]) if opts["max_slowdown"] is not None else None
    data = report.to_dict()
    data["gate"] = gate.to_dict() if gate is not None else None
    shown: list[Any] = []
    if not quiet:
        shown.append(render_latency(report))
        shown += [f"note: {note}" for note in report.notes]
        if gate is not None:
            shown.append(render_gate(gate))
    return data, int(gate.exit_code) if gate is not None else 0, shown


@cli.command("latency")
@click.argument("baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_latency_options
@click.option("--batch", type=click.IntRange(min=1), help="Batch size: replaces a dynamic first dimension.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DIMS",
              help="Input shape, e.g. x=1,3,224,224, or a symbolic dim, e.g. N=8 (repeatable).")
@click.option("--include-copies", is_flag=True,
              help="On a GPU provider, also time with host<->device copies (a separate, labelled row).")
@click.option("--no-io-binding", is_flag=True, help="Time session.run with numpy in/out instead of I/O binding.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def latency_cmd(
    baseline: Path,
    candidate: Path,
    batch: int | None,
    shapes: tuple[str, ...],
    include_copies: bool,
    no_io_binding: bool,
    report_path: Path | None,
    quiet: bool,
    **latency_opts: Any,
) -> int:
    """Time CANDIDATE against BASELINE (e.g. original.onnx folded.onnx) on each provider and level.

    Speed-up = baseline median / candidate median, with a bootstrap confidence interval. With
    --max-slowdown, exits 5 when the candidate is slower than allowed on any measured configuration.
    """
    from bnfold.report import write_json
    from bnfold.verify.feeds import parse_shape_option

    try:
        parsed = dict(parse_shape_option(text) for text in shapes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shape") from exc
    a, b = (baseline.name, candidate.name) if baseline.name != candidate.name else (str(baseline), str(candidate))
    if a == b:
        a, b = f"{a} (A)", f"{b} (B)"
    data, code, shown = _measure_latency(
        {a: baseline, b: candidate},
        latency_opts,
        quiet,
        batch=batch,
        shapes=parsed or None,
        include_copies=include_copies,
        io_binding=not no_io_binding,
    )
    if report_path is not None:
        from bnfold import __version__

        write_json({"schema": "bnfold.latency-report/1", "bnfold_version": __version__, "latency": data,
                    "exit_code": code}, report_path)
    for renderable in shown:
        _console().print(renderable)
    return code


class _FiniteTolerance(click.FloatRange):
    """A tolerance: a finite number >= 0 (click's FloatRange lets inf and nan through)."""

    name = "tolerance"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


_FINITE_TOL = _FiniteTolerance(min=0)


def _verify_options(f: Any) -> Any:
    """Verification options shared by `fold` and the `verify` verb (defined once; --shape is declared by each)."""
    options = [
        click.option("--rtol", type=_FINITE_TOL,
                     help="Relative tolerance for float outputs (default by dtype: float32 1e-4, float16 1e-2, "
                     "bfloat16 8e-2, float64 1e-9). Integer and bool outputs are compared exactly."),
        click.option("--atol", type=_FINITE_TOL,
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
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _verify_kwargs(
    shapes: tuple[str, ...],
    rtol: float | None,
    atol: float | None,
    inputs_npz: Path | None,
    input_ranges: tuple[str, ...],
    seeds: str,
) -> dict[str, Any]:
    """The verification options as keyword arguments of bnfold.verify.verify (usage errors: exit 2)."""
    from bnfold.verify import parse_range_option, parse_shape_option

    try:
        parsed_shapes = dict(parse_shape_option(text, allow_bare=True) for text in shapes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shape") from exc
    try:
        ranges = dict(parse_range_option(text) for text in input_ranges)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--input-range") from exc
    try:
        seed_list = tuple(int(part) for part in seeds.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {seeds!r}",
                                 param_hint="--seeds") from None
    if not seed_list:
        raise click.BadParameter("give at least one seed", param_hint="--seeds")
    return {
        "shapes": parsed_shapes or None,
        "rtol": rtol,
        "atol": atol,
        "inputs": inputs_npz,
        "input_ranges": ranges or None,
        "seeds": seed_list,
    }


@cli.command("fold")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the folded model "
              "(default: MODEL with '.folded' before the suffix). May equal MODEL: the write is atomic.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
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
              "N=8, or 1,3,224,224 for a single input (repeatable). Dynamic dims default to 1 (first) and 16; "
              "TorchScript infers them from the first layer.")
@click.option("--no-verify", is_flag=True, help="Skip the numerical check of the folded model.")
@click.option("--force", is_flag=True, help="Write the folded model even when the check fails (exit code stays 4).")
@_verify_options
@click.option("--opset", type=click.IntRange(min=7), default=17, show_default=True,
              help="TorchScript input with -o OUT.onnx: the ONNX opset to export to.")
@click.option("--eval", "eval_mode", is_flag=True,
              help="TorchScript input saved in training mode: put it in eval mode before folding.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--latency", "measure_latency", is_flag=True,
              help="Time the original and the folded model (see `bnfold latency --help`).")
@_latency_options
def fold_cmd(
    model: Path,
    output: Path | None,
    report_path: Path | None,
    dry_run: bool,
    initializers_as_constants: bool,
    only: tuple[str, ...],
    skip: tuple[str, ...],
    no_clone: bool,
    max_clone_bytes: int,
    no_check: bool,
    shapes: tuple[str, ...],
    opset: int,
    eval_mode: bool,
    quiet: bool,
    measure_latency: bool,
    no_verify: bool,
    force: bool,
    rtol: float | None,
    atol: float | None,
    inputs_npz: Path | None,
    input_ranges: tuple[str, ...],
    seeds: str,
    **latency_opts: Any,
) -> int:
    """Fold MODEL and write the result to -o OUT.

    MODEL may be ONNX or a TorchScript archive (recognised by content). TorchScript with -o OUT.onnx is
    exported to ONNX (BatchNorm kept) and folded there; with any other suffix a TorchScript archive is
    written, verified in torch.
    """
    from bnfold.torchscript import is_torchscript

    _check_writable(report_path)  # before anything is written: a bad --report must not leave a model behind
    if is_torchscript(model):
        return _fold_torchscript(
            model, output, report_path, dry_run, shapes, opset, eval_mode, quiet,
            verify=not no_verify, force=force, rtol=rtol, atol=atol, seeds=seeds,
        )
    if output is not None and output.suffix.lower() in _TORCH_SUFFIXES:
        raise click.BadParameter(
            f"{model} is an ONNX model; a TorchScript output ({output.suffix}) needs a TorchScript input. "
            "Use an .onnx output.", param_hint="-o/--output")
    from bnfold.api import fold
    from bnfold.onnx_io import save_model
    from bnfold.report import fold_report
    from bnfold.rules import RULES

    known = {m.NAME for m in RULES}
    for name in (*only, *skip):
        if name not in known:
            raise click.BadParameter(f"unknown rule {name!r}; known: {', '.join(sorted(known))}",
                                     param_hint="--only/--skip")
    out_path = output if output is not None else model.with_name(f"{model.stem}.folded{model.suffix or '.onnx'}")
    result = fold(  # from the path: tensors read on demand, the output streamed to temporary names
        model,
        initializers_as_constants=initializers_as_constants,
        only=only or None,
        skip=skip,
        clone=not no_clone,
        max_clone_bytes=max_clone_bytes,
        check=not no_check,
        output=None if dry_run else out_path,
        commit=False,
    )
    staged = result.staged  # committed below once verified; removed at exit otherwise
    if staged is not None:
        click.get_current_context().call_on_close(staged.discard)
    folded_model = staged.path if staged is not None else result.model
    comparison = None
    if not no_verify and result.folded:  # verified before anything is written
        from bnfold.verify import verify

        comparison = verify(
            model,  # paths: onnxruntime loads both models (and their external data) itself
            folded_model,
            fold_outputs=result.folded,
            providers=list(latency_opts["providers"]) or None,
            **_verify_kwargs(shapes, rtol, atol, inputs_npz, input_ranges, seeds),
        )
    failed = comparison is not None and not comparison.passed
    written = False
    if not dry_run and (not failed or force):
        if staged is not None:
            staged.commit()
        else:
            save_model(result.model, out_path)
        written = True
    report = fold_report(
        result,
        input_path=str(model),
        output_path=None if dry_run else str(out_path),
        written=written,
        input_bytes=_file_bytes(model),
        output_bytes=staged.nbytes if staged else _file_bytes(out_path) if written else result.model.ByteSize(),
    )
    report["dry_run"] = dry_run
    shown: list[Any] = []
    if comparison is not None:
        from bnfold.verify import render_comparison

        report["verification"] = comparison.to_dict()
        if failed:
            report["exit_code"] = int(ExitCode.VERIFY_FAILED)
        if not quiet:
            shown.append(render_comparison(comparison))
    if measure_latency or latency_opts["max_slowdown"] is not None:
        report["latency"], gate_code, latency_shown = _measure_latency(
            {"original": model, "folded": staged.path if staged is not None else result.model}, latency_opts, quiet
        )
        shown += latency_shown
        if gate_code and not report.get("exit_code"):
            report["exit_code"] = gate_code
    code = _finish(report, report_path, quiet)
    for renderable in shown:
        _console().print(renderable)
    if failed and comparison is not None:
        outcome = "written anyway (--force)" if written else "nothing written (--force writes anyway)"
        click.echo(f"bnfold: {comparison.summary}; {outcome}", err=True)
    return code


def _fold_torchscript(
    model: Path,
    output: Path | None,
    report_path: Path | None,
    dry_run: bool,
    shapes: tuple[str, ...],
    opset: int,
    eval_mode: bool,
    quiet: bool,
    *,
    verify: bool,
    force: bool,
    rtol: float | None,
    atol: float | None,
    seeds: str,
) -> int:
    """TorchScript in: -o *.onnx exports and runs the ONNX fold and check; else a TorchScript archive
    checked in torch. A failed check writes nothing unless --force, and exits 4."""
    from bnfold.errors import VerificationFailedError
    from bnfold.report import fold_report
    from bnfold.torchscript import fold_torchscript, fold_torchscript_to_onnx, parse_shapes
    from bnfold.verify import Tolerances, render_comparison

    try:
        parsed = parse_shapes(shapes) if shapes else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shape") from exc
    try:
        seed_list = tuple(int(part) for part in seeds.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {seeds!r}",
                                 param_hint="--seeds") from None
    out_path = output if output is not None else model.with_name(f"{model.stem}.folded{model.suffix or '.pt'}")
    dst = None if dry_run else out_path
    to_onnx = out_path.suffix.lower() == ".onnx"
    try:
        if to_onnx:
            outcome: Any = fold_torchscript_to_onnx(
                model, dst, shapes=parsed, opset=opset, eval_mode=eval_mode, verify=verify, force=force,
                rtol=rtol, atol=atol, seeds=seed_list or None,
            )
        else:
            outcome = fold_torchscript(
                model, dst, shapes=parsed, eval_mode=eval_mode, verify=verify, force=force,
                tolerances=Tolerances(rtol, atol), seeds=seed_list or None,
            )
    except VerificationFailedError as exc:  # nothing written; report it like the ONNX path does
        outcome = exc.result  # type: ignore[attr-defined]
    comparison = outcome.comparison
    written = outcome.path is not None
    report = fold_report(
        outcome.fold if to_onnx else outcome,
        input_path=str(model),
        output_path=None if dry_run else str(out_path),
        written=written,
        input_bytes=_file_bytes(model),
        output_bytes=_file_bytes(out_path) if written else (
            outcome.model.ByteSize() if to_onnx else len(outcome.archive)),
        input_format="torchscript",
    )
    report["dry_run"] = dry_run
    failed = comparison is not None and not comparison.passed
    shown: list[Any] = []
    if comparison is not None:
        report["verification"] = comparison.to_dict()
        if failed:
            report["exit_code"] = int(ExitCode.VERIFY_FAILED)
        if not quiet:
            shown.append(render_comparison(comparison))
    code = _finish(report, report_path, quiet)
    for renderable in shown:
        _console().print(renderable)
    if failed:
        outcome_text = "written anyway (--force)" if written else "nothing written (--force writes anyway)"
        click.echo(f"bnfold: {comparison.summary}; {outcome_text}", err=True)
    return code


def _finish(report: dict[str, Any], report_path: Path | None, quiet: bool) -> int:
    from bnfold.report import render_fold, write_json

    code = int(report.get("exit_code", 0))
    if report_path is not None:
        write_json(report, report_path)
    if not quiet:
        render_fold(_console(), report)
    return code


@cli.command("verify")
@click.argument("original", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("folded", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="Execution provider: cpu, cuda (repeatable; default: CPU, plus CUDA when onnxruntime-gpu and "
              "a GPU work). Each provider compares FOLDED with ORIGINAL on that same provider.")
@click.option("--shape", "shapes", multiple=True, metavar="[NAME=]DIMS",
              help="Input shape: x=1,3,224,224, a symbolic dim N=8, or 1,3,224,224 for a single input "
              "(repeatable). Dynamic dims default to 1 (first) and 16.")
@_verify_options
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def verify_cmd(
    original: Path,
    folded: Path,
    providers: tuple[str, ...],
    shapes: tuple[str, ...],
    report_path: Path | None,
    quiet: bool,
    **verify_opts: Any,
) -> int:
    """Check that FOLDED computes what ORIGINAL computes (for instance a model folded by another tool).

    Both run on onnxruntime with optimizations off, on the same inputs, for each provider and seed. Exits 4
    when they differ, naming the first fold (a BatchNormalization output now written by another op) whose
    output diverges.
    """
    from bnfold.report import write_json
    from bnfold.verify import render_comparison, verify

    comparison = verify(original, folded, providers=list(providers) or None, **_verify_kwargs(shapes, **verify_opts))
    code = 0 if comparison.passed else int(ExitCode.VERIFY_FAILED)
    if report_path is not None:
        write_json({"schema": "bnfold.verify-report/1", "bnfold_version": __version__, "original": str(original),
                    "folded": str(folded), "verification": comparison.to_dict(), "exit_code": code}, report_path)
    if not quiet:
        _console().print(render_comparison(comparison))
    if not comparison.passed:
        click.echo(f"bnfold: {comparison.summary}", err=True)
    return code


def _file_bytes(path: Path) -> int | None:
    try:
        total = path.stat().st_size
        data = path.with_name(f"{path.name}.data")
        if data.exists():
            total += data.stat().st_size
        return total
    except OSError:
        return None


@cli.command("rules")
@click.option("--full", is_flag=True, help="Print each rule's whole header (Before / After / Conditions).")
def rules_cmd(full: bool = False) -> int:
    """List the fold rules: name, summary, and (with --full) conditions and refusal reasons."""
    from rich.table import Table

    from bnfold.rules import rule_infos

    console = _console()
    if full:
        for info in rule_infos():
            console.rule(info.name)
            console.print(info.doc, markup=False)
        return 0
    table = Table(title="bnfold rules (tried in this order)", header_style="bold")
    table.add_column("rule")
    table.add_column("summary")
    table.add_column("refuses when")
    for info in rule_infos():
        table.add_row(info.name, info.summary, _conditions(info.doc))
    console.print(table)
    return 0


def _conditions(doc: str) -> str:
    """The 'Conditions:' block of a rule header, as the refusal reasons a user may see."""
    lines = doc.splitlines()
    out: list[str] = []
    inside = False
    for line in lines:
        if line.startswith("Conditions:"):
            inside = True
            continue
        if inside and line and not line.startswith(" "):
            break
        if inside and line.strip():
            out.append(line.strip())
    text = " ".join(out)
    return text.replace(" - ", "\n- ").strip()


class _ErrLine:
    """One unwrapped line on stderr (rich would wrap long paths)."""

    @staticmethod
    def print(text: str, markup: bool = False) -> None:
        click.echo(text, err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps every outcome to an exit code, never a traceback."""
    err = _ErrLine()
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
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print("bnfold: interrupted; no partial output was left behind", markup=False)
        sys.exit(ExitCode.INTERRUPTED)
    except BnfoldError as exc:
        err.print(f"bnfold: error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except MemoryError:
        err.print("bnfold: error: out of memory", markup=False)
        sys.exit(ExitCode.INTERNAL)
    except Exception as exc:  # a bug: still one line, with a hint for the report
        err.print(
            f"bnfold: internal error: {type(exc).__name__}: {first_line(exc)} "
            "(set BNFOLD_DEBUG=1 for a traceback; please report)",
            markup=False,
        )
        if os.environ.get("BNFOLD_DEBUG"):  # pragma: no cover
            raise
        sys.exit(ExitCode.INTERNAL)
    sys.exit(int(rv or 0) if isinstance(rv, int) else 0)
