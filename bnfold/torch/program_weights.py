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

import numpy as np

from bnfold.folding.math import RoundingError
from bnfold.folding.result import FoldedPair
from bnfold.torch.producers import from64, to64
from bnfold.torch.program_fold import Lifted, op_name

__all__ = ["materialize_weight_norms", "weight_norm64"]

_NORM_OPS = frozenset({"aten::_weight_norm", "aten::_weight_norm_interface"})


def weight_norm64(v: np.ndarray, g: np.ndarray, dim: int) -> np.ndarray:
    """``g * v / ||v||`` in float64, the 2-norm over every axis of ``v`` but ``dim`` (all axes for -1)."""
    v64, g64 = np.asarray(v, dtype=np.float64), np.asarray(g, dtype=np.float64)
    if dim == -1:
        norm = np.sqrt(np.sum(v64 * v64))
    else:
        dim %= v64.ndim
        axes = tuple(a for a in range(v64.ndim) if a != dim)
        norm = np.sqrt(np.sum(v64 * v64, axis=axes, keepdims=True))
    return v64 * g64 / norm


def _weight_name(target: str, taken: set[str]) -> str:
    """``c.weight`` for ``c.parametrizations.weight.original1`` or ``c.weight_v``; ``target`` if taken."""
    name = re.sub(r"\.parametrizations\.(\w+)\.original1$", r".\1", target)
    name = re.sub(r"_v$", "", name) if name == target else name
    return name if name != target and name not in taken else target


def _plans(program: Any) -> list[tuple[Any, Any, Any, Any, Any]]:
    """(norm node, value node, v placeholder, g placeholder, folded tensor) for each materializable one."""
    lifted = Lifted(program)
    out = []
    for node in program.graph.nodes:
        kind = op_name(node)
        if kind not in _NORM_OPS:
            continue
        value = node
        if kind == "aten::_weight_norm_interface":
            gets = [u for u in node.users if u.target is operator.getitem]
            if len(gets) != len(node.users) or any(u.args[1] != 0 for u in gets if u.users) or len(gets) != 1:
                continue
            value = gets[0]
        v_node, g_node = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        v, g = lifted.tensor(v_node), lifted.tensor(g_node)
        if v is None or g is None or not isinstance(dim, int) or not v.is_floating_point() or v.dtype != g.dtype:
            continue
        if len(v_node.users) != 1 or len(g_node.users) != 1 or v_node is g_node:
            continue
        try:
            w = from64(weight_norm64(to64(v), to64(g), dim), v, f"weight normalization %{node.name}")
        except RoundingError:
            continue
        out.append((node, value, v_node, g_node, w))
    return out


def materialize_weight_norms(program: Any) -> tuple[Any, list[FoldedPair]]:
    """``program`` with every weight normalization of lifted parameters replaced by its value (a new
    program; ``program``'s graph is taken over), and one ``const_weights`` record per weight."""
    import torch
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    found = _plans(program)
    if not found:
        return program, []
    gm, graph = program.graph_module, program.graph
    specs = [copy.copy(s) for s in program.graph_signature.input_specs]
    by_name = {s.arg.name: s for s in specs if hasattr(s.arg, "name")}
    state, constants = dict(program.state_dict), dict(program.constants)
    taken = set(state) | set(constants)
    records = []
    for node, value, v_node, g_node, w in found:
        readers = list(value.users)
        reader = op_name(readers[0]) if len(readers) == 1 else "several ops"
        records.append(FoldedPair(rule="const_weights", producer_op=reader, output=value.name,
                                  norm_op="weight normalization"))
        vspec, gspec = by_name[v_node.name], by_name[g_node.name]
        old = state.pop(vspec.target, None)
        constants.pop(vspec.target, None)
        vspec.target = _weight_name(vspec.target, taken)
        taken.add(vspec.target)
        if vspec.kind == InputKind.PARAMETER:
            state[vspec.target] = torch.nn.Parameter(w, requires_grad=bool(getattr(old, "requires_grad", False)))
        elif vspec.kind == InputKind.BUFFER and vspec.persistent:
            state[vspec.target] = w
        else:
            constants[vspec.target] = w
        value.replace_all_uses_with(v_node)
        if value is not node:
            graph.erase_node(value)
        graph.erase_node(node)
        graph.erase_node(g_node)
        specs.remove(gspec)
        if not any(s.target == gspec.target for s in specs):
            state.pop(gspec.target, None)
            constants.pop(gspec.target, None)
    graph.lint()
    gm.recompile()
    return torch.export.ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(input_specs=specs,
                                             output_specs=copy.deepcopy(program.graph_signature.output_specs)),
        state_dict=state,
        range_constraints=copy.deepcopy(program.range_constraints),
        module_call_graph=copy.deepcopy(program.module_call_graph),
        example_inputs=program.example_inputs,
        constants=constants,
        verifiers=program.verifiers,
    ), records
