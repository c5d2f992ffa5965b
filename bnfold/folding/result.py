"""What a fold returns: the record of each fold and each refusal, the counts, and the folded model.

Every type here is frozen. :class:`FoldSummary` is the account without the model (what a report, a
pipeline run and the torch stage share); :class:`FoldResult` adds the folded ``onnx.ModelProto``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

__all__ = ["FoldResult", "FoldSummary", "FoldedPair", "Skip"]


@dataclass(frozen=True)
class FoldedPair:
    """One normalization folded into its producer."""

    rule: str
    producer_op: str
    output: str
    """The tensor the folded producer now writes: the removed normalization's output name, present in
    both the original and the folded model (what verification compares to localise a bad fold)."""
    norm_op: str
    graph: str = ""


@dataclass(frozen=True)
class Skip:
    """A normalization left in the graph, and why."""

    output: str
    op_type: str
    reason: str
    graph: str = ""


@dataclass(frozen=True)
class FoldSummary:
    """An account of every normalization: folded, or left with a reason; node counts before and after."""

    folded: tuple[FoldedPair, ...] = ()
    skipped: tuple[Skip, ...] = ()
    nodes_before: int = 0
    nodes_after: int = 0
    notes: tuple[str, ...] = ()
    """Plain remarks on what was repaired or decided on the way (nodes sorted, a function inlined, ...)."""

    @property
    def changed(self) -> bool:
        return bool(self.folded)

    @property
    def bn_after(self) -> int:
        """BatchNormalizations left (each has one Skip)."""
        return sum(1 for s in self.skipped if s.op_type == "BatchNormalization")

    @property
    def bn_before(self) -> int:
        """BatchNormalizations in the input: those folded and those left."""
        return sum(1 for p in self.folded if p.norm_op == "BatchNormalization") + self.bn_after

    def summary(self) -> FoldSummary:
        """The account alone (no model): what outlives the files a fold worked on."""
        return FoldSummary(self.folded, self.skipped, self.nodes_before, self.nodes_after, self.notes)


@dataclass(frozen=True)
class FoldResult(FoldSummary):
    """The folded model and the account of its fold. ``model`` holds its tensors in memory, except where
    the caller chose otherwise (:func:`bnfold.folding.passes.fold_model` with ``keep``)."""

    model: onnx.ModelProto = field(kw_only=True)
