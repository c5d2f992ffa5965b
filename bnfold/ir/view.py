"""A read-only index over one ``GraphProto``: who produces and who consumes each tensor, which tensors
are constants, which are graph inputs and outputs.

Nodes are identified by their index in ``graph.node`` within one view, and across views by their
output tensor names (node names may be empty or duplicated). A view never changes the graph; build a
new one after every edit.

Constants stored as external data (a model opened with ``bnfold.io.load.load_lazily``, or one with
external data files) are read on demand through the view's ``data`` reader, one tensor at a time; only
small values are cached, so a view over a model bigger than memory stays small.

A tensor computed from constants by a deterministic op (``Expand``, ``Shape``, ``Reshape``, ``Cast``, ...:
``bnfold.ir.evaluate.PURE_OPS``) is a constant too, evaluated on first lookup under the view's opset: the
dynamo exporter's zero bias ``Expand(CastLike(0, x), Shape(W)[:1])`` or a Reshape'd statistic reads as
the value it always has. Inputs read only for their type need no value: ``Shape`` / ``Size`` of a graph
input whose declared dimensions are all numbers (onnxruntime refuses a feed of any other shape; a
``dim_param`` is never trusted) or of an initializer, and ``CastLike``'s target element type. Lookups
walk the subgraph iteratively (no recursion limit) and cache per view like any other constant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import numpy as np
import onnx

from bnfold.io.dtypes import np_dtype
from bnfold.ir import evaluate
from bnfold.ir.declared import constant_node_tensor, declared_dims, to_array, type_source
from bnfold.ir.nodes import is_op, subgraphs, used_names

__all__ = ["ConstantLookup", "GraphView", "TensorReader"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CACHE_MAX_BYTES = 1 << 16
"""Constant values up to this size are cached per view (statistics, biases); larger ones (weights) are
decoded on each lookup, so that a round of folds does not keep every weight it read alive."""


class TensorReader(Protocol):
    """Reads a tensor stored as external data (see ``bnfold.io.store.TensorStore``)."""

    def read(self, tensor: onnx.TensorProto) -> np.ndarray: ...


@dataclass(frozen=True)
class ConstantLookup:
    """A constant tensor's value, or why it is not a constant.

    ``value`` is set when the tensor is a constant; otherwise ``why_not`` is a phrase such as
    ``"is a graph input"`` to complete the sentence "tensor 'W' ...".
    """

    value: np.ndarray | None
    why_not: str = ""
    origin: str = ""  # "initializer", "Constant node", "computed from constants by Expand 'e'", ...
    cause: str = ""
    """For a tensor computed at run time by a chain of evaluable ops: the first reason found down the
    chain (``"'x' is a graph input, not a constant"``), carried so that a message names the root cause."""


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
        opset: int | None = None,
    ) -> None:
        self.graph = graph
        self.parent = parent
        self.path = path
        self.initializers_as_constants = initializers_as_constants
        self.data: TensorReader | None = data if data is not None or parent is None else parent.data
        """Reads constants stored as external data; None when the model's tensors are all in memory."""
        self.opset: int = opset if opset is not None else (parent.opset if parent is not None else 0)
        """The default-domain opset computed constants are evaluated under; 0 (unknown): none are."""
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self._input_info: dict[str, onnx.ValueInfoProto] = {i.name: i for i in graph.input}
        self.graph_inputs: set[str] = set(self._input_info)
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
        self._declared: dict[str, int] | None = None
        self._memo: dict[str, object] = {}

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

    def memo(self, key: str, compute: Callable[[GraphView], T]) -> T:
        """``compute(self)``, computed on first use and kept with this view under ``key``: what is derived
        from the graph (the shapes of :mod:`bnfold.ir.shapes`) lives as long as the view, never longer."""
        if key not in self._memo:
            self._memo[key] = compute(self)
        return cast(T, self._memo[key])

    # -- constants -------------------------------------------------------------------------------
    def constant(self, name: str) -> ConstantLookup:
        """The value of tensor ``name`` if it is a constant (initializer, ``Constant`` node, a constant of
        an enclosing graph, or computed from constants by an op of ``evaluate.PURE_OPS``); otherwise
        why it is not."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        return self._resolve(name)

    def constant_dtype(self, name: str) -> int | None:
        """ONNX element type of a constant tensor without decoding its data (None if unknown)."""
        if name in self.initializers:
            return self.initializers[name].data_type
        idx = self.producer.get(name)
        if idx is not None and is_op(self.graph.node[idx], "Constant"):
            tensor = constant_node_tensor(self.graph.node[idx])
            return tensor.data_type if tensor is not None else None
        if self.parent is not None and name not in self.graph_inputs and idx is None:
            return self.parent.constant_dtype(name)
        return None

    def static_shape(self, name: str) -> tuple[int, ...] | str | None:
        """The shape of ``name`` when the graph fixes it without values: an initializer's or a
        ``Constant`` node's dims, or a graph input's declared dims when every one is a number (onnxruntime
        refuses a feed of another shape; main graph only). A phrase when it is a graph input whose shape
        is not fixed; None when nothing declares it (the caller may still compute the tensor's value)."""
        view: GraphView | None = self
        while view is not None:
            vi = view._input_info.get(name)
            if vi is not None:
                if view.parent is not None:  # onnxruntime checks the main graph's feeds, not If/Loop bodies'
                    return f"'{name}' is an input of a subgraph, set by the enclosing op at run time"
                return declared_dims(vi)
            if name in view.initializers:
                return tuple(int(d) for d in view.initializers[name].dims)
            idx = view.producer.get(name)
            if idx is not None:
                node = view.graph.node[idx]
                if is_op(node, "Constant"):
                    tensor = constant_node_tensor(node)
                    return tuple(int(d) for d in tensor.dims) if tensor is not None else None
                return None
            view = view.parent
        return None

    def element_type(self, name: str) -> int | None:
        """ONNX element type of tensor ``name`` without its value: from an initializer, a ``Constant``
        node, a declared graph input / output / value_info type (onnxruntime rejects a model whose
        declared types contradict its ops), or back through ops whose output has the type of an input
        (Relu, Conv, Add, Reshape...) or a fixed one (Shape, Cast...). None when unknown."""
        view = self
        for _ in range(len(self.graph.node) + 64):  # bounded: a malformed graph may have cycles
            if name in view.initializers:
                return view.initializers[name].data_type
            declared = view._declared_types().get(name)
            if declared is not None:
                return declared
            idx = view.producer.get(name)
            if idx is None:
                if name in view.graph_inputs or view.parent is None:
                    return None
                view = view.parent
                continue
            node = view.graph.node[idx]
            step = type_source(node, name)
            if isinstance(step, int) or step is None:
                return step
            name = step
        return None

    def _declared_types(self) -> dict[str, int]:
        if self._declared is None:
            self._declared = {
                vi.name: vi.type.tensor_type.elem_type
                for vi in [*self.graph.input, *self.graph.output, *self.graph.value_info]
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
            }
        return self._declared

    def _remember(self, name: str, found: ConstantLookup, local: dict[str, ConstantLookup]) -> None:
        local[name] = found
        if found.value is None or found.value.nbytes <= _CACHE_MAX_BYTES:
            self._cache[name] = found

    def _resolve(self, name: str) -> ConstantLookup:
        """Look ``name`` up, evaluating the evaluable ops it is computed by in dependency order: an
        explicit stack, so a long chain needs no deep recursion. Large intermediate values live only
        for this call."""
        local: dict[str, ConstantLookup] = {}

        def known(n: str) -> ConstantLookup | None:
            got = self._cache.get(n)
            return got if got is not None else local.get(n)

        stack, pending = [name], {name}
        while stack:
            n = stack[-1]
            if known(n) is not None:
                stack.pop()
                pending.discard(n)
                continue
            idx = self._evaluable_producer(n)
            if idx is None:
                self._remember(n, self._lookup(n), local)
                continue
            nxt = self._next_input(idx, known)
            if nxt is None or nxt in pending:  # all it needs is known (or a cycle): evaluate or refuse
                for out, found in self._evaluate(idx, known).items():
                    self._remember(out, found, local)
                continue
            stack.append(nxt)
            pending.add(nxt)
        result = known(name)
        assert result is not None
        return result

    def _evaluable_producer(self, name: str) -> int | None:
        if name in self.initializers or name in self.graph_inputs:
            return None
        idx = self.producer.get(name)
        return idx if idx is not None and evaluate.is_pure(self.graph.node[idx]) else None

    def _next_input(self, idx: int, known: Callable[[str], ConstantLookup | None]) -> str | None:
        """The first input of node ``idx`` whose value is needed and not looked up yet; None when there
        is none, or when one already looked up is not a constant (the node is then not one either)."""
        node = self.graph.node[idx]
        if node.op_type != "Identity" and not self.opset:
            return None
        for i, name in enumerate(node.input):
            if not name or self._type_only(node, i, name) is not None:
                continue
            found = known(name)
            if found is None:
                return name
            if found.value is None:
                return None
        return None

    def _type_only(self, node: onnx.NodeProto, i: int, name: str) -> np.ndarray | str | None:
        """For an input read only for its shape or element type: a placeholder carrying it, or a phrase
        when it is provably not fixed; None when its value is needed (or must stand in for the type)."""
        need = evaluate.TYPE_ONLY.get((node.op_type, i))
        if need == "shape":
            shape = self.static_shape(name)
            if shape is None and any(a.name in ("start", "end") for a in node.attribute):
                from bnfold.ir.shapes import sliced_shape  # shapes build on this view: imported when used

                shape = sliced_shape(self, node, name)
            if shape is None or isinstance(shape, str):
                return shape
            if any(d < 0 for d in shape):
                return f"the declared shape {list(shape)} of '{name}' is invalid"
            elem = self.element_type(name)
            dtype = np_dtype(elem) if elem is not None else None
            try:
                return evaluate.placeholder(shape, dtype if dtype is not None else np.dtype(np.float32))
            except ValueError:  # more elements than numpy can index
                return f"the declared shape {list(shape)} of '{name}' is too large"
        if need == "dtype":
            elem = self.element_type(name)
            dtype = np_dtype(elem) if elem is not None else None
            return evaluate.placeholder(None, dtype) if dtype is not None else None
        return None

    def _evaluate(self, idx: int, known: Callable[[str], ConstantLookup | None]) -> dict[str, ConstantLookup]:
        """Every output of the evaluable node ``idx``: its value, or why it is computed at run time."""
        node = self.graph.node[idx]
        desc = self.describe(idx)
        outs = [o for o in node.output if o]

        def fail(cause: str) -> dict[str, ConstantLookup]:
            return {o: ConstantLookup(None, f"is computed at run time by {desc} ({cause})", cause=cause)
                    for o in outs}

        if node.op_type == "Identity":  # exporters route shared or deduplicated parameters through it
            inner = known(node.input[0]) if node.input and node.input[0] else None
            if inner is None:
                return fail("its input is missing or depends on its own output")
            if inner.value is None:
                return {o: inner for o in outs}
            return {o: ConstantLookup(inner.value, origin=f"Identity of {inner.origin}") for o in outs}
        if not self.opset:
            return fail("the model's opset is unknown, so bnfold does not evaluate it")
        inputs: list[np.ndarray | None] = []
        for i, name in enumerate(node.input):
            if not name:
                inputs.append(None)
                continue
            typed = self._type_only(node, i, name)
            if isinstance(typed, str):
                return fail(typed)
            if typed is not None:
                inputs.append(typed)
                continue
            found = known(name)
            need = evaluate.TYPE_ONLY.get((node.op_type, i))
            if found is None:
                return fail(f"its input '{name}' depends on its own output")
            if found.value is None:
                if need == "dtype":
                    return fail(f"the element type of '{name}' is not declared in the graph")
                if need == "shape":
                    return fail(f"the shape of '{name}' is not known before run time: it {found.why_not}")
                return fail(found.cause or f"it depends on '{name}', which {found.why_not}")
            value = found.value
            if need is not None:
                value = evaluate.placeholder(value.shape if need == "shape" else None, value.dtype)
            inputs.append(value)
        try:
            values = evaluate.evaluate(node, inputs, self.opset)
        except evaluate.EvaluationError as exc:
            log.debug("not evaluated: %s: %s", desc, exc)
            return fail(str(exc))
        origin = f"computed from constants by {desc}"
        return {o: ConstantLookup(v, origin=origin) for o, v in zip(node.output, values, strict=False) if o}

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
            if is_op(node, "Constant"):
                tensor = constant_node_tensor(node)
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
        return ConstantLookup(to_array(tensor), origin=origin)
