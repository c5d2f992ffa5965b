"""The pipeline's branches for torch input: a TorchScript archive or a ``torch.export`` archive (``.pt2``)
given to ``bnfold MODEL -o OUT``. ``OUT`` ending in ``.onnx`` exports to ONNX with BatchNormalization kept
and folds there; any other suffix writes a folded archive of the same kind, checked in torch. Each
returns a :class:`~bnfold.run.FoldRun`, like the ONNX branch in :mod:`bnfold.pipeline`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import ExitCode, OptionError, VerificationFailedError
from bnfold.io.load import file_size, model_file_bytes
from bnfold.run import FoldRun, ProgressCallback, ShapesArg, tell

if TYPE_CHECKING:
    from bnfold.check.options import VerifyOptions
    from bnfold.io.report_file import PendingReport

__all__ = ["fold_program_file", "fold_torchscript_file"]


def fold_torchscript_file(
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
    from bnfold.check import Tolerances
    from bnfold.errors import VerificationFailedError
    from bnfold.torch import ShapesArg as TorchShapes
    from bnfold.torch import TorchExportResult, TorchFoldResult, fold_torchscript, fold_torchscript_to_onnx

    torch_shapes: TorchShapes = _torch_shapes(shapes)
    dst = None  # written below, once the report is staged
    to_onnx = out.suffix.lower() == ".onnx"
    tell(progress, "fold")
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
        fold=outcome.fold.summary() if isinstance(outcome, TorchExportResult) else outcome,
        written=written, input_bytes=file_size(src), output_bytes=output_bytes, dry_run=dry_run,
        comparison=comparison, exit_code=ExitCode.VERIFY_FAILED if failed else ExitCode.OK, torch=outcome,
    )
    if report is not None:  # staged first: a report that cannot be written leaves OUT as it was
        report.stage(run.to_report())
    if written:
        from bnfold.io.save import atomic_write_bytes, save_model

        if isinstance(outcome, TorchExportResult):
            save_model(outcome.model, out)
        else:
            atomic_write_bytes(out, outcome.archive)
        outcome.path = os.fspath(out)
    if report is not None:
        report.commit()
    return run


def fold_program_file(
    src: Path,
    out: Path,
    *,
    dry_run: bool,
    shapes: ShapesArg,
    verify: bool,
    options: VerifyOptions,
    force: bool,
    opset: int,
    progress: ProgressCallback | None,
) -> FoldRun:
    from bnfold.check import Tolerances
    from bnfold.torch.export import TorchExportResult
    from bnfold.torch.program import ProgramFoldResult, fold_exported_program, fold_exported_program_to_onnx

    program_shapes = _torch_shapes(shapes)
    dst = None if dry_run else out
    to_onnx = out.suffix.lower() == ".onnx"
    tell(progress, "fold")
    outcome: ProgramFoldResult | TorchExportResult
    try:
        if to_onnx:
            outcome = fold_exported_program_to_onnx(src, dst, opset=opset, verify=verify, force=force,
                                                    rtol=options.rtol, atol=options.atol, seeds=options.seeds)
        else:
            outcome = fold_exported_program(src, dst, shapes=program_shapes, verify=verify, force=force,
                                            tolerances=Tolerances(options.rtol, options.atol), seeds=options.seeds)
    except VerificationFailedError as exc:  # nothing written; a result like the ONNX path's
        if not isinstance(exc.result, ProgramFoldResult | TorchExportResult):
            raise
        outcome = exc.result
    written = outcome.path is not None
    if written:
        output_bytes = model_file_bytes(out) if to_onnx else file_size(out)
    else:
        output_bytes = (outcome.model.ByteSize() if isinstance(outcome, TorchExportResult)
                        else len(outcome.archive))
    comparison = outcome.comparison
    failed = comparison is not None and not comparison.passed
    return FoldRun(
        input_path=src, input_format="exported_program", output_path=None if dry_run else out,
        fold=outcome.fold if isinstance(outcome, TorchExportResult) else outcome,
        written=written, input_bytes=file_size(src), output_bytes=output_bytes, dry_run=dry_run,
        comparison=comparison, exit_code=ExitCode.VERIFY_FAILED if failed else ExitCode.OK, torch=outcome,
    )


def _torch_shapes(shapes: ShapesArg) -> Any:
    """``--shape`` for a torch input: one per forward() argument, all by name or all in order; a bare int
    is a 1-D shape (``--shape x=4`` gives (4,)); None when none is given."""
    if isinstance(shapes, Mapping) and "" in shapes:
        raise OptionError("give every --shape with a name (x=1,3,224,224) or none of them", "--shape")
    if not shapes:
        return None
    if isinstance(shapes, Mapping):
        return {k: (v,) if isinstance(v, int) else v for k, v in shapes.items()}
    return shapes
