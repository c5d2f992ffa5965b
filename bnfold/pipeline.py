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

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.check.options import VerifyOptions
from bnfold.errors import BnfoldError, ExitCode, OptionError, OutputError
from bnfold.folding.options import FoldOptions
from bnfold.folding.result import FoldResult
from bnfold.io.load import model_file_bytes
from bnfold.overrides import with_overrides
from bnfold.run import TORCH_SUFFIXES, FoldRun, LatencyRun, ProgressCallback, ShapesArg, tell
from bnfold.timing.options import LatencyOptions

if TYPE_CHECKING:
    from bnfold.io.load import ModelSource
    from bnfold.io.report_file import PendingReport
    from bnfold.timing import GateResult, LatencyReport

__all__ = [
    "TORCH_SUFFIXES",
    "FoldRun",
    "LatencyOptions",
    "LatencyRun",
    "ProgressCallback",
    "ShapesArg",
    "VerifyOptions",
    "fold",
    "fold_file",
    "model_file_bytes",
    "time_files",
]

log = logging.getLogger(__name__)

def fold_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    dry_run: bool = False,
    options: FoldOptions | None = None,
    shapes: ShapesArg = None,
    verify: bool = True,
    verify_options: VerifyOptions | None = None,
    force: bool = False,
    providers: Sequence[str] | None = None,
    latency: LatencyOptions | None = None,
    opset: int = 17,
    eval_mode: bool = False,
    report: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
) -> FoldRun:
    """Fold the model file ``src`` into ``dst`` (default: ``src`` with ``.folded`` before the suffix).

    ONNX input: folded with ``options`` (tensors read on demand, new ones spilled beside ``dst``: memory stays
    far below the model's size), staged beside ``dst``, checked from there on onnxruntime (``verify``,
    ``verify_options``; ``shapes`` and ``providers`` fill theirs), committed unless
    the check failed and not ``force``; then, with ``latency``, the original and the folded model are timed
    on ``providers`` and gated. TorchScript input (recognised by content): ``dst`` ending in ``.onnx`` exports
    to ONNX (``opset``) and folds there, any other suffix writes a TorchScript archive checked in torch;
    ``eval_mode`` puts a module saved in training mode into eval mode; ``options``, ``providers``, ``latency``
    and the ONNX-only verify options do not apply. ``dry_run`` writes no model. ``report``: write the JSON
    report there (checked before anything is written).

    Raises OptionError (an unknown rule, a TorchScript output for an ONNX input, shapes that cannot be
    meant, a level this onnxruntime lacks), BadInputError, OutputError, MissingDependencyError.
    """
    from bnfold.io.paths import as_path
    from bnfold.io.report_file import PendingReport
    from bnfold.torch import is_torchscript

    verify_options = verify_options or VerifyOptions()
    src = as_path(src, "src")
    out_arg = as_path(dst, "dst") if dst is not None else None
    report_path = as_path(report, "report") if report is not None else None
    if latency is not None and latency.plot is not None:
        from bnfold.timing.plot import check_plot_path

        check_plot_path(latency.plot)
    _check_input(src)  # a regular, readable file: nothing else is opened (a FIFO blocks, a device never ends)
    torchscript = is_torchscript(src)
    program = not torchscript and _is_exported_program(src)
    suffix = src.suffix or (".pt" if torchscript else ".pt2" if program else ".onnx")
    out = out_arg if out_arg is not None else src.with_name(f"{src.stem}.folded{suffix}")
    # before anything is written: no output over a file the input reads, nothing but regular files
    _check_outputs([src] if torchscript or program else _input_files(src), src, None if dry_run else out, report_path)
    pending = PendingReport(report_path) if report_path is not None else None
    try:
        if program:
            from bnfold.pipeline_torch import fold_program_file

            run = fold_program_file(src, out, dry_run=dry_run, shapes=shapes, verify=verify, options=verify_options,
                                    force=force, opset=opset, progress=progress)
            if pending is not None:
                pending.stage(run.to_report())
                pending.commit()
        elif torchscript:
            from bnfold.pipeline_torch import fold_torchscript_file

            run = fold_torchscript_file(src, out, dry_run=dry_run, shapes=shapes, verify=verify, options=verify_options,
                                    force=force, opset=opset, eval_mode=eval_mode, progress=progress, report=pending)
        else:
            run = _fold_onnx(src, out, dry_run=dry_run, options=options or FoldOptions(), shapes=shapes,
                             verify=verify, verify_options=verify_options, force=force, providers=providers,
                             latency=latency, progress=progress, report=pending)
    finally:
        if pending is not None:
            pending.discard()
    return run


