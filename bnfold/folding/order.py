"""Put a graph's nodes in topological order, as onnx.checker requires and onnxruntime does not.

Some exporters write nodes out of order; onnxruntime sorts them itself and runs the model, onnx.checker
rejects it, and any pass that walks nodes in file order sees a consumer before its producer. The sort is
stable (Kahn's algorithm, always taking the earliest ready node in the original order), so a graph already
in order is left byte-identical, and nested subgraphs are sorted too. A name read by a subgraph counts as
an input of the node that owns the subgraph. A cycle, or a name that nothing produces, leaves the graph
as it was (the checker then says what is wrong).
"""

from __future__ import annotations

import heapq

import onnx

from bnfold.ir.nodes import subgraphs, used_names

__all__ = ["is_sorted", "sort_graph"]


def _reads(node: onnx.NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for _, g in subgraphs(node):
        names |= used_names(g)
    return names


def _order(graph: onnx.GraphProto) -> list[int] | None:
    """Node indexes in a stable topological order, None on a cycle."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps: list[set[int]] = []
    users: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        d = {producer[n] for n in _reads(node) if n in producer and producer[n] != i}
        deps.append(d)
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    return order if len(order) == len(graph.node) else None


def is_sorted(graph: onnx.GraphProto) -> bool:
    """True when every node comes after the producers of what it reads (nested subgraphs included)."""
    order = _order(graph)
    if order is None or order != list(range(len(graph.node))):
        return False
    return all(is_sorted(g) for n in graph.node for _, g in subgraphs(n))


def sort_graph(graph: onnx.GraphProto) -> int:
    """Sort ``graph`` (and its subgraphs) in place; returns how many graphs were reordered (0: none)."""
    changed = 0
    for node in graph.node:
        for _, g in subgraphs(node):
            changed += sort_graph(g)
    order = _order(graph)
    if order is None or order == list(range(len(graph.node))):
        return changed
    nodes = [graph.node[i] for i in order]
    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)
    return changed + 1
