"""What a torch fold returns, whatever it folded (a TorchScript archive, a ``torch.export`` program, an
eager module): the records and counts the report renders, the check, and notes. Each kind adds what it
folded (``module``, ``program``, ``archive``) as keyword fields."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, TypeVar

from bnfold.errors import VerificationFailedError
from bnfold.folding.result import FoldedPair, Skip
from bnfold.io.save import atomic_write_bytes

if TYPE_CHECKING:
    from bnfold.check import Comparison
    from bnfold.torch.inputs import TorchInputs

__all__ = ["TorchFold", "write_checked"]


@dataclass
class TorchFold:
    """The account of a torch fold (what :func:`bnfold.report.fold_report` reads), and its check."""

    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    bn_before: int = 0
    bn_after: int = 0
    nodes_before: int = 0
    """Nodes of the graph folded (for each kind, the nodes that compute; constants not counted)."""
    nodes_after: int = 0
    comparison: Comparison | None = None
    inputs: TorchInputs | None = None
    """The example inputs the fold and its check ran on, where it ran any."""
    path: str | None = None
    """Where the result was written (None: not written)."""
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.folded)

    @property
    def passed(self) -> bool:
        """True unless verification ran and failed."""
        return self.comparison is None or self.comparison.passed

    def to_dict(self) -> dict[str, object]:
        return {
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "folded": [asdict(p) for p in self.folded],
            "skipped": [asdict(s) for s in self.skipped],
            "verification": None if self.comparison is None else self.comparison.to_dict(),
            "path": self.path,
            "notes": list(self.notes),
        }


R = TypeVar("R", bound=TorchFold)


def write_checked(result: R, archive: bytes, dst: str | os.PathLike[str] | None, force: bool) -> R:
    """Write ``archive`` (the folded result's bytes) to ``dst`` unless its check failed (then
    VerificationFailedError carrying ``result``, nothing written) or ``force``; ``result.path`` says where."""
    if result.comparison is not None and not result.comparison.passed and not force:
        raise VerificationFailedError(f"{result.comparison.summary}; nothing written", result)
    if dst is not None:
        atomic_write_bytes(dst, archive)
        result.path = os.fspath(dst)
    return result
