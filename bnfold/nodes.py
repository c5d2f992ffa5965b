"""Reading one ``NodeProto``: which default-domain op it is, and its attributes.

Kept apart from :mod:`bnfold.graph` because :mod:`bnfold.const_eval`, which the graph view imports,
reads nodes too.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import onnx

__all__ = ["attr", "is_op"]

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
