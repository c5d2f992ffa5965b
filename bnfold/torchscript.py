"""TorchScript in, TorchScript or ONNX out; and one call for export pipelines.

    >>> from bnfold.torchscript import fold_torchscript, fold_torch
    >>> r = fold_torchscript("model.pt", "model.folded.pt", shapes=[(1, 3, 224, 224)])
    >>> r.bn_before, r.bn_after, r.skipped, r.comparison.summary
    >>> e = fold_torch(model.eval(), torch.randn(1, 3, 224, 224), "model.onnx")   # folded, checked ONNX

torch is the optional ``bnfold[torch]`` extra: importing this module never imports it;
a call that needs it raises :class:`~bnfold.errors.MissingDependencyError` naming the extra.
``torch.export`` programs (``.pt2``): :func:`fold_exported_program`; eager modules: :func:`fold_module`.
Implementation: :mod:`bnfold.torch_`.
"""

from __future__ import annotations

from bnfold.torch_._runtime import is_exported_program, is_torchscript
from bnfold.torch_.export import (
    TorchExportResult,
    export_keep_bn,
    fold_torch,
    fold_torchscript_to_onnx,
    torchscript_to_onnx,
)
from bnfold.torch_.fold import TorchFoldResult, count_batch_norms, fold_torchscript
from bnfold.torch_.inputs import ShapesArg, parse_shapes
from bnfold.torch_.module import ModuleFoldResult, fold_module, fold_module_result
from bnfold.torch_.program import ProgramFoldResult, fold_exported_program, fold_exported_program_to_onnx

__all__ = [
    "ModuleFoldResult",
    "ProgramFoldResult",
    "ShapesArg",
    "TorchExportResult",
    "TorchFoldResult",
    "count_batch_norms",
    "export_keep_bn",
    "fold_exported_program",
    "fold_exported_program_to_onnx",
    "fold_module",
    "fold_module_result",
    "fold_torch",
    "fold_torchscript",
    "fold_torchscript_to_onnx",
    "is_exported_program",
    "is_torchscript",
    "parse_shapes",
    "torchscript_to_onnx",
]
