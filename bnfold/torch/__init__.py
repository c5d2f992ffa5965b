"""The torch stage: TorchScript archives, torch.export programs and nn.Modules, folded with the same math.

Enters: a TorchScript archive or a ``torch.export`` program (``.pt2``; path or bytes, recognised by
content), or an ``nn.Module`` (with example inputs). Leaves: a folded, verified archive
(:class:`TorchFoldResult`, :class:`ProgramFoldResult`), a folded copy of a module
(:class:`ModuleFoldResult`), or an ONNX model exported with BatchNormalization kept and folded by the ONNX
stages (:class:`TorchExportResult`). Every folded value comes from :mod:`bnfold.folding.math`.

    >>> from bnfold.torch import fold_torchscript, fold_torch
    >>> r = fold_torchscript("model.pt", "model.folded.pt", shapes=[(1, 3, 224, 224)])
    >>> r.bn_before, r.bn_after, r.skipped, r.comparison.summary
    >>> e = fold_torch(model.eval(), torch.randn(1, 3, 224, 224), "model.onnx")   # folded, checked ONNX

torch is the optional ``bnfold[torch]`` extra: importing this package never imports it; a call that
needs it raises :class:`~bnfold.errors.MissingDependencyError` naming the extra.

* ``archive``   -- the torch import guard, archive sniffing, loading and saving
* ``jit_fold``  -- the BatchNorm fold as a pass over a frozen TorchScript graph (BN side, rewrite)
* ``producers`` -- Conv / ConvTranspose / Linear: which ONNX producer layout each is, for the fold math
* ``ir``        -- reading TorchScript graphs (blocks, constants, uses, names)
* ``inputs``    -- shapes, seeded example inputs, output flattening, rank probing
* ``compare``   -- per-output metrics of two runs
* ``fold``      -- ``fold_torchscript``: archive in, archive out, verified
* ``export``    -- ONNX export keeping BatchNormalization, ``fold_torch``
* ``dynamo_export`` -- the dynamo ONNX exporter with BatchNormalization kept, legacy fallback
* ``program_fold``  -- the BatchNorm fold as a pass over a ``torch.export`` program graph (decide)
* ``program_patterns`` -- program folds forward into Linear / unpadded conv, after ``cat``, through layout ops
* ``program_weights``  -- a program's weight normalization evaluated into a plain parameter
* ``program``   -- ``fold_exported_program``: ``.pt2`` in, ``.pt2`` out, verified (apply, save, check)
* ``module``    -- ``fold_module``: an eager ``nn.Module`` in, a folded copy out
* ``module_graph`` -- the module-call graph fold_module reads (torch.fx, or torch.export where fx fails)

``torch.export`` programs (``.pt2``): :func:`fold_exported_program`; eager modules: :func:`fold_module`.
"""

from __future__ import annotations

from bnfold.torch.archive import is_exported_program, is_torchscript
from bnfold.torch.export import (
    TorchExportResult,
    export_keep_bn,
    fold_torch,
    fold_torchscript_to_onnx,
    torchscript_to_onnx,
)
from bnfold.torch.fold import TorchFoldResult, count_batch_norms, fold_torchscript
from bnfold.torch.inputs import ShapesArg, parse_shapes
from bnfold.torch.module import ModuleFoldResult, fold_module, fold_module_result
from bnfold.torch.program import ProgramFoldResult, fold_exported_program, fold_exported_program_to_onnx

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
