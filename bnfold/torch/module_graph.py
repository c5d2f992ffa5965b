"""The graph :func:`bnfold.torch.module.fold_module_result` reads: ``torch.fx.symbolic_trace``'s, or, where
that cannot trace ``forward`` (Python control flow on shapes, ...), ``torch.export``'s on the example inputs.

Both come out as the same small view: nodes with a ``name``, an ``op`` (``"call_module"`` for a module
call, with the module's path as ``target``), ``args`` and ``users``, and the rank of each output where it
was observed. In an exported graph a module call is the aten op of that module's kind (``aten.conv2d``,
``aten.linear``, ``aten.batch_norm``, ...) whose innermost ``nn_module_stack`` entry is that module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnfold.errors import BadInputError, first_line
from bnfold.torch.archive import quiet

__all__ = ["GraphNode", "ModuleGraph", "export_graph", "fx_graph"]

_MODULE_OPS = frozenset(
    {f"aten::conv{k}d" for k in (1, 2, 3)} | {f"aten::conv_transpose{k}d" for k in (1, 2, 3)}
    | {"aten::convolution", "aten::_convolution", "aten::linear", "aten::batch_norm"}
)
"""The aten op that stands for a call of a Conv / ConvTranspose / Linear / BatchNorm module."""


@dataclass(eq=False)
class GraphNode:
    name: str
    op: str
    target: Any
    args: tuple[Any, ...] = ()
    users: list[GraphNode] = field(default_factory=list)


@dataclass
class ModuleGraph:
    nodes: list[GraphNode]
    ranks: dict[str, int]
    """Rank of a node's output by node name, where observed."""
    attr_reads: list[str]
    """Attribute paths ``forward`` reads directly (fx ``get_attr``)."""
    source: str
    """``"torch.fx"`` or ``"torch.export"``."""
    functional_bn: list[str] = field(default_factory=list)
    """Nodes that call batch_norm outside a BatchNorm module."""


def fx_graph(work: Any, args: tuple[Any, ...] | None) -> ModuleGraph:
    """``torch.fx.symbolic_trace`` of ``work``; ranks from ShapeProp on ``args`` (none without them)."""
    import torch

    with quiet():
        gm = torch.fx.symbolic_trace(work)
    ranks: dict[str, int] = {}
    if args:
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*args)
        except Exception as exc:
            raise BadInputError(f"the module fails on the example inputs: {first_line(exc)}") from exc
        for node in gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                ranks[node.name] = len(meta.shape)
    views: dict[Any, GraphNode] = {}
    for node in gm.graph.nodes:
        views[node] = GraphNode(node.name, node.op, node.target)
    for node, view in views.items():
        view.args = tuple(views.get(a, a) if isinstance(a, torch.fx.Node) else a for a in node.args)
        view.users = [views[u] for u in node.users]
    functional = [n.name for n in gm.graph.nodes if n.op == "call_function"
                  and n.target in (torch.nn.functional.batch_norm, torch.batch_norm)]
    reads = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    return ModuleGraph(list(views.values()), ranks, reads, "torch.fx", functional)


def _module_path(node: Any) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return str(path)


def export_graph(work: Any, args: tuple[Any, ...]) -> ModuleGraph:
    """``torch.export.export(work, args)`` read as module calls (``work`` itself is not changed)."""
    import torch

    from bnfold.torch.program_fold import op_name

    try:
        with quiet(), torch.no_grad():
            program = torch.export.export(work, args)
    except Exception as exc:
        raise BadInputError(f"torch.export cannot export {type(work).__name__}: {first_line(exc)}") from exc
    views: dict[Any, GraphNode] = {}
    functional: list[str] = []
    for node in program.graph.nodes:
        kind = op_name(node)
        path = _module_path(node) if kind in _MODULE_OPS else None
        if path is not None and kind == "aten::batch_norm" and not _is_bn(_get(work, path)):
            path = None
        if path is None and kind == "aten::batch_norm":
            functional.append(node.name)
        views[node] = GraphNode(node.name, "call_module" if path is not None else node.op, path or node.target)
    for node, view in views.items():
        view.args = tuple(views.get(a, a) if isinstance(a, torch.fx.Node) else a for a in node.args)
        view.users = [views[u] for u in node.users]
    ranks = {n.name: n.meta["val"].dim() for n in program.graph.nodes if hasattr(n.meta.get("val"), "dim")}
    return ModuleGraph(list(views.values()), ranks, [], "torch.export", functional)


def _is_bn(mod: Any) -> bool:
    from torch import nn

    return isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)


def _get(root: Any, path: str) -> Any:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
