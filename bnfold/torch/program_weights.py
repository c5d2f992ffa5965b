"""torch.export programs: a weight computed from parameters by weight normalization becomes a plain
parameter (the ONNX rule ``const_weights``), so the BatchNorm after its layer folds as usual.

Before (``torch.nn.utils.parametrizations.weight_norm`` and the older ``torch.nn.utils.weight_norm`` both
export this way)::

    %w = aten._weight_norm(%p_v, %p_g, dim)    # or getitem(aten._weight_norm_interface(%p_v, %p_g, dim), 0)
    %y = aten.conv2d(%x, %w, %p_b, ...)

After::

    %y = aten.conv2d(%x, %p_w, %p_b, ...)      # %p_w a lifted parameter holding g * v / ||v||; %p_v's
                                                # parameter renamed (``c.weight``), %p_g dropped

Conditions (otherwise the computation stays, and the BatchNorm after it is refused as before): ``v`` and
``g`` are lifted floating-point tensors of the same dtype read by this computation only, ``dim`` an int, and
the result is finite in that dtype.

Formula (float64, rounded once to ``v``'s dtype): ``w = v * g / ||v||``, the norm over every axis but
``dim`` (over all axes when ``dim`` is -1).
"""

from __future__ import annotations

import copy
import operator
import re
from typing import Any

from bnfold.folding.math import RoundingError
from bnfold.folding.result import FoldedPair
from bnfold.torch.producers import from64, to64
from bnfold.torch.program_fold import Lifted, drop_placeholder, op_name, rebuilt

__all__ = ["materialize_weight_norms"]

_NORMS = frozenset({"aten::_weight_norm", "aten::_weight_norm_interface", "aten::linalg_vector_norm",
                    "aten::norm", "aten::norm_except_dim"})
_LAYOUT = frozenset({"aten::permute", "aten::t", "aten::transpose", "aten::view", "aten::reshape"})
_PURE = _NORMS | _LAYOUT | frozenset({
    "aten::mul", "aten::div", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::reciprocal", "aten::sum",
    "aten::expand", "aten::clone", "aten::squeeze", "aten::unsqueeze"})
"""Deterministic aten ops a weight normalization is spelled with (evaluated in float64 on the parameters)."""


def _weight_name(target: str, taken: set[str]) -> str:
    """``c.weight`` for ``c.parametrizations.weight.original1`` or ``c.weight_v``; ``target`` if taken."""
    name = re.sub(r"\.parametrizations\.(\w+)\.original1$", r".\1", target)
    name = re.sub(r"_v$", "", name) if name == target else name
    return name if name != target and name not in taken else target


def _evaluate64(nodes: list[Any], leaves: dict[Any, Any]) -> Any:
    """Run ``nodes`` (in graph order) on float64 copies of the ``leaves`` tensors; the last node's value."""
    import torch

    values: dict[Any, Any] = {leaf: t.detach().to(torch.float64) for leaf, t in leaves.items()}

    def arg(a: Any) -> Any:
        if isinstance(a, list | tuple):
            return type(a)(arg(x) for x in a)
        return values[a] if isinstance(a, torch.fx.Node) else a

    for node in nodes:
        values[node] = node.target(*arg(node.args), **{k: arg(v) for k, v in node.kwargs.items()})
    return values[nodes[-1]]


def _plans(program: Any) -> list[tuple[Any, list[Any], Any, list[Any], Any, str]]:
    """(root, its computing nodes, the placeholder that takes the value, the other placeholders, the value
    rounded, "weight normalization" | "constant subgraph") for each weight computed from lifted tensors."""
    import torch

    lifted = Lifted(program)
    computed: dict[Any, list[Any]] = {}  # node -> the computing nodes it depends on (itself last)
    for node in program.graph.nodes:
        if node.op != "call_function" or not (op_name(node) in _PURE or node.target is operator.getitem):
            continue
        inputs = [a for a in node.all_input_nodes]
        if not inputs or not all(a in computed or lifted.tensor(a) is not None for a in inputs):
            continue
        deps = [n for a in inputs if a in computed for n in computed[a]]
        computed[node] = [*dict.fromkeys(deps), node]
    out = []
    taken: set[Any] = set()
    for root in reversed(list(computed)):
        if root in taken or all(u in computed for u in root.users):
            continue
        while op_name(root) in _LAYOUT and root.args[0] in computed and len(root.args[0].users) == 1:
            root = root.args[0]  # a transpose of the computed weight stays (the folds read through it)
        nodes = [n for n in program.graph.nodes if n in set(computed[root])]
        taken.update(nodes)
        kinds = {op_name(n) for n in nodes}
        if kinds <= _LAYOUT or not kinds & _NORMS:
            continue  # a transpose of a weight is folded through; a constant subgraph other than a norm: left
        leaves = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in computed))
        inside = set(nodes)
        if any(u not in inside for n in [*nodes[:-1], *leaves] for u in n.users):
            continue  # a leaf or an intermediate read elsewhere
        tensors = {leaf: lifted.tensor(leaf) for leaf in leaves}
        val: Any = root.meta.get("val")
        dtypes = {t.dtype for t in tensors.values()}
        if val is None or len(dtypes) != 1 or not all(t.is_floating_point() for t in tensors.values()):
            continue
        host = next((leaf for leaf in leaves if tuple(tensors[leaf].shape) == tuple(val.shape)), None)
        if host is None:
            continue
        try:
            with torch.no_grad():
                value = _evaluate64(nodes, tensors)
            w = from64(to64(value), tensors[host], f"weight computed by %{root.name}")
        except (RoundingError, RuntimeError, TypeError, KeyError):
            continue
        out.append((root, nodes, host, [leaf for leaf in leaves if leaf is not host], w, "weight normalization"))
    return out


def materialize_weight_norms(program: Any) -> tuple[Any, list[FoldedPair]]:
    """``program`` with every weight normalization of lifted parameters replaced by its value (a new
    program; ``program``'s graph is taken over), and one ``const_weights`` record per weight."""
    import torch
    from torch.export.graph_signature import InputKind

    found = _plans(program)
    if not found:
        return program, []
    gm, graph = program.graph_module, program.graph
    specs = [copy.copy(s) for s in program.graph_signature.input_specs]
    by_name = {s.arg.name: s for s in specs if hasattr(s.arg, "name")}
    state, constants = dict(program.state_dict), dict(program.constants)
    taken = set(state) | set(constants)
    records = []
    for root, nodes, host, others, w, kind in found:
        readers = list(root.users)
        reader = op_name(readers[0]) if len(readers) == 1 else "several ops"
        records.append(FoldedPair(rule="const_weights", producer_op=reader, output=root.name, norm_op=kind))
        hspec = by_name[host.name]
        old = state.pop(hspec.target, None)
        constants.pop(hspec.target, None)
        hspec.target = _weight_name(hspec.target, taken)
        taken.add(hspec.target)
        if hspec.kind == InputKind.PARAMETER:
            state[hspec.target] = torch.nn.Parameter(w, requires_grad=bool(getattr(old, "requires_grad", False)))
        elif hspec.kind == InputKind.BUFFER and hspec.persistent:
            state[hspec.target] = w
        else:
            constants[hspec.target] = w
        root.replace_all_uses_with(host)
        for node in reversed(nodes):
            graph.erase_node(node)
        for leaf in others:
            spec = by_name[leaf.name]
            drop_placeholder(graph, leaf, spec, specs, state, constants)
    outputs = copy.deepcopy(program.graph_signature.output_specs)
    return rebuilt(program, gm, specs, outputs, state, constants), records
