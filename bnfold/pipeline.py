"""The whole ``bnfold MODEL -o OUT`` run as one library call: fold, check, write (or not), time, report.

    >>> from bnfold.pipeline import fold_file, LatencyOptions
    >>> run = fold_file("model.onnx", "model.folded.onnx", latency=LatencyOptions(max_slowdown=1.02))
    >>> run.written, run.exit_code, run.comparison.summary
    >>> run.to_report()                      # the ``bnfold.report/1`` JSON, as ``--report`` writes it

ONNX or TorchScript input, recognised by content. The folded model is staged beside ``dst``, verified
from there, and committed only when the check passes (or ``force``); a failed check is a result
(``exit_code`` 4), not an exception. Nothing here prints: progress goes to a callback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError, ExitCode, OptionError
from bnfold.passes import FoldResult
from bnfold.rules.base import FoldOptions
from bnfold.verify.check import DEFAULT_SEEDS

if TYPE_CHECKING:
    from bnfold.report_file import PendingReport
    from bnfold.timing import GateResult, LatencyReport
    from bnfold.torchscript import TorchExportResult, TorchFoldResult
    from bnfold.verify import Comparison

__all__ = [
    "TORCH_SUFFIXES",
    "FoldRun",
    "LatencyOptions",
    "LatencyRun",
    "ProgressCallback",
    "ShapesArg",
    "VerifyOptions",
    "fold_file",
    "model_file_bytes",
    "time_files",
]

log = logging.getLogger(__name__)

TORCH_SUFFIXES = frozenset({".pt", ".pth", ".ts", ".torchscript", ".jit"})
"""Output suffixes that ask for a TorchScript archive (any other: ONNX)."""

ProgressCallback = Callable[[str, int, "int | None"], None]
"""``progress(stage, done, total)``: ``"fold"``, ``"verify"``, then ``"latency: <what>"`` with counts
(``total`` None: unknown)."""

ShapesArg = Mapping[str, "Sequence[int] | int"] | Sequence[Sequence[int]] | None
"""By name: an input (or a TorchScript forward() argument) -> shape, or an ONNX symbolic dim -> value; the
name ``""`` is an ONNX model's only input. In order: one shape per TorchScript forward() input (ONNX:
exactly one, for its only input)."""


@dataclass(frozen=True)
class VerifyOptions:
    """How the folded model is checked (see :func:`bnfold.verify.verify`)."""

    rtol: float | None = None
    atol: float | None = None
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    inputs: str | os.PathLike[str] | None = None
    """A ``.npz`` file of real inputs (ONNX input only)."""
    input_ranges: Mapping[str, tuple[float, float]] | None = None
    """Input name -> half-open range of generated values (ONNX input only)."""


@dataclass(frozen=True)
class LatencyOptions:
    """How the models are timed (see :func:`bnfold.timing.latency`) and the optional gate."""

    runs: int = 100
    warmup: int = 10
    rounds: int = 10
    threads: int | None = None
    levels: tuple[str, ...] = ("disable_all", "enable_all")
    max_slowdown: float | None = None
    """Gate: exit code 5 when the candidate's median exceeds this many times the baseline's anywhere."""


@dataclass(frozen=True)
class FoldRun:
    """What :func:`fold_file` did: the fold, the check, the write, the timing, and the exit code."""

    input_path: Path
    input_format: str
    """``"onnx"`` or ``"torchscript"``."""
    output_path: Path | None
    """Where the model goes (None: a dry run)."""
    fold: FoldResult | TorchFoldResult
    """The ONNX fold (also for TorchScript exported to ONNX), or the TorchScript fold. When nothing was
    written, ``fold.model``'s large tensors may name staged files that are gone: use ``fold_file`` with
    ``dry_run`` or :func:`bnfold.fold` for a model to keep in memory."""
    written: bool
    input_bytes: int | None
    """The input file and every external data file it references."""
    output_bytes: int | None
    """What was (or would have been) written."""
    dry_run: bool = False
    comparison: Comparison | None = None
    latency: LatencyReport | None = None
    gate: GateResult | None = None
    exit_code: ExitCode = ExitCode.OK
    """0, 4 (check failed: nothing written unless forced) or 5 (latency gate failed)."""
    torch: TorchFoldResult | TorchExportResult | None = field(default=None, repr=False)
    """TorchScript input: what :mod:`bnfold.torchscript` returned (module, archive, exported model)."""

    @property
    def verification_failed(self) -> bool:
        return self.comparison is not None and not self.comparison.passed

    def to_report(self) -> dict[str, Any]:
        """The ``bnfold.report/1`` JSON object (see :mod:`bnfold.report`)."""
        from bnfold.report import fold_report

        report = fold_report(
            self.fold,
            input_path=str(self.input_path),
            output_path=None if self.output_path is None else str(self.output_path),
            written=self.written,
            input_bytes=self.input_bytes,
            output_bytes=self.output_bytes,
            input_format=self.input_format,
        )
        report["dry_run"] = self.dry_run
        if self.comparison is not None:
            report["verification"] = self.comparison.to_dict()
        if self.latency is not None:
            report["latency"] = _latency_json(self.latency, self.gate)
        report["exit_code"] = int(self.exit_code)
        return report


@dataclass(frozen=True)
class LatencyRun:
    """What :func:`time_files` measured, and the gate's verdict."""

    latency: LatencyReport
    gate: GateResult | None = None

    @property
    def exit_code(self) -> ExitCode:
        return self.gate.exit_code if self.gate is not None else ExitCode.OK

    def to_report(self) -> dict[str, Any]:
        """The ``bnfold.latency-report/1`` JSON object."""
        from bnfold import __version__

        return {"schema": "bnfold.latency-report/1", "bnfold_version": __version__,
                "latency": _latency_json(self.latency, self.gate), "exit_code": int(self.exit_code)}


