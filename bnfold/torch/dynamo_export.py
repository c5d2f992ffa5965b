"""ONNX export through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``), BatchNormalization kept.

How it keeps BatchNorm: the dynamo exporter translates the ``torch.export`` program's
``aten._native_batch_norm_legit_no_training`` into an inference ``BatchNormalization`` (``training_mode=0``),
then, with ``optimize=True`` (its default), runs onnxscript's optimizer, whose rewrite rules include
Conv/ConvTranspose/Gemm + BatchNormalization fusion (measured on torch 2.13: a Conv-BN, ConvTranspose-BN,
Linear-BN1d model exports as 3 ``BatchNormalization`` with ``optimize=False`` and as none with
``optimize=True``). ``optimize=False`` therefore leaves every BatchNorm for bnfold to fold (in float64,
rounded once) and to report; constant folding of shape arithmetic is then bnfold's ONNX pass's business.

Where the dynamo exporter cannot export a module (``torch.export`` fails on data-dependent control flow, an
unsupported op, ...), :func:`export_onnx` falls back to the legacy exporter with
``TrainingMode.PRESERVE`` (:func:`bnfold.torch.export.export_keep_bn`) and says so.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import Any

import onnx

from bnfold.errors import BadInputError, first_line
from bnfold.torch.archive import quiet, require_torch

__all__ = ["EXPORTERS", "MIN_OPSET", "export_dynamo", "export_onnx"]

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "legacy")
"""``auto``: dynamo, the legacy exporter where dynamo fails; or one of them only."""


MIN_OPSET = 18
"""The dynamo exporter implements opset 18 and up; a lower request is raised to 18 (it would otherwise run
onnx's version converter, which fails on ReduceMean and others and logs a traceback)."""


@contextlib.contextmanager
def _hushed() -> Iterator[None]:
    """The exporter prints progress to stdout and logs warnings (torchvision not installed, opset raised):
    library code must not print, so both are held back while it runs (its errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with quiet(), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_dynamo(
    model: Any, args: tuple[Any, ...], *, opset: int | None = None, dynamic_shapes: Any = None
) -> onnx.ModelProto:
    """``torch.onnx.export(model, args, dynamo=True, optimize=False)``: BatchNormalization kept.

    ``model`` is an ``nn.Module`` or an ``ExportedProgram`` (then ``args`` and ``dynamic_shapes`` are the
    program's own). ``opset``: at least :data:`MIN_OPSET` (default).
    """
    torch = require_torch("exporting to ONNX")
    is_program = isinstance(model, torch.export.ExportedProgram)
    opset = max(opset or MIN_OPSET, MIN_OPSET)
    try:
        with _hushed(), torch.no_grad():
            program = torch.onnx.export(
                model,
                () if is_program else args,
                dynamo=True,
                optimize=False,
                opset_version=opset,
                dynamic_shapes=None if is_program else dynamic_shapes,
                verbose=False,
            )
    except Exception as exc:
        raise BadInputError(f"torch.onnx.export(dynamo=True) failed: {first_line(exc)}") from exc
    if program is None:
        raise BadInputError("torch.onnx.export(dynamo=True) returned no program")
    model_proto: onnx.ModelProto = program.model_proto
    try:
        return onnx.shape_inference.infer_shapes(model_proto, data_prop=True)
    except Exception as exc:  # e.g. over the protobuf limit: fold without the extra shapes
        log.info("ONNX shape inference failed (%s); folding without inferred shapes", exc)
        return model_proto


def export_onnx(
    module: Any,
    args: tuple[Any, ...],
    *,
    exporter: str = "auto",
    opset: int | None = None,
    dynamic_shapes: Any = None,
    dynamic_batch: bool = False,
) -> tuple[onnx.ModelProto, str, str | None]:
    """(model, the exporter used: ``"dynamo"`` or ``"legacy"``, why dynamo was not used or None).

    ``opset`` defaults to 18 for dynamo (the lowest it implements; a lower one is raised to 18) and 17 for
    the legacy exporter.
    A ScriptModule always goes through the legacy exporter (the dynamo exporter traces Python).
    """
    from bnfold.torch.export import export_keep_bn

    torch = require_torch("exporting to ONNX")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    why: str | None = None
    if exporter != "legacy":
        if isinstance(module, torch.jit.ScriptModule):
            why = "a ScriptModule: the dynamo exporter needs an nn.Module or an ExportedProgram"
        else:
            if dynamic_shapes is None and dynamic_batch:
                batch = torch.export.Dim("batch")
                dynamic_shapes = tuple({0: batch} for _ in args)
            try:
                return export_dynamo(module, args, opset=opset, dynamic_shapes=dynamic_shapes), "dynamo", None
            except BadInputError as exc:
                if exporter == "dynamo":
                    raise
                why = str(exc)
        if exporter == "dynamo":
            raise BadInputError(f"the dynamo exporter cannot export this model: {why}")
        log.info("falling back to the legacy ONNX exporter: %s", why)
    if dynamic_shapes is not None and not dynamic_batch:
        dynamic_batch = True  # the legacy exporter takes dynamic axes by name; keep the batch dynamic at least
    model = export_keep_bn(module, args, opset=opset or 17, dynamic_batch=dynamic_batch)
    return model, "legacy", why
