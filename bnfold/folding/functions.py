"""BatchNormalization inside model-local functions (FunctionProto).

Two cases, decided per function before anything is folded:

- **Constants in the body.** Where a BN's statistics and its producer's weights are Constant nodes of the
  function body, the body is folded like a graph: it is lifted into a temporary GraphProto (the function's
  inputs become untyped graph inputs), the ordinary rules run on it, and the tensors the folds write are
  put back as Constant nodes. Every call site benefits; the function's signature is unchanged.
- **Statistics arriving as function inputs.** Their values are bound at the call site, so the body alone
  cannot be folded. When the function is called from exactly one place (the main graph, a subgraph or
  another function), that call is inlined with onnx's own inliner (``onnx.inliner``) and the main-graph
  fold then sees the BN; the model's inputs and outputs do not change and no other call site exists. A
  function called from several places, or from none, keeps its BN with a reason saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import onnx
import onnx.inliner
from onnx import helper

from bnfold.ir.nodes import subgraphs

__all__ = ["body_graph", "call_sites", "inline_for_folding", "input_fed_norms", "write_back"]

log = logging.getLogger(__name__)

_NORM = "BatchNormalization"


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for _, g in subgraphs(node):
            yield from _nodes(g)


def call_sites(model: onnx.ModelProto, function: onnx.FunctionProto) -> int:
    """How many nodes call ``function`` (main graph, subgraphs and every function body)."""
    key = (function.domain, function.name)
    count = sum((n.domain, n.op_type) == key for n in _nodes(model.graph))
    for f in model.functions:
        count += sum((n.domain, n.op_type) == key for n in f.node)
    return count


def input_fed_norms(function: onnx.FunctionProto) -> list[tuple[str, list[str]]]:
    """(BN output, [its parameters that are function inputs]) for each BN whose statistics the body does not
    hold as constants."""
    inputs = set(function.input)
    out = []
    for node in function.node:
        if node.op_type == _NORM and node.domain in ("", "ai.onnx"):
            fed = [n for n in node.input[1:5] if n in inputs]
            if fed:
                out.append((node.output[0] if node.output else "", fed))
    return out


def inline_for_folding(model: onnx.ModelProto) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Inline (in place) the functions whose BN statistics arrive as inputs and that have one call site.

    Returns (notes, {(domain, name): reason}) for the functions that were not inlined.
    """
    wanted: list[tuple[str, str]] = []
    reasons: dict[tuple[str, str], str] = {}
    for f in model.functions:
        fed = input_fed_norms(f)
        if not fed:
            continue
        sites = call_sites(model, f)
        key = (f.domain, f.name)
        params = ", ".join(repr(p) for p in fed[0][1])
        if sites == 1:
            wanted.append(key)
        else:
            where = "never called" if sites == 0 else f"called from {sites} places (inlining would rewrite them all)"
            reasons[key] = (f"inside model-local function '{f.domain}:{f.name}', whose BN statistics ({params}) "
                            f"arrive as function inputs; the function is {where}, so it is not inlined")
    if not wanted:
        return [], reasons
    try:
        inlined = onnx.inliner.inline_selected_functions(model, wanted, exclude=False)
    except Exception as exc:  # the inliner is onnx's: any failure leaves the model as it was
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for key in wanted:
            reasons[key] = f"inside model-local function '{key[0]}:{key[1]}': onnx's inliner failed ({first})"
        return [], reasons
    model.CopyFrom(inlined)
    names = ", ".join(f"'{d}:{n}'" for d, n in wanted)
    return [f"model-local function(s) {names} inlined at their only call site so that the BN statistics they "
            "receive as inputs could be folded; the model's inputs and outputs are unchanged"], reasons


def body_graph(function: onnx.FunctionProto) -> onnx.GraphProto:
    """The function body as a graph: its inputs untyped graph inputs, its nodes, its outputs."""
    inputs = [onnx.ValueInfoProto(name=n) for n in function.input]
    outputs = [onnx.ValueInfoProto(name=n) for n in function.output]
    return helper.make_graph(list(function.node), f"{function.domain}:{function.name}", inputs, outputs)


def write_back(function: onnx.FunctionProto, graph: onnx.GraphProto) -> None:
    """Replace the body by ``graph``'s nodes, its initializers (what the folds wrote) as Constant nodes first."""
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    nodes = [*constants, *graph.node]
    del function.node[:]
    function.node.extend(nodes)


def fold_bodies(
    model: onnx.ModelProto,
    fold_graph: Callable[[onnx.GraphProto, str], None],
    with_norms: Callable[[onnx.FunctionProto], bool],
) -> None:
    """Fold each function body that holds a normalization (``with_norms``), through ``fold_graph(graph,
    path)``, which must leave only live tensors in ``graph.initializer``."""
    for f in model.functions:
        if not with_norms(f):
            continue
        graph = body_graph(f)
        before = [n.SerializeToString() for n in f.node]
        fold_graph(graph, f"function {f.domain}:{f.name}")
        if [n.SerializeToString() for n in graph.node] != before or len(graph.initializer):
            write_back(f, graph)
