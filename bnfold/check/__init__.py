"""The check stage: a folded model against its original, on onnxruntime, per provider and seed.

Enters: two models (paths, bytes or ModelProtos; the original and the folded one) and
:class:`VerifyOptions`. Leaves: a frozen :class:`Comparison` (per run and output the error figures and
the tolerance that would have passed; the first diverging fold when it failed). Nothing is written.

    >>> from bnfold.check import verify
    >>> result = verify("model.onnx", "model.folded.onnx", seeds=(0,))
    >>> bool(result), result.summary

``runtime`` (onnxruntime providers, models, sessions; shared with the timing stage), ``feeds``
(generated and supplied inputs, dynamic dims), ``compare`` (the metrics and the one tolerance table),
``result`` (the result types), ``localise`` (the fold that broke), ``widen`` (bfloat16 on CPU),
``render`` (rich tables), ``verify`` (the check itself), ``options``.
"""

from __future__ import annotations

from bnfold.check.compare import DEFAULT_TOLERANCES, OutputComparison, Tolerances, compare_arrays
from bnfold.check.feeds import (
    DEFAULT_BATCH,
    DEFAULT_DIM,
    DEFAULT_INT_RANGE,
    InputInfo,
    load_npz,
)
from bnfold.check.localise import fold_candidates, localise
from bnfold.check.options import DEFAULT_SEEDS, VerifyOptions, parse_range_option, parse_shape_option
from bnfold.check.render import render_comparison
from bnfold.check.result import Comparison, FoldCheck, Localisation, RunComparison
from bnfold.check.verify import verify
from bnfold.environment import Environment

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
    "VerifyOptions",
    "compare_arrays",
    "fold_candidates",
    "load_npz",
    "localise",
    "parse_range_option",
    "parse_shape_option",
    "render_comparison",
    "verify",
]
