"""bnfold: fold BatchNormalization out of inference graphs, exactly, and prove it.

    >>> import bnfold
    >>> result = bnfold.fold("model.onnx")
    >>> result.folded, result.skipped          # what was folded, what was left and why
    >>> bnfold.save(result.model, "out.onnx")  # atomic write
    >>> bnfold.verify("model.onnx", result.model)          # Comparison, truthy when it passes
    >>> bnfold.latency({"original": "model.onnx", "folded": result.model}).gate(1.02)

The public names are imported on first use (``import bnfold`` itself loads neither onnx nor onnxruntime
nor torch), from the stage that owns each: :mod:`bnfold.io`, :mod:`bnfold.folding`, :mod:`bnfold.check`,
:mod:`bnfold.timing`, :mod:`bnfold.torch`, composed by :mod:`bnfold.pipeline`. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnfold._version import __version__
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
    from bnfold.check import Comparison, VerifyOptions, verify
    from bnfold.folding import FoldedPair, FoldOptions, FoldResult, FoldSummary, Skip
    from bnfold.io.load import load_model as load
    from bnfold.io.save import save_model as save
    from bnfold.pipeline import FoldRun, fold, fold_file
    from bnfold.timing import GateResult, LatencyOptions, LatencyReport, latency
    from bnfold.torch import (
        ModuleFoldResult,
        ProgramFoldResult,
        TorchExportResult,
        TorchFoldResult,
        fold_exported_program,
        fold_module,
        fold_module_result,
        fold_torch,
        fold_torchscript,
        is_exported_program,
        is_torchscript,
        torchscript_to_onnx,
    )

_LAZY: dict[str, tuple[str, str]] = {
    "Comparison": ("bnfold.check", "Comparison"),
    "VerifyOptions": ("bnfold.check", "VerifyOptions"),
    "verify": ("bnfold.check", "verify"),
    "FoldOptions": ("bnfold.folding", "FoldOptions"),
    "FoldResult": ("bnfold.folding", "FoldResult"),
    "FoldSummary": ("bnfold.folding", "FoldSummary"),
    "FoldedPair": ("bnfold.folding", "FoldedPair"),
    "Skip": ("bnfold.folding", "Skip"),
    "load": ("bnfold.io.load", "load_model"),
    "save": ("bnfold.io.save", "save_model"),
    "FoldRun": ("bnfold.pipeline", "FoldRun"),
    "fold": ("bnfold.pipeline", "fold"),
    "fold_file": ("bnfold.pipeline", "fold_file"),
    "GateResult": ("bnfold.timing", "GateResult"),
    "LatencyOptions": ("bnfold.timing", "LatencyOptions"),
    "LatencyReport": ("bnfold.timing", "LatencyReport"),
    "latency": ("bnfold.timing", "latency"),
    "ModuleFoldResult": ("bnfold.torch", "ModuleFoldResult"),
    "ProgramFoldResult": ("bnfold.torch", "ProgramFoldResult"),
    "fold_exported_program": ("bnfold.torch", "fold_exported_program"),
    "fold_module": ("bnfold.torch", "fold_module"),
    "fold_module_result": ("bnfold.torch", "fold_module_result"),
    "is_exported_program": ("bnfold.torch", "is_exported_program"),
    "TorchExportResult": ("bnfold.torch", "TorchExportResult"),
    "TorchFoldResult": ("bnfold.torch", "TorchFoldResult"),
    "fold_torch": ("bnfold.torch", "fold_torch"),
    "fold_torchscript": ("bnfold.torch", "fold_torchscript"),
    "is_torchscript": ("bnfold.torch", "is_torchscript"),
    "torchscript_to_onnx": ("bnfold.torch", "torchscript_to_onnx"),
}
"""Public name -> (module, attribute). No public name is also the name of a subpackage (``fold`` lives in
``pipeline``, the fold stage is ``folding``; ``latency`` in ``timing``; ``verify`` in ``check``), so
importing a stage never replaces a function here."""


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BadInputError",
    "BnfoldError",
    "Comparison",
    "ExitCode",
    "FoldOptions",
    "FoldResult",
    "FoldRun",
    "FoldSummary",
    "FoldedPair",
    "GateFailedError",
    "GateResult",
    "LatencyOptions",
    "LatencyReport",
    "MissingDependencyError",
    "ModuleFoldResult",
    "OutputError",
    "ProgramFoldResult",
    "Skip",
    "TorchExportResult",
    "TorchFoldResult",
    "VerificationFailedError",
    "VerifyOptions",
    "__version__",
    "fold",
    "fold_exported_program",
    "fold_file",
    "fold_module",
    "fold_module_result",
    "fold_torch",
    "fold_torchscript",
    "is_exported_program",
    "is_torchscript",
    "latency",
    "load",
    "save",
    "torchscript_to_onnx",
    "verify",
]
