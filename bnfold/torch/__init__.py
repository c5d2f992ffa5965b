"""The torch stage: TorchScript archives and ``nn.Module`` export pipelines, folded with the same math.

Enters: a TorchScript archive (path or bytes, recognised by content) or an ``nn.Module`` with example
inputs. Leaves: a folded, verified TorchScript archive (:class:`TorchFoldResult`), or an ONNX model
exported with BatchNormalization kept and folded by the ONNX stages (:class:`TorchExportResult`).

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
"""

from __future__ import annotations

from bnfold.torch.archive import is_torchscript
from bnfold.torch.export import (
    TorchExportResult,
    export_keep_bn,
    fold_torch,
    fold_torchscript_to_onnx,
    torchscript_to_onnx,
)
from bnfold.torch.fold import TorchFoldResult, count_batch_norms, fold_torchscript
from bnfold.torch.inputs import ShapesArg, parse_shapes

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
