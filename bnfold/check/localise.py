"""Find which fold broke a failing model.

A fold keeps the name of the tensor it rewrites: the BatchNormalization's output in the original is the
folded producer's output in the folded model. Both models get those tensors as extra main-graph outputs,
run on the same feeds and provider, and are compared in the folded graph's topological order; the first
fold whose output diverges is the one that broke (everything downstream of it diverges too).

Without a fold list (``bnfold verify A B`` on a model from another tool) the candidates are inferred:
tensors that a BatchNormalization produces in the original and a different op produces in the folded
model. Folds inside subgraphs (If/Loop bodies) cannot be exposed as graph outputs and are listed as not
checked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx

from bnfold.check.compare import Tolerances, compare_arrays
from bnfold.check.result import FoldCheck, Localisation
from bnfold.check.runner import RunError, check_session, run_session, with_extra_outputs
from bnfold.check.runtime import CPU, ModelHandle, ModelSource, SessionError, open_model
from bnfold.ir.view import GraphView

__all__ = ["FoldLike", "fold_candidates", "localise"]

logger = logging.getLogger(__name__)


class FoldLike(Protocol):
    """What localisation needs of a :class:`bnfold.folding.result.FoldedPair`."""

    @property
    def output(self) -> str: ...


FoldRef = str | FoldLike


def _describe(view: GraphView, index: int | None) -> str:
    return "graph input or initializer" if index is None else view.describe(index)


def fold_candidates(original: onnx.ModelProto, folded: onnx.ModelProto) -> list[str]:
    """Tensors a BatchNormalization writes in the original and another op writes in the folded model."""
    return _candidates(GraphView(original.graph), GraphView(folded.graph))


def _candidates(orig: GraphView, fold: GraphView) -> list[str]:
    def refolded(name: str, index: int) -> bool:
        node = orig.node(index)
        if node.op_type != "BatchNormalization" or name != node.output[0]:
            return False
        now = fold.producer_of(name)
        return now is not None and fold.node(now).op_type != "BatchNormalization"

    return sorted((n for n, i in orig.producer.items() if refolded(n, i)), key=fold.producer.__getitem__)


def localise(
    original: ModelSource,
    folded: ModelSource,
    fold_outputs: Sequence[FoldRef] | None,
    feeds: Mapping[str, np.ndarray],
    provider: str = CPU,
    *,
    tolerances: Tolerances | None = None,
    threads: int | None = None,
    seed: int | None = None,
) -> Localisation:
    """Compare every fold's output between the two models on ``feeds`` and ``provider``.

    ``fold_outputs``: tensor names or objects with ``.output`` (``FoldResult.folded``); ``.rule`` and
    ``.graph`` are used when present. None infers them (see :func:`fold_candidates`). Never raises for a
    model problem: a localisation that cannot run says why in ``error``.
    """
    tolerances = tolerances or Tolerances()
    orig = open_model(original, "original")
    fold = open_model(folded, "folded")
    try:
        return _localise(orig, fold, fold_outputs, feeds, provider, tolerances, threads, seed)
    finally:
        if orig is not original:
            orig.close()
        if fold is not folded:
            fold.close()


def _localise(
    orig: ModelHandle,
    fold: ModelHandle,
    fold_outputs: Sequence[FoldRef] | None,
    feeds: Mapping[str, np.ndarray],
    provider: str,
    tolerances: Tolerances,
    threads: int | None,
    seed: int | None,
) -> Localisation:
    v_orig, v_fold = GraphView(orig.proto.graph), GraphView(fold.proto.graph)
    refs: list[FoldRef] = list(fold_outputs) if fold_outputs is not None else list(_candidates(v_orig, v_fold))

    pending: list[tuple[int, str, str, str, str]] = []  # (order, name, rule, original_node, folded_node)
    skipped: list[FoldCheck] = []
    seen: set[str] = set()
    for ref in refs:
        name = ref if isinstance(ref, str) else ref.output
        rule = "" if isinstance(ref, str) else str(getattr(ref, "rule", "") or "")
        graph = "" if isinstance(ref, str) else str(getattr(ref, "graph", "") or "")
        if name in seen:
            continue
        seen.add(name)
        o_index, f_index = v_orig.producer_of(name), v_fold.producer_of(name)
        o_node, f_node = _describe(v_orig, o_index), _describe(v_fold, f_index)
        if graph:
            note = f"fold in subgraph {graph} cannot be exposed as a graph output"
        elif f_index is None or (o_index is None and name not in v_orig.graph_inputs):
            which = "folded" if f_index is None else "original"
            note = f"tensor {name!r} is not produced in the {which} model's main graph"
        else:
            pending.append((f_index, name, rule, o_node, f_node))
            continue
        skipped.append(FoldCheck(name, rule, o_node, f_node, None, note))
    pending.sort()
    names = [p[1] for p in pending]
    if not names:
        return Localisation(provider, seed, tuple(skipped), "" if skipped else "no fold outputs to compare")

    try:
        with with_extra_outputs(orig, names) as m_orig, with_extra_outputs(fold, names) as m_fold:
            ref_values = run_session(check_session(m_orig, provider, threads), feeds, names)
            got_values = run_session(check_session(m_fold, provider, threads), feeds, names)
    except (SessionError, RunError) as exc:
        logger.info("localisation failed: %s", exc)
        return Localisation(provider, seed, tuple(skipped), str(exc))

    checks = [
        FoldCheck(name, rule, o_node, f_node, compare_arrays(name, ref_values[name], got_values[name], tolerances))
        for _, name, rule, o_node, f_node in pending
    ]
    return Localisation(provider, seed, (*checks, *skipped))