def fold_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    dry_run: bool = False,
    options: FoldOptions | None = None,
    check: bool = True,
    shapes: ShapesArg = None,
    verify: bool = True,
    verify_options: VerifyOptions = VerifyOptions(),
    force: bool = False,
    providers: Sequence[str] | None = None,
    latency: LatencyOptions | None = None,
    opset: int = 17,
    eval_mode: bool = False,
    report: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
) -> FoldRun:
    """Fold the model file ``src`` into ``dst`` (default: ``src`` with ``.folded`` before the suffix).

    ONNX input: folded with ``options`` (``check``: ``onnx.checker`` on both), staged beside ``dst``, checked
    from there on onnxruntime (``verify``; ``providers`` as in :func:`bnfold.verify.verify`), committed unless
    the check failed and not ``force``; then, with ``latency``, the original and the folded model are timed
    on ``providers`` and gated. TorchScript input (recognised by content): ``dst`` ending in ``.onnx`` exports
    to ONNX (``opset``) and folds there, any other suffix writes a TorchScript archive checked in torch;
    ``eval_mode`` puts a module saved in training mode into eval mode; ``options``, ``providers``, ``latency``
    and the ONNX-only verify options do not apply. ``dry_run`` writes no model. ``report``: write the JSON
    report there (checked before anything is written).

    Raises OptionError (an unknown rule, a TorchScript output for an ONNX input, shapes that cannot be
    meant, a level this onnxruntime lacks), BadInputError, OutputError, MissingDependencyError.
    """
    from bnfold.paths import as_path
    from bnfold.report_file import PendingReport
    from bnfold.torchscript import is_torchscript

    src = as_path(src, "src")
    out_arg = as_path(dst, "dst") if dst is not None else None
    report_path = as_path(report, "report") if report is not None else None
    _check_input(src)  # a regular, readable file: nothing else is opened (a FIFO blocks, a device never ends)
    torchscript = is_torchscript(src)
    default = src.with_name(f"{src.stem}.folded{src.suffix or ('.pt' if torchscript else '.onnx')}")
    out = out_arg if out_arg is not None else default
    # before anything is written: no output over a file the input reads, nothing but regular files
    _check_outputs([src] if torchscript else _input_files(src), src, None if dry_run else out, report_path)
    pending = PendingReport(report_path) if report_path is not None else None
    try:
        if torchscript:
            run = _fold_torchscript(src, out, dry_run=dry_run, shapes=shapes, verify=verify, options=verify_options,
                                    force=force, opset=opset, eval_mode=eval_mode, progress=progress, report=pending)
        else:
            run = _fold_onnx(src, out, dry_run=dry_run, options=options or FoldOptions(), check=check,
                             shapes=shapes, verify=verify, verify_options=verify_options, force=force,
                             providers=providers, latency=latency, progress=progress, report=pending)
    finally:
        if pending is not None:
            pending.discard()
    return run


