"""const_weights: a weight or bias computed from constants at run time becomes a plain initializer.

Before:   ``n = ReduceL2(v, axes); d = Div(v, n); W = Mul(g, d)``; ``t = Conv(X, W, B?)``  (weight
          normalization as torch's legacy and dynamo exporters write it for
          ``torch.nn.utils.parametrizations.weight_norm`` and ``torch.nn.utils.weight_norm``; any
          subgraph of ``const_eval.PURE_OPS`` over constants that does arithmetic)
After:    ``W`` is an initializer (same name, the evaluated value); ``t = Conv(X, W, B?)`` unchanged; the
          subgraph that computed it is removed once nothing else reads it
Conditions:
  - ``W`` is input 1 or 2 of a Conv, ConvTranspose or Gemm, or input 0 or 1 of a MatMul (default domain);
  - it is written by an op of ``const_eval.PURE_OPS`` and every value it depends on is a constant
    (initializers, ``Constant`` nodes, shapes fixed before run time): deterministic ops only, never a
    random op, each result within ``const_eval.MAX_RESULT_BYTES``;
  - the subgraph does arithmetic (a reduction, ``Mul``, ``Div``, ``Sqrt``, ``Pow``, ...): pure data
    movement (the dynamo exporter's zero-bias ``Expand``, a ``Reshape``) is left as written, since it
    costs nothing and every rule already reads it as the constant it is;
  - ``W`` is not a graph output.
  Also, unreported: a ``Shape`` / ``Size`` reading the input of an inference BatchNormalization (or a
  tensor it is reached through by layout ops) whose value the graph fixes becomes an initializer, so it
  no longer keeps the producer alive beside a folded clone (the dynamo exporter's InstanceNorm).
  Applied once per graph before any normalization is matched, so the rules read a plain weight.
  Reported as one fold per tensor (rule ``const_weights``, ``norm_op`` "weight normalization" when the
  subgraph computes a norm, else "constant subgraph"), under the consumer's output tensor, which both
  models compute.
Formula:  the value is what onnx's reference evaluator computes for each node in the model's dtype
          (the same ops, in the same order, as the runtime): nothing is re-derived.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.folding.result import FoldedPair
from bnfold.folding.rules.base import Fold, FoldContext, Norm, Skip
from bnfold.ir import evaluate as const_eval
from bnfold.ir.nodes import is_op
from bnfold.ir.view import GraphView

__all__ = ["NAME", "ComputedWeight", "find", "match", "materialize", "shape_reads"]

NAME = "const_weights"

_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
}
_ARITHMETIC = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Sum", "Mean", "Max", "Min",
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "Clip", "Where",
})
_NORMS = frozenset({"ReduceL1", "ReduceL2", "ReduceSumSquare"})
_MAX_WALK = 256


@dataclass(frozen=True)
class ComputedWeight:
    """A weight computed at run time from constants, decided before anything changes."""

    name: str
    node: int
    """The node writing ``name`` (removed; the subgraph above it goes when nothing else reads it)."""
    value: np.ndarray
    consumer: int
    kind: str
    """"weight normalization" or "constant subgraph"."""


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    """This rule folds no normalization: it runs before matching (:func:`materialize`)."""
    return None


def _subgraph_ops(view: GraphView, name: str) -> set[str]:
    """The op types of the evaluable nodes that ``name`` is computed by (bounded walk)."""
    seen: set[int] = set()
    stack = [name]
    found: set[str] = set()
    while stack and len(seen) < _MAX_WALK:
        idx = view.producer_of(stack.pop())
        if idx is None or idx in seen:
            continue
        node = view.node(idx)
        if not const_eval.is_pure(node):
            continue
        seen.add(idx)
        found.add(node.op_type)
        stack.extend(n for n in node.input if n)
    return found


def find(view: GraphView) -> list[ComputedWeight]:
    """Every weight of a linear op computed from constants by arithmetic, with its value (reads only)."""
    out: list[ComputedWeight] = []
    done: set[str] = set()
    for idx, node in enumerate(view.graph.node):
        positions = next((p for op, p in _WEIGHT_INPUTS.items() if is_op(node, op)), ())
        for pos in positions:
            if pos >= len(node.input) or not node.input[pos] or node.input[pos] in done:
                continue
            name = node.input[pos]
            producer = view.producer_of(name)
            if producer is None or view.is_graph_output(name):
                continue
            writer = view.node(producer)
            if not const_eval.is_pure(writer) or is_op(writer, "Identity") or len([o for o in writer.output if o]) != 1:
                continue
            ops = _subgraph_ops(view, name)
            if not ops & _ARITHMETIC:
                continue
            found = view.constant(name)
            if found.value is None:
                continue  # a rule that needs it says why
            done.add(name)
            kind = "weight normalization" if ops & _NORMS else "constant subgraph"
            out.append(ComputedWeight(name, producer, np.asarray(found.value), idx, kind))
    return out


def shape_reads(ctx: FoldContext) -> list[tuple[int, str, np.ndarray]]:
    """``(node, output, value)`` of every ``Shape`` / ``Size`` that reads a normalization's input (or the
    tensors it is reached through by layout ops) and whose value is fixed before run time: the dynamo
    exporter's ``Shape(conv_out)`` for an InstanceNorm's Reshape targets or a computed BN scale. Such a
    reader would keep the producer alive beside a folded clone of it; as a constant it reads nothing.
    Only for a BatchNormalization that is a fixed affine map (inference mode, constant statistics)."""
    from bnfold.folding.rules.batchnorm import bn_norm  # the BN source, read-only
    from bnfold.folding.rules.layout import walk_back  # layout builds on the rules' base, as this module does

    view = ctx.view
    out: list[tuple[int, str, np.ndarray]] = []
    seen: set[int] = set()
    for bn_idx, node in enumerate(view.graph.node):
        if not is_op(node, "BatchNormalization") or not node.input or not node.input[0]:
            continue
        try:
            if not isinstance(bn_norm(ctx, bn_idx), Norm):
                continue
        except (ArithmeticError, ValueError, IndexError, KeyError, TypeError):
            continue  # a malformed BatchNormalization: the pass refuses it with the reason
        names = {node.input[0]}
        found = walk_back(view, node.input[0])
        if found is not None:
            names |= {found[1], *(view.node(i).output[0] for i in found[0])}
        for name in names:
            for idx in view.consumers_of(name):
                reader = view.node(idx)
                if idx in seen or not (is_op(reader, "Shape") or is_op(reader, "Size")) or len(reader.output) != 1:
                    continue
                if view.is_graph_output(reader.output[0]):
                    continue
                value = view.constant(reader.output[0]).value
                if value is not None:
                    seen.add(idx)
                    out.append((idx, reader.output[0], np.asarray(value)))
    return out


def materialize(ctx: FoldContext, orphans: set[str]) -> list[FoldedPair]:
    """Replace every :func:`find` weight of ``view.graph`` by an initializer of the same name; the nodes
    that computed it are added to ``orphans`` for the pass's clean-up. Returns one record per tensor
    (:func:`shape_reads` become initializers too, unreported: they fold nothing by themselves)."""
    view = ctx.view
    found = find(view)
    shapes = shape_reads(ctx)
    if not found and not shapes:
        return []
    graph = view.graph
    records = []
    drop = {c.node for c in found} | {idx for idx, _, _ in shapes}
    for idx, _, _ in shapes:
        orphans.update(n for n in view.node(idx).input if n)
    for c in found:
        writer = view.node(c.node)
        orphans.update(n for n in writer.input if n)
        orphans.update(n for n in writer.output if n)
        consumer = view.node(c.consumer)
        records.append(FoldedPair(rule=NAME, producer_op=consumer.op_type,
                                  output=consumer.output[0] if consumer.output else c.name,
                                  norm_op=c.kind, graph=view.path))
    tensors = [numpy_helper.from_array(np.ascontiguousarray(c.value), c.name) for c in found]
    tensors += [numpy_helper.from_array(np.ascontiguousarray(v), name) for _, name, v in shapes]
    keep = [n for i, n in enumerate(graph.node) if i not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(tensors)
    _drop_value_info(graph, {c.name for c in found} | {name for _, name, _ in shapes})
    return records


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """An initializer needs no value_info entry; a stale one is harmless but noise."""
    keep = [vi for vi in graph.value_info if vi.name not in names]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
