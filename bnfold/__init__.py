"""bnfold: fold BatchNormalization out of inference graphs, exactly, and prove it.

    >>> import bnfold
    >>> result = bnfold.fold("model.onnx")
    >>> result.folded, result.skipped          # what was folded, what was left and why
    >>> bnfold.save(result.model, "out.onnx")  # atomic write
    >>> bnfold.verify("model.onnx", result.model)          # Comparison, truthy when it passes
    >>> bnfold.latency({"original": "model.onnx", "folded": result.model}).gate(1.02)
"""

from __future__ import annotations

from bnfold.api import fold
from bnfold.errors import (
    BadInputError,
    BnfoldError,
    ExitCode,
    GateFailedError,
    MissingDependencyError,
    OutputError,
    VerificationFailedError,
)
from bnfold.onnx_io import load_model as load
from bnfold.onnx_io import save_model as save
from bnfold.passes import FoldedPair, FoldResult, Skip
from bnfold.pipeline import FoldRun, fold_file
from bnfold.rules.base import FoldOptions
from bnfold.timing import GateResult, LatencyReport, latency
from bnfold.torchscript import (  # torch itself is imported only when these are called
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
from bnfold.verify import Comparison, verify  # bnfold.verify is the function; see bnfold/verify/__init__.py

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
    "ModuleFoldResult",
    "OutputError",
    "ProgramFoldResult",
    "Skip",
    "TorchExportResult",
    "TorchFoldResult",
    "VerificationFailedError",
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