def _fold_onnx(
    src: Path,
    out: Path,
    *,
    dry_run: bool,
    options: FoldOptions,
    check: bool,
    shapes: ShapesArg,
    verify: bool,
    verify_options: VerifyOptions,
    force: bool,
    providers: Sequence[str] | None,
    latency: LatencyOptions | None,
    progress: ProgressCallback | None,
    report: PendingReport | None = None,
) -> FoldRun:
    import bnfold.api  # looked up at call time (tests replace bnfold.api.fold)
    from bnfold.onnx_io import save_model

    if out.suffix.lower() in TORCH_SUFFIXES:
        raise OptionError(f"{src} is an ONNX model; a TorchScript output ({out.suffix}) needs a TorchScript "
                          "input. Use an .onnx output.", "-o/--output")
    _check_rules(options)
    onnx_shapes = _onnx_shapes(shapes)
    input_bytes = model_file_bytes(src)  # before a write that may replace it (-o equal to the input)
    _tell(progress, "fold")
    result = bnfold.api.fold(  # from the path: tensors read on demand, the output streamed to temporary names
        src,
        initializers_as_constants=options.initializers_as_constants,
        only=options.only,
        skip=options.skip,
        clone=options.clone,
        max_clone_bytes=options.max_clone_bytes,
        check=check,
        output=None if dry_run else out,
        commit=False,
    )
    staged = result.staged  # committed below once verified; discarded otherwise
    try:
        folded_model = staged.path if staged is not None else result.model
        comparison = None
        if verify and result.folded:  # verified before anything is written
            from bnfold.verify import verify as run_check

            _tell(progress, "verify")
            comparison = run_check(
                src,  # paths: onnxruntime loads both models (and their external data) itself
                folded_model,
                fold_outputs=result.folded,
                providers=list(providers) if providers else None,
                shapes=onnx_shapes,
                rtol=verify_options.rtol,
                atol=verify_options.atol,
                inputs=verify_options.inputs,
                input_ranges=verify_options.input_ranges,
                seeds=verify_options.seeds,
            )
        failed = comparison is not None and not comparison.passed
        write = not dry_run and (not failed or force)
        timing, gate = None, None
        if latency is not None:  # the staged file holds the bytes the output will have
            timing, gate = _measure({"original": src, "folded": folded_model}, latency, providers, progress)
        if staged is not None:
            output_bytes: int | None = staged.nbytes
        else:
            output_bytes = result.model.ByteSize()
        code = ExitCode.VERIFY_FAILED if failed else gate.exit_code if gate is not None else ExitCode.OK
        run = FoldRun(
            input_path=src, input_format="onnx", output_path=None if dry_run else out, fold=result, written=write,
            input_bytes=input_bytes, output_bytes=output_bytes, dry_run=dry_run, comparison=comparison,
            latency=timing, gate=gate, exit_code=code,
        )
        if report is not None:  # staged first: a report that cannot be written leaves OUT as it was
            report.stage(run.to_report())
        if write:
            if staged is not None:
                staged.commit()
            else:
                save_model(result.model, out)
        if report is not None:
            report.commit()
    finally:
        if staged is not None:
            staged.discard()  # nothing once committed
    return run


