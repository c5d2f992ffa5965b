"""Reading a TorchScript graph: walking blocks, constants, uses, and naming nodes for people."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["SHAPE_OF_SECOND", "SHAPE_ONLY", "const", "describe", "floating", "other_uses", "walk"]

SHAPE_ONLY = frozenset(
    {
        "aten::dim",
        "aten::size",
        "aten::sym_size",
        "aten::numel",
        "aten::len",
        "prim::shape",
        "prim::device",
        "prim::dtype",
        "prim::layout",
        "prim::is_cuda",
        "aten::is_floating_point",
    }
)
"""Ops that read only a tensor's metadata: a fold keeps shape, dtype and device, so they may stay."""


def walk(block: Any) -> Iterator[tuple[Any, bool]]:
    """(node, nested) for every node of ``block`` (a graph or block), nested blocks included, in order."""
    for node in block.nodes():
        yield node, False
        for sub in node.blocks():
            for inner, _ in walk(sub):
                yield inner, True


def const(value: Any) -> tuple[bool, Any]:
    """(True, value) for the output of a ``prim::Constant``, else (False, None)."""
    if value.node().kind() != "prim::Constant":
        return False, None
    return True, value.toIValue()


def floating(t: Any) -> bool:
    """A floating-point tensor (not None, not a scalar, not quantized)."""
    return t is not None and hasattr(t, "is_floating_point") and t.is_floating_point()


def describe(node: Any) -> str:
    """``aten::batch_norm %y.1 (layer1.bn)``: the op, its output and, where known, its module.

    The module comes from the traced scope, else from the name of a ``self.<path>.weight`` or
    ``.running_mean`` constant (freezing names constants after the attribute they came from).
    """
    where = node.scopeName().replace("__module.", "") if node.scopeName() else ""
    if not where:
        for value in node.inputs():
            name = value.debugName()
            if name.startswith("self.") and name.rsplit(".", 1)[-1] in {"running_mean", "weight"}:
                where = name[len("self.") :].rsplit(".", 1)[0]
                break
    out = node.outputsAt(0).debugName() if node.outputsSize() else ""
    return f"{node.kind()} %{out}" + (f" ({where})" if where else "")


SHAPE_OF_SECOND = frozenset({"aten::reshape_as", "aten::view_as", "aten::expand_as"})
"""Ops that read their second argument for its shape alone (``y.reshape_as(x)``: x's shape)."""


def other_uses(value: Any, allowed: Any) -> str | None:
    """None when ``value`` is read only by node ``allowed`` and shape queries, else a sentence naming
    what else reads it."""
    others = [u.user for u in value.uses() if u.user is not allowed and u.user.kind() not in SHAPE_ONLY
              and not (u.user.kind() in SHAPE_OF_SECOND and u.offset == 1)]
    if not others:
        return None
    user = others[0]
    what = "is returned" if user.kind() == "prim::Return" else f"also feeds {describe(user)}"
    more = f" and {len(others) - 1} more" if len(others) > 1 else ""
    return f"output %{value.debugName()} of {describe(value.node())} {what}{more}"