def fold(model: ModelSource, options: FoldOptions | None = None, /, **overrides: Any) -> FoldResult:
    """Fold every foldable BatchNormalization of an ONNX model, in memory.

    ``model`` is a path, bytes or an ``onnx.ModelProto`` (never modified). ``options`` (or its fields as
    keywords: ``only``, ``skip``, ``clone``, ``max_clone_bytes``, ``initializers_as_constants``, ``check``)
    say what may be folded. Returns a frozen :class:`~bnfold.folding.FoldResult`: the folded model (its
    tensors in memory), the folds made and every normalization left with its reason. Raises
    :class:`~bnfold.errors.BadInputError` for input that is not a valid model. To fold a file into a file
    with memory far below the model's size, use :func:`fold_file`.
    """
    import onnx

    from bnfold.folding.passes import fold_model
    from bnfold.io.load import load_lazily, load_model, materialize

    options = with_overrides(FoldOptions, options, overrides)
    if isinstance(model, onnx.ModelProto):
        return fold_model(load_model(model), options)
    if isinstance(model, bytes | bytearray | memoryview):
        return fold_model(load_model(model), options, copy=False)  # parsed here: nobody else holds it
    if not isinstance(model, str | os.PathLike):
        raise TypeError(f"model must be a path, bytes or onnx.ModelProto, not {type(model).__name__}")
    lazy = load_lazily(model)
    result = fold_model(lazy.proto, options, copy=False, data=lazy.store)
    materialize(lazy)
    return result
def _is_exported_program(src: Path) -> bool:
    from bnfold.torch.archive import is_exported_program

    return is_exported_program(src)


def _fold_onnx(
    src: Path,
    out: Path,
    *,
    dry_run: bool,
    options: FoldOptions,
    shapes: ShapesArg,
    verify: bool,
    verify_options: VerifyOptions,
    force: bool,
    providers: Sequence[str] | None,
    latency: LatencyOptions | None,
    progress: ProgressCallback | None,
    report: PendingReport | None = None,
) -> FoldRun:
    from bnfold.folding.passes import fold_model
    from bnfold.io.load import load_lazily
    from bnfold.io.staging import StagedModel

    if out.suffix.lower() in TORCH_SUFFIXES or out.suffix.lower() == ".pt2":
        kind = "torch.export" if out.suffix.lower() == ".pt2" else "TorchScript"
        raise OptionError(f"{src} is an ONNX model; a {kind} output ({out.suffix}) needs a {kind} input. Use an "
                          ".onnx output.", "-o/--output")
    _check_rules(options)
    onnx_shapes = _onnx_shapes(shapes)
    input_bytes = model_file_bytes(src)  # before a write that may replace it (-o equal to the input)
    tell(progress, "fold")
    with contextlib.ExitStack() as cleanup:
        staged = None if dry_run else StagedModel(out)
        if staged is not None:
            cleanup.callback(staged.discard)  # nothing once committed
        lazy = load_lazily(src)  # tensors read on demand; new large ones spilled beside the output
        store = lazy.store
        try:
            if staged is not None:
                store.open_spill(staged.scratch)
                cleanup.callback(store.close)
            result = fold_model(lazy.proto, options, copy=False, data=store,
                                keep=store.spill if staged is not None else None)
        except OutputError as exc:  # the scratch file is ours, not the user's: name the output
            cause = exc.__cause__
            detail = getattr(cause, "strerror", None) or cause or exc
            raise OutputError(f"{out}: cannot write ({detail})") from exc
        if staged is not None:
            staged.write(result.model, store=store, external_data=None if lazy.inline else True)
            store.close()
        comparison, per_fold, whole_error = None, None, ""
        if verify and result.folded:  # verified before anything is written
            from bnfold.check import verify as run_check
            from bnfold.check.sizes import UnrunnableModelError

            tell(progress, "verify")
            folded_model = staged.path if staged is not None else result.model
            settings = _verify_settings(verify_options, onnx_shapes, providers)
            try:  # paths: onnxruntime loads both models (and their external data) itself
                comparison = run_check(src, folded_model, settings, fold_outputs=result.folded)
            except UnrunnableModelError as exc:  # the model's limit: each fold is checked alone instead
                from bnfold.check.compare import Tolerances
                from bnfold.check.per_fold import check_folds

                whole_error = str(exc)
                per_fold = check_folds(src, folded_model, result.folded,
                                       tolerances=Tolerances(settings.rtol, settings.atol))
        failed = comparison is not None and not comparison.passed
        if per_fold is not None:
            failed = not per_fold.passed
        code_if_failed = ExitCode.VERIFY_FAILED
        if per_fold is not None and not per_fold.failed and per_fold.uncovered:
            code_if_failed = ExitCode.UNVERIFIED
        write = staged is not None and (not failed or force)
        timing, gate = None, None
        if latency is not None:  # the staged file holds the bytes the output will have
            folded_model = staged.path if staged is not None else result.model
            timing, gate = _measure({"original": src, "folded": folded_model}, latency, providers, progress)
        output_bytes = staged.nbytes if staged is not None else result.model.ByteSize()
        code = code_if_failed if failed else gate.exit_code if gate is not None else ExitCode.OK
        run = FoldRun(
            input_path=src, input_format="onnx", output_path=None if dry_run else out, fold=result.summary(),
            written=write, input_bytes=input_bytes, output_bytes=output_bytes, dry_run=dry_run,
            comparison=comparison, latency=timing, gate=gate, exit_code=code, per_fold=per_fold,
            whole_model_error=whole_error,
        )
        if report is not None:  # staged first: a report that cannot be written leaves OUT as it was
            report.stage(run.to_report())
        if write:
            assert staged is not None
            staged.commit()
        if report is not None:
            report.commit()
    return run


