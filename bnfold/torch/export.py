"""TorchScript or ``nn.Module`` -> ONNX with BatchNormalization kept -> the ONNX fold and check.

The legacy exporter (``dynamo=False``) folds Conv + BatchNorm itself when exporting in eval mode
(``training=TrainingMode.EVAL``, its default, runs ``eval_peephole``); the fold report would then miss
them. ``training=TrainingMode.PRESERVE`` on a module in eval mode skips that pass and writes each
BatchNorm as an inference ``BatchNormalization`` (``training_mode=0``, one output), while keeping constant
folding for shape arithmetic. (``do_constant_folding=False`` alone also keeps them, but leaves shape
arithmetic unfolded.) A BatchNorm in training mode is exported as such and the fold reports it.
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx

from bnfold.errors import BadInputError, VerificationFailedError
from bnfold.torch.archive import ArchiveSource, load_archive, quiet, read_source, require_torch
from bnfold.torch.inputs import ShapesArg, input_names, make_inputs

if TYPE_CHECKING:
    import torch

    from bnfold.check.result import Comparison
    from bnfold.folding.result import FoldedPair, FoldResult, Skip

__all__ = [
    "TorchExportResult",
    "export_keep_bn",
    "fold_torch",
    "fold_torchscript_to_onnx",
    "torchscript_to_onnx",
]

log = logging.getLogger(__name__)


@dataclass
class TorchExportResult:
    """An export folded: the folded ONNX model, the model as exported, and the fold and check results."""

    model: onnx.ModelProto
    """The folded model."""
    exported: onnx.ModelProto
    """The model as exported, BatchNormalization kept: the reference of the check."""
    fold: FoldResult
    comparison: Comparison | None = None
    path: str | None = None
    """Where the folded model was written (None: not written)."""
    exporter: str = "legacy"
    """The ONNX exporter used: ``"dynamo"`` or ``"legacy"``."""
    exporter_note: str | None = None
    """Why the dynamo exporter was not used, where it was tried."""

    @property
    def folded(self) -> tuple[FoldedPair, ...]:
        return self.fold.folded

    @property
    def skipped(self) -> tuple[Skip, ...]:
        return self.fold.skipped

    @property
    def passed(self) -> bool:
        """True unless verification ran and failed."""
        return self.comparison is None or self.comparison.passed


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise BadInputError("example_inputs must be a tensor or a tuple of tensors")


def _arg_names(module: Any, n: int) -> list[str]:
    import torch

    names: list[str] = []
    if isinstance(module, torch.jit.ScriptModule):
        names = input_names(module.graph)
    else:
        try:
            params = list(inspect.signature(module.forward).parameters.values())
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            names = []
    names = names[:n]
    if len(names) != n or len(set(names)) != n:
        names = ["input"] if n == 1 else [f"input_{i}" for i in range(n)]
    return names


def export_keep_bn(
    module: torch.nn.Module | torch.jit.ScriptModule,
    example_inputs: Any,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
) -> onnx.ModelProto:
    """Export to ONNX with the legacy exporter, keeping every BatchNorm as ``BatchNormalization``.

    The module's training flags are kept as they are (nothing is switched to eval mode). The model comes
    back with ONNX shape inference applied (the exporter itself records no intermediate shapes).
    """
    torch = require_torch("exporting to ONNX")
    args = _as_tuple(example_inputs)
    names = _arg_names(module, len(args))
    dynamic_axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    buf = io.BytesIO()
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(
                module,
                args,
                buf,
                dynamo=False,
                opset_version=opset,
                training=torch.onnx.TrainingMode.PRESERVE,
                input_names=names,
                dynamic_axes=dynamic_axes,
            )
    except Exception as exc:
        text = str(exc).strip()
        raise BadInputError(
            f"torch.onnx.export failed: {text.splitlines()[0] if text else type(exc).__name__}"
        ) from exc
    model = onnx.load_from_string(buf.getvalue())
    # The legacy exporter writes no value_info; ranks are what let the MatMul rule prove a channel axis.
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # e.g. a model over the protobuf limit: fold without the extra shapes
        log.info("ONNX shape inference failed (%s); folding without inferred shapes", exc)
        return model


def torchscript_to_onnx(
    src: ArchiveSource,
    shapes: ShapesArg = None,
    opset: int = 17,
    *,
    seed: int = 0,
    dynamic_batch: bool = False,
    eval_mode: bool = False,
) -> onnx.ModelProto:
    """Export a TorchScript archive (path or bytes) to ONNX with BatchNormalization kept.

    ``shapes``: one per forward() input, in order or by name; inferred from the first layer when None.
    ``eval_mode``: put a module saved in training mode into eval mode first.
    """
    torch = require_torch()
    data = read_source(src)
    what = "the given bytes" if isinstance(src, bytes | bytearray | memoryview) else os.fspath(src)
    module = load_archive(data, str(what))
    if eval_mode:
        module.eval()
    probe_graph = module.graph
    if shapes is None:  # weights are graph constants only after freezing
        if module.training:
            raise BadInputError(f"{what}: saved in training mode; give the input shapes with --shape")
        with quiet():
            probe_graph = torch.jit.freeze(copy.deepcopy(module), optimize_numerics=False).graph
    inputs = make_inputs(probe_graph, shapes, seed)
    if inputs is None:
        raise BadInputError(
            f"{what}: cannot infer the input shapes (forward() does not start with a Conv or Linear); "
            "give them with --shape 1,3,224,224 (one per input, or NAME=DIMS)"
        )
    return export_keep_bn(module, inputs.tensors, opset=opset, dynamic_batch=dynamic_batch)


def fold_and_check(
    exported: onnx.ModelProto,
    path: str | os.PathLike[str] | None,
    verify: bool,
    force: bool,
    rtol: float | None,
    atol: float | None,
    seeds: Sequence[int] | None,
    exporter: str = "legacy",
    exporter_note: str | None = None,
) -> TorchExportResult:
    from bnfold.folding.passes import fold_model
    from bnfold.io.save import save_model

    fold_result = fold_model(exported)  # a copy: ``exported`` stays the reference of the check
    result = TorchExportResult(model=fold_result.model, exported=exported, fold=fold_result, exporter=exporter,
                               exporter_note=exporter_note)
    if verify:
        from bnfold.check import DEFAULT_SEEDS
        from bnfold.check import verify as run_check

        result.comparison = run_check(
            exported,
            fold_result.model,
            seeds=DEFAULT_SEEDS if seeds is None else seeds,
            rtol=rtol,
            atol=atol,
            fold_outputs=fold_result.folded,
        )
        if not result.comparison.passed and not force:
            raise VerificationFailedError(f"{result.comparison.summary}; nothing written", result)
    if path is not None:
        save_model(result.model, path)
        result.path = os.fspath(path)
    return result


def fold_torch(
    module: torch.nn.Module | torch.jit.ScriptModule,
    example_inputs: Any,
    path: str | os.PathLike[str] | None = None,
    opset: int | None = None,
    verify: bool = True,
    *,
    dynamic_batch: bool = False,
    dynamic_shapes: Any = None,
    exporter: str = "auto",
    force: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    seeds: Sequence[int] | None = None,
) -> TorchExportResult:
    """One call for an export pipeline: export ``module`` to ONNX keeping BatchNorm, fold, verify, write.

    ``module`` is an ``nn.Module``, an ``ExportedProgram`` or a ScriptModule, exported as it is (call
    ``.eval()`` first: a BatchNorm in training mode is not folded). ``example_inputs`` is a tensor or a
    tuple of tensors. ``exporter``: ``"auto"`` (default) uses ``torch.onnx.export(dynamo=True,
    optimize=False)`` and falls back to the legacy exporter where dynamo cannot export the module;
    ``"dynamo"`` or ``"legacy"`` use that one only (see :mod:`bnfold.torch.dynamo_export`); the result's
    ``exporter`` says which ran. ``dynamic_shapes`` goes to the dynamo exporter as ``torch.export`` takes
    it; ``dynamic_batch`` makes axis 0 of every input dynamic. ``opset``: 18 (dynamo) or 17 (legacy) by
    default. With ``verify`` the folded model is checked against the export on onnxruntime; when that
    fails, ``VerificationFailedError`` is raised (``.result`` holds this result) and nothing is written,
    unless ``force``. ``path``: where to write the folded ONNX model.
    """
    from bnfold.torch.dynamo_export import export_onnx

    args = () if _is_program(module) else _as_tuple(example_inputs)
    exported, used, why = export_onnx(module, args, exporter=exporter, opset=opset, dynamic_shapes=dynamic_shapes,
                                      dynamic_batch=dynamic_batch)
    return fold_and_check(exported, path, verify, force, rtol, atol, seeds, used, why)


def _is_program(module: Any) -> bool:
    import torch

    return isinstance(module, torch.export.ExportedProgram)


def fold_torchscript_to_onnx(
    src: ArchiveSource,
    dst: str | os.PathLike[str] | None = None,
    *,
    shapes: ShapesArg = None,
    opset: int = 17,
    verify: bool = True,
    dynamic_batch: bool = False,
    eval_mode: bool = False,
    force: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    seeds: Sequence[int] | None = None,
) -> TorchExportResult:
    """TorchScript archive in, folded and verified ONNX out (``bnfold model.pt -o out.onnx``)."""
    exported = torchscript_to_onnx(src, shapes, opset, dynamic_batch=dynamic_batch, eval_mode=eval_mode)
    return fold_and_check(exported, dst, verify, force, rtol, atol, seeds)
