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

from bnfold.runtime import CPU, ModelHandle, ModelSource, SessionError, open_model
from bnfold.verify.compare import FoldCheck, Localisation, Tolerances, compare_arrays
from bnfold.verify.runner import RunError, check_session, run_session, with_extra_outputs

__all__ = ["FoldLike", "fold_candidates", "localise"]

logger = logging.getLogger(__name__)


class FoldLike(Protocol):
    """What localisation needs of ``bnfold.passes.FoldedPair``."""

    @property
    def output(self) -> str: ...


FoldRef = str | FoldLike


def _producers(graph: onnx.GraphProto) -> dict[str, tuple[int, onnx.NodeProto]]:
    out: dict[str, tuple[int, onnx.NodeProto]] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                out[name] = (index, node)
    return out


def _describe(node: onnx.NodeProto | None) -> str:
    if node is None:
        return "graph input or initializer"
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} (unnamed)"


def fold_candidates(original: onnx.ModelProto, folded: onnx.ModelProto) -> list[str]:
    """Tensors a BatchNormalization writes in the original and another op writes in the folded model."""
    orig = _producers(original.graph)
    fold = _producers(folded.graph)
    names = [
        name
        for name, (_, node) in orig.items()
        if node.op_type == "BatchNormalization"
        and name == node.output[0]
        and name in fold
        and fold[name][1].op_type != "BatchNormalization"
    ]
    return sorted(names, key=lambda n: fold[n][0])


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
    orig_proto, fold_proto = orig.proto, fold.proto
    refs: list[FoldRef] = (
        list(fold_outputs) if fold_outputs is not None else list(fold_candidates(orig_proto, fold_proto))
    )
    p_orig = _producers(orig_proto.graph)
    p_fold = _producers(fold_proto.graph)
    graph_inputs = {vi.name for vi in orig_proto.graph.input}

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
        o_node = p_orig.get(name, (0, None))[1]
        f_index, f_node = p_fold.get(name, (-1, None))
        if graph:
            note = f"fold in subgraph {graph} cannot be exposed as a graph output"
        elif f_node is None or (o_node is None and name not in graph_inputs):
            which = "folded" if f_node is None else "original"
            note = f"tensor {name!r} is not produced in the {which} model's main graph"
        else:
            pending.append((f_index, name, rule, _describe(o_node), _describe(f_node)))
            continue
        skipped.append(FoldCheck(name, rule, _describe(o_node), _describe(f_node), None, note))
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