def _fold_torchscript(
    src: Path,
    out: Path,
    *,
    dry_run: bool,
    shapes: ShapesArg,
    verify: bool,
    options: VerifyOptions,
    force: bool,
    opset: int,
    eval_mode: bool,
    progress: ProgressCallback | None,
    report: PendingReport | None = None,
) -> FoldRun:
    from bnfold.errors import VerificationFailedError
    from bnfold.torchscript import ShapesArg as TorchShapes
    from bnfold.torchscript import TorchExportResult, TorchFoldResult, fold_torchscript, fold_torchscript_to_onnx
    from bnfold.verify import Tolerances

    if isinstance(shapes, Mapping) and "" in shapes:
        raise OptionError("give every --shape with a name (x=1,3,224,224) or none of them", "--shape")
    torch_shapes: TorchShapes
    if shapes is None or len(shapes) == 0:
        torch_shapes = None
    elif isinstance(shapes, Mapping):  # a bare int is a 1-D shape, as ``--shape x=4`` gives (4,)
        torch_shapes = {k: (v,) if isinstance(v, int) else v for k, v in shapes.items()}
    else:
        torch_shapes = shapes
    dst = None  # written below, once the report is staged
    to_onnx = out.suffix.lower() == ".onnx"
    _tell(progress, "fold")
    outcome: TorchFoldResult | TorchExportResult
    try:
        if to_onnx:
            outcome = fold_torchscript_to_onnx(
                src, dst, shapes=torch_shapes, opset=opset, eval_mode=eval_mode, verify=verify, force=force,
                rtol=options.rtol, atol=options.atol, seeds=options.seeds,
            )
        else:
            outcome = fold_torchscript(
                src, dst, shapes=torch_shapes, eval_mode=eval_mode, verify=verify, force=force,
                tolerances=Tolerances(options.rtol, options.atol), seeds=options.seeds,
            )
    except VerificationFailedError as exc:  # nothing written; a result like the ONNX path's
        if not isinstance(exc.result, TorchFoldResult | TorchExportResult):
            raise
        outcome = exc.result
    comparison = outcome.comparison
    failed = comparison is not None and not comparison.passed
    written = not dry_run and (not failed or force)
    output_bytes = (outcome.model.ByteSize() if isinstance(outcome, TorchExportResult)
                    else len(outcome.archive))
    run = FoldRun(
        input_path=src, input_format="torchscript", output_path=None if dry_run else out,
        fold=outcome.fold if isinstance(outcome, TorchExportResult) else outcome,
        written=written, input_bytes=_stat_size(src), output_bytes=output_bytes, dry_run=dry_run,
        comparison=comparison, exit_code=ExitCode.VERIFY_FAILED if failed else ExitCode.OK, torch=outcome,
    )
    if report is not None:  # staged first: a report that cannot be written leaves OUT as it was
        report.stage(run.to_report())
    if written:
        from bnfold.onnx_io import atomic_write_bytes, save_model

        if isinstance(outcome, TorchExportResult):
            save_model(outcome.model, out)
        else:
            atomic_write_bytes(out, outcome.archive)
        outcome.path = os.fspath(out)
    if report is not None:
        report.commit()
    return run


def time_files(
    baseline: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    latency: LatencyOptions = LatencyOptions(),  # frozen: never mutated
    providers: Sequence[str] | None = None,
    batch: int | None = None,
    shapes: Mapping[str, Sequence[int] | int] | None = None,
    include_copies: bool = False,
    io_binding: bool = True,
    report: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
) -> LatencyRun:
    """Time ``candidate`` against ``baseline`` (labelled by file name) and apply the gate, if any.

    ``report``: write the ``bnfold.latency-report/1`` JSON there (checked before timing).
    """
    from bnfold.paths import as_path

    base, cand = as_path(baseline, "baseline"), as_path(candidate, "candidate")
    report_path = as_path(report, "report") if report is not None else None
    for path in (base, cand):
        _check_input(path)
    _check_outputs([*_input_files(base), *_input_files(cand)], None, None, report_path)
    a, b = (base.name, cand.name) if base.name != cand.name else (str(base), str(cand))
    if a == b:
        a, b = f"{a} (A)", f"{b} (B)"
    timing, gate = _measure({a: base, b: cand}, latency, providers, progress, batch=batch, shapes=shapes,
                            include_copies=include_copies, io_binding=io_binding)
    run = LatencyRun(timing, gate)
    if report_path is not None:
        from bnfold.report_file import PendingReport

        PendingReport(report_path).write(run.to_report())
    return run


