"""The fold stage: every exact fold of a normalization into a linear op, and the arithmetic of each.

Enters: an ``onnx.ModelProto`` (any size: tensors may be read on demand) and :class:`FoldOptions`.
Leaves: a frozen :class:`FoldResult`: the folded model, each fold made (:class:`FoldedPair`) and each
normalization left with its reason (:class:`Skip`).

``math`` holds every formula (pure numpy, float64, rounded once); ``producers`` says, once per linear
op, where its output channels are; ``rules/`` has one file per rule, each opening with its spec
(Before / After / Conditions / Formula), matching read-only; ``passes`` matches, resolves overlaps,
applies, and repeats to a fixed point; ``options`` and ``result`` are the types in and out.
The function is ``bnfold.fold`` (in :mod:`bnfold.pipeline`, which loads the model first); this package
is named apart from it so that neither shadows the other.
"""

from __future__ import annotations

from bnfold.folding.options import FoldOptions
from bnfold.folding.result import FoldedPair, FoldResult, FoldSummary, Skip

__all__ = ["FoldOptions", "FoldResult", "FoldSummary", "FoldedPair", "Skip"]
