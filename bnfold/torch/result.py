"""What a torch fold returns, whatever it folded (a TorchScript archive, a ``torch.export`` program, an
eager module): the records and counts the report renders, the check, and notes. Each kind adds what it
folded (``module``, ``program``, ``archive``) as keyword fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from bnfold.folding.result import FoldedPair, Skip

if TYPE_CHECKING:
    from bnfold.check import Comparison
    from bnfold.torch.inputs import TorchInputs

__all__ = ["TorchFold"]


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
