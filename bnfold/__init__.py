"""bnfold: fold BatchNormalization out of inference graphs, exactly, and prove it.

    >>> import bnfold
    >>> result = bnfold.fold("model.onnx")
    >>> result.folded, result.skipped          # what was folded, what was left and why
    >>> bnfold.save(result.model, "out.onnx")  # atomic write
    >>> bnfold.verify("model.onnx", result.model)          # Comparison, truthy when it passes
    >>> bnfold.latency({"original": "model.onnx", "folded": result.model}).gate(1.02)
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from bnfold.errors import (
    BadInputError,
    BnfoldError,
    ExitCode,
    GateFailedError,
    MissingDependencyError,
    OutputError,
    VerificationFailedError,
)

if TYPE_CHECKING:
    from bnfold.api import fold
    from bnfold.onnx_io import load_model as load
    from bnfold.onnx_io import save_model as save
    from bnfold.passes import FoldedPair, FoldResult, Skip
    from bnfold.pipeline import FoldRun, fold_file
    from bnfold.rules.base import FoldOptions
    from bnfold.timing import GateResult, LatencyReport, latency
    from bnfold.torchscript import (
        TorchExportResult,
        TorchFoldResult,
        fold_torch,
        fold_torchscript,
        is_torchscript,
        torchscript_to_onnx,
    )
    from bnfold.verify import Comparison, verify

# Public names imported on first use (PEP 562), so that ``import bnfold`` and ``bnfold --version`` load
# neither onnx, onnxruntime, numpy, rich nor torch: name -> (module, attribute).
_LAZY = {
    "fold": ("bnfold.api", "fold"),
    "load": ("bnfold.onnx_io", "load_model"),
    "save": ("bnfold.onnx_io", "save_model"),
    "FoldedPair": ("bnfold.passes", "FoldedPair"),
    "FoldResult": ("bnfold.passes", "FoldResult"),
    "Skip": ("bnfold.passes", "Skip"),
    "FoldRun": ("bnfold.pipeline", "FoldRun"),
    "fold_file": ("bnfold.pipeline", "fold_file"),
    "FoldOptions": ("bnfold.rules.base", "FoldOptions"),
    "GateResult": ("bnfold.timing", "GateResult"),
    "LatencyReport": ("bnfold.timing", "LatencyReport"),
    "latency": ("bnfold.timing", "latency"),
    "TorchExportResult": ("bnfold.torchscript", "TorchExportResult"),
    "TorchFoldResult": ("bnfold.torchscript", "TorchFoldResult"),
    "fold_torch": ("bnfold.torchscript", "fold_torch"),
    "fold_torchscript": ("bnfold.torchscript", "fold_torchscript"),
    "is_torchscript": ("bnfold.torchscript", "is_torchscript"),
    "torchscript_to_onnx": ("bnfold.torchscript", "torchscript_to_onnx"),
    "Comparison": ("bnfold.verify", "Comparison"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "verify"})


class _Package(types.ModuleType):
    """``bnfold.verify`` stays the function even after the subpackage ``bnfold.verify`` is imported (the
    import system then sets the package attribute to the subpackage; this setter ignores that)."""

    @property
    def verify(self) -> Any:
        from bnfold.verify.check import verify

        return verify

    @verify.setter
    def verify(self, value: Any) -> None:
        if not isinstance(value, types.ModuleType):
            raise AttributeError("bnfold.verify cannot be replaced")


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "BadInputError",
    "BnfoldError",
    "Comparison",
    "ExitCode",
    "FoldOptions",
    "FoldResult",
    "FoldRun",
    "FoldedPair",
    "GateFailedError",
    "GateResult",
    "LatencyReport",
    "MissingDependencyError",
    "OutputError",
    "Skip",
    "TorchExportResult",
    "TorchFoldResult",
    "VerificationFailedError",
    "__version__",
    "fold",
    "fold_file",
    "fold_torch",
    "fold_torchscript",
    "is_torchscript",
    "latency",
    "load",
    "save",
    "torchscript_to_onnx",
    "verify",
]
