"""What a fold reports, whatever it folded: the records of one fold and one refusal, and the summary the
report renders. Shared by the ONNX pass (:class:`bnfold.passes.FoldResult`) and the TorchScript fold
(:class:`bnfold.torchscript.TorchFoldResult`); imports nothing of either."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FoldSummary", "FoldedPair", "Skip"]


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


class FoldSummary(Protocol):
    """What :func:`bnfold.report.fold_report` reads of a fold result."""

    @property
    def folded(self) -> Sequence[FoldedPair]: ...

    @property
    def skipped(self) -> Sequence[Skip]: ...

    @property
    def nodes_before(self) -> int: ...

    @property
    def nodes_after(self) -> int: ...

    @property
    def bn_before(self) -> int: ...

    @property
    def bn_after(self) -> int: ...
