"""Numerical verification: a folded model against its original, on onnxruntime, per provider and seed.

    >>> from bnfold.verify import verify
    >>> result = verify("model.onnx", "model.folded.onnx")
    >>> bool(result), result.summary

See :mod:`bnfold.verify.feeds` for generated inputs and dynamic dims, :mod:`bnfold.verify.compare` for
the metrics and the tolerance table, :mod:`bnfold.verify.result` for the result types,
:mod:`bnfold.verify.localise` for finding the fold that broke.

``bnfold.verify`` (the attribute of the ``bnfold`` package) is the function, so import submodules with
``from bnfold.verify import compare`` or ``from bnfold.verify.result import Comparison``, not
``import bnfold.verify.compare as compare``.
"""

from __future__ import annotations

from bnfold.environment import Environment
from bnfold.verify.check import DEFAULT_SEEDS, verify
from bnfold.verify.compare import DEFAULT_TOLERANCES, OutputComparison, Tolerances, compare_arrays
from bnfold.verify.feeds import (
    DEFAULT_BATCH,
    DEFAULT_DIM,
    DEFAULT_INT_RANGE,
    InputInfo,
    load_npz,
    parse_range_option,
    parse_shape_option,
)
from bnfold.verify.localise import fold_candidates, localise
from bnfold.verify.render import render_comparison
from bnfold.verify.result import Comparison, FoldCheck, Localisation, RunComparison

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DIM",
    "DEFAULT_INT_RANGE",
    "DEFAULT_SEEDS",
    "DEFAULT_TOLERANCES",
    "Comparison",
    "Environment",
    "FoldCheck",
    "InputInfo",
    "Localisation",
    "OutputComparison",
    "RunComparison",
    "Tolerances",
    "compare_arrays",
    "fold_candidates",
    "load_npz",
    "localise",
    "parse_range_option",
    "parse_shape_option",
    "render_comparison",
    "verify",
]
