"""After folds are applied: what they orphaned goes, and the graph stays valid for its IR version.

Only what the folds themselves left unused is removed (the initializers, ``Constant`` nodes, value_info
and the pure-op subgraphs that computed a folded parameter): what was dead before bnfold ran is not its
business. IR < 4 requires every initializer to be a graph input: new ones are listed there too.
"""

from __future__ import annotations

from collections import Counter

import onnx

from bnfold.ir.evaluate import is_pure
from bnfold.ir.nodes import is_op, subgraphs, used_names

__all__ = ["list_initializers_as_inputs", "remove_orphans"]

_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Deterministic ops a fold may leave unread (the original of a clone whose other readers only took its
shape, as the dynamo exporter's ``Shape(conv_out)`` for a computed BN scale): removed like pure ops."""


def list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR < 4 requires every initializer to be a graph input too: list the folded tensors there."""
    listed = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    # main graph only: a Loop / Scan / If body's inputs are its signature, not a list of initializers


def remove_orphans(graph: onnx.GraphProto, candidates: set[str], drop_inputs: bool) -> None:
    """Drop initializers, value_info, Constant nodes and nodes of evaluable ops (the constant subgraphs
    that computed a folded parameter, ``bnfold.ir.evaluate.PURE_OPS``) that folds left unused. Only those:
    ``candidates`` starts as the tensors of the nodes folds replaced or removed and grows by the inputs
    of each node dropped here, so what was dead before bnfold ran is not its business."""
    for node in graph.node:
        for _, sub in subgraphs(node):
            remove_orphans(sub, candidates, drop_inputs)
    _remove_dead_nodes(graph, candidates)
    live = _reads(graph)
    inputs = {i.name for i in graph.input}
    dead_init = {
        t.name for t in graph.initializer
        if t.name in candidates and t.name not in live and (drop_inputs or t.name not in inputs)
    }
    if dead_init:  # deleted where they are: rebuilding the list would copy every tensor's bytes
        for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in dead_init]):
            del graph.initializer[i]
        if drop_inputs:
            keep_inputs = [i for i in graph.input if i.name not in dead_init]
            del graph.input[:]
            graph.input.extend(keep_inputs)
    defined = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    defined |= {t.name for t in graph.initializer}
    stale = [v for v in graph.value_info if v.name in candidates and v.name not in defined]
    if stale:
        keep_vi = [v for v in graph.value_info if not (v.name in candidates and v.name not in defined)]
        del graph.value_info[:]
        graph.value_info.extend(keep_vi)


def _remove_dead_nodes(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop Constant and evaluable-op nodes none of whose outputs is read, one of them a candidate,
    consumers before producers (so a whole dead chain goes in one sweep); ``candidates`` grows by the
    tensors of every node dropped."""
    readers: Counter[str] = Counter(o.name for o in graph.output)
    for node in graph.node:
        readers.update({n for n in node.input if n})
        for _, sub in subgraphs(node):
            readers.update(used_names(sub))
    dead: set[int] = set()
    changed = True
    while changed:  # one sweep suffices for a topologically sorted graph; more only for an unsorted one
        changed = False
        for idx in range(len(graph.node) - 1, -1, -1):
            node = graph.node[idx]
            outs = [o for o in node.output if o]
            if idx in dead or not outs or not (is_op(node, "Constant") or is_pure(node) or is_op(node, _LINEAR)):
                continue
            if any(readers[o] for o in outs):
                continue
            if not any(o in candidates for o in outs):
                continue
            dead.add(idx)
            changed = True
            ins = {n for n in node.input if n}
            readers.subtract(ins)
            candidates.update(ins)
            candidates.update(outs)
    if dead:
        keep = [n for i, n in enumerate(graph.node) if i not in dead]
        del graph.node[:]
        graph.node.extend(keep)


def _reads(graph: onnx.GraphProto) -> set[str]:
    reads = {o.name for o in graph.output}
    for node in graph.node:
        reads.update(n for n in node.input if n)
        for _, sub in subgraphs(node):
            reads |= used_names(sub)
    return reads
