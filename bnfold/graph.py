"""A read-only index over one ``GraphProto``: who produces and who consumes each tensor, which tensors
are constants, which are graph inputs and outputs.

Nodes are identified by their index in ``graph.node`` within one view, and across views by their
output tensor names (node names may be empty or duplicated). A view never changes the graph; build a
new one after every edit.

Constants stored as external data (a model opened with ``bnfold.onnx_io.load_lazily``, or one with
external data files) are read on demand through the view's ``data`` reader, one tensor at a time; only
small values are cached, so a view over a model bigger than memory stays small.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["ConstantLookup", "GraphView", "TensorReader", "subgraphs", "used_names"]

log = logging.getLogger(__name__)

_GRAPH_ATTR = onnx.AttributeProto.GRAPH
_GRAPHS_ATTR = onnx.AttributeProto.GRAPHS
_CACHE_MAX_BYTES = 1 << 16
"""Constant values up to this size are cached per view (statistics, biases); larger ones (weights) are
decoded on each lookup, so that a round of folds does not keep every weight it read alive."""


class TensorReader(Protocol):
    """Reads a tensor stored as external data (see ``bnfold.tensor_store.TensorStore``)."""

    def read(self, tensor: onnx.TensorProto) -> np.ndarray: ...


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``(attribute name, subgraph)`` for every graph-valued attribute of ``node`` (If, Loop, Scan, ...)."""
    for attr in node.attribute:
        if attr.type == _GRAPH_ATTR:
            yield attr.name, attr.g
        elif attr.type == _GRAPHS_ATTR:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


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


@dataclass(frozen=True)
class ConstantLookup:
    """A constant tensor's value, or why it is not a constant.

    ``value`` is set when the tensor is a constant; otherwise ``why_not`` is a phrase such as
    ``"is a graph input"`` to complete the sentence "tensor 'W' ...".
    """

    value: np.ndarray | None
    why_not: str = ""
    origin: str = ""  # "initializer", "Constant node", "outer-scope initializer", ...


class GraphView:
    """Read-only index of one graph (and, through ``parent``, its enclosing graphs)."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        *,
        parent: GraphView | None = None,
        path: str = "",
        initializers_as_constants: bool = False,
        data: TensorReader | None = None,
    ) -> None:
        self.graph = graph
        self.parent = parent
        self.path = path
        self.initializers_as_constants = initializers_as_constants
        self.data = data if data is not None or parent is None else parent.data
        """Reads constants stored as external data; None when the model's tensors are all in memory."""
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_inputs: set[str] = {i.name for i in graph.input}
        self.graph_outputs: set[str] = {o.name for o in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for idx, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    self.producer[name] = idx
            reads = {n for n in node.input if n}
            for _, g in subgraphs(node):
                reads |= used_names(g)
            for name in sorted(reads):
                self.consumers.setdefault(name, []).append(idx)
        self._cache: dict[str, ConstantLookup] = {}

    # -- structure -------------------------------------------------------------------------------
    def node(self, idx: int) -> onnx.NodeProto:
        return self.graph.node[idx]

    def producer_of(self, name: str) -> int | None:
        return self.producer.get(name)

    def consumers_of(self, name: str) -> list[int]:
        return self.consumers.get(name, [])

    def is_graph_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def describe(self, idx: int) -> str:
        """``Conv 'conv1'`` or ``Conv (output 'x')`` when the node has no name: for messages."""
        node = self.graph.node[idx]
        if node.name:
            return f"{node.op_type} '{node.name}'"
        return f"{node.op_type} (output '{node.output[0] if node.output else '?'}')"

    # -- constants -------------------------------------------------------------------------------
    def constant(self, name: str) -> ConstantLookup:
        """The value of tensor ``name`` if it is a constant (initializer, ``Constant`` node, or a
        constant of an enclosing graph); otherwise why it is not."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        found = self._lookup(name)
        if found.value is None or found.value.nbytes <= _CACHE_MAX_BYTES:
            self._cache[name] = found
        return found

    def constant_dtype(self, name: str) -> int | None:
        """ONNX element type of a constant tensor without decoding its data (None if unknown)."""
        if name in self.initializers:
            return self.initializers[name].data_type
        idx = self.producer.get(name)
        if idx is not None and self.graph.node[idx].op_type == "Constant":
            tensor = _constant_node_tensor(self.graph.node[idx])
            return tensor.data_type if tensor is not None else None
        if self.parent is not None and name not in self.graph_inputs and idx is None:
            return self.parent.constant_dtype(name)
        return None

    def _lookup(self, name: str) -> ConstantLookup:
        if name in self.initializers:
            if name in self.graph_inputs and not self.initializers_as_constants:
                return ConstantLookup(
                    None,
                    "is an initializer that is also listed as a graph input, so a caller may override it "
                    "(IR < 4 style); pass --initializers-as-constants to treat it as a constant",
                )
            return self._decode(self.initializers[name], "initializer")
        if name in self.graph_inputs:
            return ConstantLookup(None, "is a graph input, not a constant")
        idx = self.producer.get(name)
        if idx is not None:
            node = self.graph.node[idx]
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input:
                # exporters route shared or deduplicated parameters through Identity nodes
                inner = self.constant(node.input[0])
                if inner.value is not None:
                    return ConstantLookup(inner.value, origin=f"Identity of {inner.origin}")
                return inner
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                tensor = _constant_node_tensor(node)
                if tensor is not None:
                    return self._decode(tensor, "Constant node")
                return ConstantLookup(None, "is a Constant node of a kind bnfold does not read")
            return ConstantLookup(None, f"is computed at run time by {self.describe(idx)}")
        if self.parent is not None:
            outer = self.parent.constant(name)
            if outer.value is not None:
                return ConstantLookup(outer.value, origin=f"outer-scope {outer.origin}")
            return outer
        return ConstantLookup(None, "is not defined in the graph")

    def _decode(self, tensor: onnx.TensorProto, origin: str) -> ConstantLookup:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if self.data is None:
                return ConstantLookup(
                    None, "is stored as external data that was not loaded (fold the model from its path, or "
                    "load it with its external data)"
                )
            return ConstantLookup(self.data.read(tensor), origin=origin)
        return ConstantLookup(_to_array(tensor), origin=origin)


def _constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None


def _to_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)