def time_files(
    baseline: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    latency: LatencyOptions | None = None,
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
    from bnfold.io.paths import as_path

    base, cand = as_path(baseline, "baseline"), as_path(candidate, "candidate")
    report_path = as_path(report, "report") if report is not None else None
    for path in (base, cand):
        _check_input(path)
    _check_outputs([*_input_files(base), *_input_files(cand)], None, None, report_path)
    a, b = (base.name, cand.name) if base.name != cand.name else (str(base), str(cand))
    if a == b:
        a, b = f"{a} (A)", f"{b} (B)"
    timing, gate = _measure({a: base, b: cand}, latency or LatencyOptions(), providers, progress, batch=batch,
                            shapes=shapes, include_copies=include_copies, io_binding=io_binding)
    run = LatencyRun(timing, gate)
    if report_path is not None:
        from bnfold.io.report_file import PendingReport

        PendingReport(report_path).write(run.to_report())
    return run


def _check_input(path: Path) -> None:
    from bnfold.io.paths import check_input_file

    check_input_file(path)


def _input_files(path: Path) -> list[Path]:
    """The files an ONNX model at ``path`` reads: itself and its external data (just itself when it cannot
    be read as a model: the fold says why, in its words)."""
    from bnfold.io.load import load_lazily

    try:
        return [path, *load_lazily(path).store.referenced_files()]
    except (BnfoldError, OSError):
        return [path]


def _check_outputs(inputs: Sequence[Path], model: Path | None, out: Path | None, report: Path | None) -> None:
    """The path policy of :mod:`bnfold.io.paths`: raises PathError / OutputError before anything is written."""
    from bnfold.io.paths import STDOUT, check_output_path, check_run_paths

    if out is not None:
        check_output_path(out, "-o/--output")
    if report is not None and str(report) != STDOUT:
        check_output_path(report, "--report")
    check_run_paths(inputs, model=model, output=out, report=report)


def _check_rules(options: FoldOptions) -> None:
    from bnfold.folding.rules import RULES

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


def _measure(
    models: dict[str, Any],
    options: LatencyOptions,
    providers: Sequence[str] | None,
    progress: ProgressCallback | None,
    **extra: Any,
) -> tuple[LatencyReport, GateResult | None]:
    """Time ``models`` with ``options`` (``providers`` and ``extra`` fill its fields where given) and gate."""
    from bnfold.timing import latency

    def tick(label: str, done: int, total: int) -> None:
        tell(progress, f"latency: {label}", done, total)

    if options.plot is not None:  # a plot that cannot be drawn fails before minutes of timing
        from bnfold.timing.plot import check_plot_path

        check_plot_path(options.plot)
    tell(progress, "latency")
    if providers:
        extra["providers"] = list(providers)
    try:
        report = latency(models, options, progress=tick, **extra)
    except OptionError:
        raise
    except ValueError as exc:  # an option value timing refuses (e.g. a level this onnxruntime lacks)
        raise OptionError(str(exc)) from exc
    if options.plot is not None:
        report.plot(options.plot)
    return report, report.gate(options.max_slowdown) if options.max_slowdown is not None else None


def _verify_settings(
    options: VerifyOptions, shapes: Mapping[str, Sequence[int] | int] | None, providers: Sequence[str] | None
) -> VerifyOptions:
    """``options`` with the run's ``--shape`` and ``--provider`` (shared with timing and export) where given."""
    fill: dict[str, Any] = {}
    if shapes:
        fill["shapes"] = shapes
    if providers:
        fill["providers"] = list(providers)
    return with_overrides(VerifyOptions, options, fill)
