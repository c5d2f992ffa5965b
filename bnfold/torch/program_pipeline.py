"""``bnfold model.pt2 -o OUT``: the pipeline's branch for a ``torch.export`` archive.

``OUT`` ending in ``.onnx`` exports to ONNX (dynamo exporter, BatchNormalization kept) and folds there; any
other suffix writes a folded ``.pt2`` checked in torch. The run is a :class:`bnfold.pipeline.FoldRun`
with ``input_format="exported_program"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from bnfold.errors import ExitCode, OptionError, VerificationFailedError

if TYPE_CHECKING:
    from bnfold.pipeline import FoldRun, ProgressCallback, ShapesArg, VerifyOptions

__all__ = ["INPUT_FORMAT", "fold_program_file"]

INPUT_FORMAT = "exported_program"


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
    from bnfold.pipeline import FoldRun, _stat_size, _tell, model_file_bytes
    from bnfold.torch.export import TorchExportResult
    from bnfold.torch.program import ProgramFoldResult, fold_exported_program, fold_exported_program_to_onnx

    if isinstance(shapes, Mapping) and "" in shapes:
        raise OptionError("give every --shape with a name (x=1,3,224,224) or none of them", "--shape")
    program_shapes = None
    if shapes:
        program_shapes = ({k: (v,) if isinstance(v, int) else v for k, v in shapes.items()}
                          if isinstance(shapes, Mapping) else shapes)
    dst = None if dry_run else out
    to_onnx = out.suffix.lower() == ".onnx"
    _tell(progress, "fold")
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
        output_bytes = model_file_bytes(out) if to_onnx else _stat_size(out)
    else:
        output_bytes = (outcome.model.ByteSize() if isinstance(outcome, TorchExportResult)
                        else len(outcome.archive))
    comparison = outcome.comparison
    failed = comparison is not None and not comparison.passed
    return FoldRun(
        input_path=src, input_format=INPUT_FORMAT, output_path=None if dry_run else out,
        fold=outcome.fold if isinstance(outcome, TorchExportResult) else outcome,
        written=written, input_bytes=_stat_size(src), output_bytes=output_bytes, dry_run=dry_run,
        comparison=comparison, exit_code=ExitCode.VERIFY_FAILED if failed else ExitCode.OK, torch=outcome,
    )
