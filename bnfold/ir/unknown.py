"""Where an unknown shape comes from: the first tensor, walking back, whose producer had every input's shape
and still gave none (or a graph input declared without a shape). Refusals append it, so a user reads
exactly what was unknown and why, not only the tensor next to the normalization."""

from __future__ import annotations

from bnfold.ir.shapes import shape_of
from bnfold.ir.view import GraphView

__all__ = ["why_unknown"]

_KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def why_unknown(view: GraphView, name: str) -> str:
    """``"; it is unknown from ..."`` for tensor ``name`` of unknown shape, or ``""`` when nothing more is known."""
    current, seen = name, set()
    while current not in seen:
        seen.add(current)
        index = view.producer.get(current)
        if index is None:
            if current in view.graph_inputs and current != name:
                return f"; it depends on graph input '{current}', whose shape the model does not declare"
            return ""
        node = view.node(index)
        unknown = [i for i in node.input if i and shape_of(view, i) is None and i not in view.initializers]
        if not unknown:
            if node.domain not in _KNOWN_DOMAINS:
                why = f"an op of domain '{node.domain}' that onnx has no schema for, and no value_info gives its output"
            else:
                why = "the shapes of its inputs do not determine its output's here"
            here = f"'{current}', the output of {view.describe(index)}" if current != name else view.describe(index)
            return f"; it is unknown from {here} on: {why}"
        current = unknown[0]
    return ""
