"""Fresh tensor names for a model: new names never collide with any name the model already uses."""

from __future__ import annotations

import onnx

from bnfold.ir.nodes import subgraphs

__all__ = ["NameAllocator"]


class NameAllocator:
    """Fresh tensor names that collide with nothing in the model (any graph, any kind of name)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._used: set[str] = set()
        # the model's default-domain opset travels with the allocator into every FoldContext
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._collect(model.graph)
        for f in model.functions:
            self._used.update(f.input)
            self._used.update(f.output)
            for node in f.node:
                self._used.update(node.output)

    def _collect(self, graph: onnx.GraphProto) -> None:
        used = self._used
        used.update(t.name for t in graph.initializer)
        used.update(t.values.name for t in graph.sparse_initializer)
        used.update(v.name for v in graph.input)
        used.update(v.name for v in graph.output)
        used.update(v.name for v in graph.value_info)
        for node in graph.node:
            used.update(node.input)
            used.update(node.output)
            for _, g in subgraphs(node):
                self._collect(g)

    @property
    def used(self) -> frozenset[str]:
        """Every name taken so far: the model's own, and those handed out."""
        return frozenset(self._used)

    def fresh(self, base: str) -> str:
        """``base`` itself if unused, else ``base_1``, ``base_2``, ... Reserves the name returned."""
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name