def model_file_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of an ONNX model file plus every external data file it references (None: unreadable)."""
    from bnfold.onnx_io import load_lazily

    try:
        files = load_lazily(path).store.referenced_files()
        return sum(f.stat().st_size for f in files)
    except (BnfoldError, OSError):
        return _stat_size(Path(os.fspath(path)))


def _stat_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _check_input(path: Path) -> None:
    from bnfold.paths import check_input_file

    check_input_file(path)


def _input_files(path: Path) -> list[Path]:
    """The files an ONNX model at ``path`` reads: itself and its external data (just itself when it cannot
    be read as a model: the fold says why, in its words)."""
    from bnfold.onnx_io import load_lazily

    try:
        return [path, *load_lazily(path).store.referenced_files()]
    except (BnfoldError, OSError):
        return [path]


def _check_outputs(inputs: Sequence[Path], model: Path | None, out: Path | None, report: Path | None) -> None:
    """The path policy of :mod:`bnfold.paths`: raises PathError / OutputError before anything is written."""
    from bnfold.paths import STDOUT, check_output_path, check_run_paths

    if out is not None:
        check_output_path(out, "-o/--output")
    if report is not None and str(report) != STDOUT:
        check_output_path(report, "--report")
    check_run_paths(inputs, model=model, output=out, report=report)


def _check_rules(options: FoldOptions) -> None:
    from bnfold.rules import RULES

    known = {m.NAME for m in RULES}
    for name in (*sorted(options.only or ()), *sorted(options.skip)):
        if name not in known:
            raise OptionError(f"unknown rule {name!r}; known: {', '.join(sorted(known))}", "--only/--skip")


def _onnx_shapes(shapes: ShapesArg) -> Mapping[str, Sequence[int] | int] | None:
    if shapes is None or isinstance(shapes, Mapping):
        return shapes or None
    shapes = list(shapes)
    if not shapes:
        return None
    if len(shapes) != 1:
        raise OptionError("an ONNX model's shapes go by input name (x=1,3,224,224); a shape without a name is "
                          "for a model with one input", "--shape")
    return {"": tuple(shapes[0])}


def _tell(progress: ProgressCallback | None, stage: str, done: int = 0, total: int | None = None) -> None:
    if progress is not None:
        progress(stage, done, total)


def _measure(
    models: dict[str, Any],
    options: LatencyOptions,
    providers: Sequence[str] | None,
    progress: ProgressCallback | None,
    **extra: Any,
) -> tuple[LatencyReport, GateResult | None]:
    from bnfold.timing import latency

    def tick(label: str, done: int, total: int) -> None:
        _tell(progress, f"latency: {label}", done, total)

    _tell(progress, "latency")
    try:
        report = latency(
            models,
            providers=list(providers) if providers else None,
            levels=options.levels,
            runs=options.runs,
            warmup=options.warmup,
            rounds=options.rounds,
            threads=options.threads,
            progress=tick,
            **extra,
        )
    except OptionError:
        raise
    except ValueError as exc:  # an option value timing refuses (e.g. a level this onnxruntime lacks)
        raise OptionError(str(exc)) from exc
    return report, report.gate(options.max_slowdown) if options.max_slowdown is not None else None


def _latency_json(report: LatencyReport, gate: GateResult | None) -> dict[str, Any]:
    data = report.to_dict()
    data["gate"] = gate.to_dict() if gate is not None else None
    return data
