"""What a run of the command did, as a frozen value: :class:`FoldRun` (``bnfold MODEL -o OUT``) and
:class:`LatencyRun` (``bnfold latency A B``), each with its exit code and its JSON report.

Built by :mod:`bnfold.pipeline`; read by the CLI and by anyone gating on a run. Nothing here refers to a
file that may be gone: the fold is its account (:class:`~bnfold.folding.FoldSummary`), the model is OUT.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold._version import __version__
from bnfold.errors import ExitCode
from bnfold.folding.result import FoldSummary

if TYPE_CHECKING:
    from bnfold.check import Comparison
    from bnfold.check.per_fold import PerFoldResult
    from bnfold.timing import GateResult, LatencyReport
    from bnfold.torch import ProgramFoldResult, TorchExportResult, TorchFoldResult

__all__ = ["TORCH_SUFFIXES", "FoldRun", "LatencyRun", "ProgressCallback", "ShapesArg", "tell"]

TORCH_SUFFIXES = frozenset({".pt", ".pth", ".ts", ".torchscript", ".jit"})
"""Output suffixes that ask for a TorchScript archive (any other: ONNX)."""

ProgressCallback = Callable[[str, int, "int | None"], None]
"""``progress(stage, done, total)``: ``"fold"``, ``"verify"``, then ``"latency: <what>"`` with counts
(``total`` None: unknown)."""

ShapesArg = Mapping[str, "Sequence[int] | int"] | Sequence[Sequence[int]] | None
"""By name: an input (or a TorchScript forward() argument) -> shape, or an ONNX symbolic dim -> value; the
name ``""`` is an ONNX model's only input. In order: one shape per TorchScript forward() input (ONNX:
exactly one, for its only input)."""


def tell(progress: ProgressCallback | None, stage: str, done: int = 0, total: int | None = None) -> None:
    """Report ``stage`` to the caller's ``progress`` callback, if any."""
    if progress is not None:
        progress(stage, done, total)


@dataclass(frozen=True)
class FoldRun:
    """What :func:`fold_file` did: the fold, the check, the write, the timing, and the exit code."""

    input_path: Path
    input_format: str
    """``"onnx"``, ``"torchscript"`` or ``"exported_program"``."""
    output_path: Path | None
    """Where the model goes (None: a dry run)."""
    fold: FoldSummary | TorchFoldResult | ProgramFoldResult
    """What was folded and what was left, with reasons: the ONNX fold's account (also for TorchScript
    exported to ONNX; the model itself is the file written, or :func:`fold` for one in memory), or the
    TorchScript fold."""
    written: bool
    input_bytes: int | None
    """The input file and every external data file it references."""
    output_bytes: int | None
    """What was (or would have been) written."""
    dry_run: bool = False
    comparison: Comparison | None = None
    latency: LatencyReport | None = None
    gate: GateResult | None = None
    exit_code: ExitCode = ExitCode.OK
    """0, 4 (check failed: nothing written unless forced) or 5 (latency gate failed)."""
    torch: TorchFoldResult | TorchExportResult | ProgramFoldResult | None = field(default=None, repr=False)
    """TorchScript input: what :mod:`bnfold.torch` returned (module, archive, exported model)."""
    per_fold: PerFoldResult | None = None
    """Each fold checked alone, where the whole model could not run on any synthesised input."""
    whole_model_error: str = ""
    """Why the whole model could not be checked (then ``per_fold`` is what checked the folds)."""

    @property
    def verification_failed(self) -> bool:
        return self.exit_code in (ExitCode.VERIFY_FAILED, ExitCode.UNVERIFIED)

    @property
    def check_message(self) -> str:
        """One line: how the folds were checked (or why not); empty when nothing was checked."""
        if self.comparison is not None:
            return self.comparison.summary
        if self.per_fold is not None:
            text = f"the whole model was not checked ({self.whole_model_error}); {self.per_fold.summary}"
            if self.exit_code == ExitCode.UNVERIFIED:
                text += "; folds no check covered are not written silently"
            return text
        return ""

    def fold_checks(self) -> list[dict[str, str]]:
        """Per fold, how it was verified: ``whole model``, ``per fold``, ``both`` or ``none``."""
        whole = self.comparison is not None and self.comparison.passed
        alone = self.per_fold or (self.comparison.per_fold if self.comparison is not None else None)
        verdicts = {v.output: v for v in alone.verdicts} if alone is not None else {}
        out = []
        for pair in getattr(self.fold, "folded", ()):
            v = verdicts.get(pair.output)
            by_fold = v is not None and bool(v.passed)
            how = "both" if whole and by_fold else "whole model" if whole else "per fold" if by_fold else "none"
            out.append({"output": pair.output, "verified_by": how, "note": "" if v is None else v.note})
        return out

    def to_report(self) -> dict[str, Any]:
        """The ``bnfold.report/1`` JSON object (see :mod:`bnfold.report`)."""
        from bnfold.report import fold_report

        report = fold_report(
            self.fold,
            input_path=str(self.input_path),
            output_path=None if self.output_path is None else str(self.output_path),
            written=self.written,
            input_bytes=self.input_bytes,
            output_bytes=self.output_bytes,
            input_format=self.input_format,
        )
        report["dry_run"] = self.dry_run
        exporter = getattr(self.torch, "exporter", None)
        if exporter is not None:  # torch input exported to ONNX: which exporter, and why not dynamo
            report["export"] = {"exporter": exporter, "note": getattr(self.torch, "exporter_note", None)}
        report["notes"] = list(getattr(self.fold, "notes", ()))
        if self.comparison is not None:
            report["verification"] = self.comparison.to_dict()
        if self.per_fold is not None:
            report["per_fold"] = self.per_fold.to_dict()
            report["whole_model_error"] = self.whole_model_error
        if self.comparison is not None or self.per_fold is not None:
            report["fold_checks"] = self.fold_checks()
        if self.latency is not None:
            report["latency"] = _latency_json(self.latency, self.gate)
        report["exit_code"] = int(self.exit_code)
        return report


@dataclass(frozen=True)
class LatencyRun:
    """What :func:`time_files` measured, and the gate's verdict."""

    latency: LatencyReport
    gate: GateResult | None = None

    @property
    def exit_code(self) -> ExitCode:
        return self.gate.exit_code if self.gate is not None else ExitCode.OK

    def to_report(self) -> dict[str, Any]:
        """The ``bnfold.latency-report/1`` JSON object."""

        return {"schema": "bnfold.latency-report/1", "bnfold_version": __version__,
                "latency": _latency_json(self.latency, self.gate), "exit_code": int(self.exit_code)}


def _latency_json(report: LatencyReport, gate: GateResult | None) -> dict[str, Any]:
    data = report.to_dict()
    data["gate"] = gate.to_dict() if gate is not None else None
    return data
