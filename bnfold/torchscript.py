"""TorchScript in, TorchScript or ONNX out; and one call for export pipelines.

    >>> from bnfold.torchscript import fold_torchscript, fold_torch
    >>> r = fold_torchscript("model.pt", "model.folded.pt", shapes=[(1, 3, 224, 224)])
    >>> r.bn_before, r.bn_after, r.skipped, r.comparison.summary
    >>> e = fold_torch(model.eval(), torch.randn(1, 3, 224, 224), "model.onnx")   # folded, checked ONNX

torch is the optional ``bnfold[torch]`` extra: importing this module never imports it;
a call that needs it raises :class:`~bnfold.errors.MissingDependencyError` naming the extra.
Implementation: :mod:`bnfold.torch_`.
"""

from __future__ import annotations

from bnfold.torch_._runtime import is_torchscript
from bnfold.torch_.export import (
    TorchExportResult,
    export_keep_bn,
    fold_torch,
    fold_torchscript_to_onnx,
    torchscript_to_onnx,
)
from bnfold.torch_.fold import TorchFoldResult, count_batch_norms, fold_torchscript
from bnfold.torch_.inputs import ShapesArg, parse_shapes

__all__ = [
    "ShapesArg",
    "TorchExportResult",
    "TorchFoldResult",
    "count_batch_norms",
    "export_keep_bn",
    "fold_torch",
    "fold_torchscript",
    "fold_torchscript_to_onnx",
    "is_torchscript",
    "parse_shapes",
    "torchscript_to_onnx",
]
