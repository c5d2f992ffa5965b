"""Reading one ``NodeProto``: which default-domain op it is, and its attributes.

Kept apart from :mod:`bnfold.ir.view` because :mod:`bnfold.ir.evaluate`, which the graph view imports,
reads nodes too.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

import onnx

__all__ = ["attr", "is_op", "subgraphs", "used_names"]

_GRAPH_ATTR = onnx.AttributeProto.GRAPH
_GRAPHS_ATTR = onnx.AttributeProto.GRAPHS
_DEFAULT_DOMAINS = ("", "ai.onnx")


def is_op(node: onnx.NodeProto, op_type: str | Collection[str]) -> bool:
    """Whether ``node`` is the default-domain (``ai.onnx``) op ``op_type``, or one of several."""
    if node.domain not in _DEFAULT_DOMAINS:
        return False
    return node.op_type == op_type if isinstance(op_type, str) else node.op_type in op_type


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Attribute ``name`` of ``node`` as a Python value (``onnx.helper.get_attribute_value``), or
    ``default`` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``(attribute name, subgraph)`` for every graph-valued attribute of ``node`` (If, Loop, Scan, ...)."""
    for a in node.attribute:
        if a.type == _GRAPH_ATTR:
            yield a.name, a.g
        elif a.type == _GRAPHS_ATTR:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name ``graph`` reads that it does not define itself (its outer-scope references),
    looking through nested subgraphs. The graph's own outputs count as reads."""
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    defined |= {t.name for t in graph.sparse_initializer if t.values.name}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(n for n in node.input if n)
        for _, g in subgraphs(node):
            reads |= used_names(g)
        defined.update(n for n in node.output if n)
    reads.update(o.name for o in graph.output)
    return reads - defined
