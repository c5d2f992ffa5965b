"""Fold BatchNorm into the Conv / ConvTranspose / Linear / addmm / mm before it: a pass over the graph of a
``torch.export`` program (:class:`torch.export.ExportedProgram`).

Before (as ``torch.export.export`` emits it; ``run_decompositions`` gives the right-hand spellings)::

    %y = aten.conv2d(%x, %p_w, %p_b, ...)        # conv{1,2,3}d, conv_transpose{1,2,3}d, convolution,
                                                  # linear, addmm(%b, %x, permute(%w)), mm(%x, permute(%w)),
                                                  # add(mm(...), %b)
    %z = aten.batch_norm(%y, %g, %beta, %mean, %var, False, 0.1, eps, ...)
       | getitem(aten._native_batch_norm_legit_no_training(%y, %g, %beta, %mean, %var, 0.1, eps), 0)

After::

    %y = aten.conv2d(%x, %p_w', %p_b', ...)      # every reader of %z reads %y; %p_w', %p_b' replace the
                                                  # producer's weight and bias (a new lifted input when it
                                                  # had none); the BatchNorm's parameters and buffers dropped

Conditions (each failing one is a Skip naming the BatchNorm):

* inference BatchNorm: ``training`` False (``_native_batch_norm_legit_functional`` and a ``training=True``
  ``batch_norm`` are training mode), running statistics present, every tensor a lifted parameter, buffer
  or constant, eps a number, only output 0 read;
* its input is the output of a supported producer, read by nothing else (shape queries aside);
* the producer's weight (and bias) are lifted tensors read by that producer only (a shared weight would
  change the other reader), ``groups`` / ``transposed`` constants, addmm's ``alpha`` and ``beta`` 1;
* the axis BatchNorm normalizes (1) is the producer's output-channel axis, proven with the program's own
  shape metadata (axis 1 of a batched convolution, the last axis of a Linear / addmm / mm);
* channel counts agree and the folded tensors are finite in the weight's dtype.

Where there is no such producer, :mod:`bnfold.torch.program_patterns` is tried (a BatchNorm after ``aten.cat``
or a layout op, or folded forward into the Linear / unpadded convolution after it); a refusal then names
both what blocks the fold backward and what blocks it forward.

Formula: :mod:`bnfold.folding` in float64 (through :mod:`bnfold.torch.producers`), each tensor rounded once.
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.folding.math import RoundingError, fold_bias, scale_axis, scale_grouped_axis1
from bnfold.folding.result import FoldedPair, Skip
from bnfold.torch.jit_fold import BN_OPS
from bnfold.torch.producers import PRODUCERS, BnStats, bn_stats_affine, from64, to64

__all__ = [
    "BN_TRAINING_OPS",
    "Lifted",
    "ProgramFold",
    "ProgramPlan",
    "bn_nodes",
    "bn_output",
    "drop_placeholder",
    "fold_program_graph",
    "matmul_weight",
    "only_reader",
    "op_name",
    "plan_into",
    "rebuilt",
]

log = logging.getLogger(__name__)

BN_TRAINING_OPS = frozenset({"aten::_native_batch_norm_legit_functional", "aten::_native_batch_norm_legit"})
"""Batch-statistics forms ``torch.export`` emits for a module in training mode."""

_SHAPE_ONLY = frozenset({"aten::sym_size", "aten::sym_numel", "aten::sym_stride", "aten::sym_storage_offset"})
_TRANSPOSE = frozenset({"aten::permute", "aten::t", "aten::transpose"})


def op_name(node: Any) -> str:
    """``aten::conv2d`` for a ``call_function`` on an aten overload, else ``""``."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return str(schema.name) if schema is not None else ""


def bn_nodes(graph: Any) -> list[Any]:
    """Every BatchNorm node of an FX graph (inference or training form), in order."""
    return [n for n in graph.nodes if op_name(n) in BN_OPS or op_name(n) in BN_TRAINING_OPS]


class Lifted:
    """The program's lifted tensors (parameters, buffers, constants) by placeholder name, editable."""

    def __init__(self, program: Any) -> None:
        from torch.export.graph_signature import InputKind

        self.program = program
        self.specs = {s.arg.name: s for s in program.graph_signature.input_specs if hasattr(s.arg, "name")}
        self.kinds = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)

    def tensor(self, node: Any) -> Any:
        """The tensor behind a placeholder node, or None when it is not a lifted tensor."""
        from torch.export.graph_signature import InputKind

        if getattr(node, "op", None) != "placeholder":
            return None
        spec = self.specs.get(node.name)
        if spec is None or spec.kind not in self.kinds or spec.target is None:
            return None
        if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
            return self.program.state_dict.get(spec.target)
        return self.program.constants.get(spec.target)


@dataclass(eq=False)
class ProgramPlan:
    bn: Any
    producer: Any
    weight_node: Any
    weight: Any  # torch.Tensor, folded, in the stored dtype and layout
    bias_node: Any | None  # the bias placeholder to overwrite; None: a new lifted bias is added
    bias: Any
    record: FoldedPair
    mm_to_addmm: bool = False
    replacement: Any = None  # what the BatchNorm's readers read instead (None: the producer)
    remove_bn: bool = True  # False for every part of a split BatchNorm but its last


@dataclass
class ProgramFold:
    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    plans: list[ProgramPlan] = field(default_factory=list)
    deferred: int = 0
    """BatchNorms whose fold touches a node another plan of this round rewrites: decided in the next round."""


def _arg(node: Any, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _rank(node: Any) -> int | None:
    val: Any = node.meta.get("val") if hasattr(node, "meta") else None
    return int(val.dim()) if hasattr(val, "dim") else None


def only_reader(value: Any, reader: Any) -> str | None:
    others = [u for u in value.users if u is not reader and op_name(u) not in _SHAPE_ONLY]
    if not others:
        return None
    what = "is returned" if others[0].op == "output" else f"also feeds {others[0].name}"
    return f"output %{value.name} of {op_name(value) or value.op} {what}"


def bn_output(bn: Any) -> Any:
    """The node whose value is the normalized tensor: the BN itself, or its single ``getitem(bn, 0)``."""
    if op_name(bn) == "aten::batch_norm":
        return bn
    gets = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
    return gets[0] if len(gets) == 1 else bn


def _match_bn(bn: Any, lifted: Lifted) -> tuple[BnStats, Any] | str:
    """(statistics, the BN's input node) or the reason it is not an inference BatchNorm."""
    kind = op_name(bn)
    if kind in BN_TRAINING_OPS:
        return "in training mode (batch statistics): export the module after calling .eval()"
    layout = BN_OPS[kind]
    mean_node, var_node = bn.args[layout.mean], bn.args[layout.var]
    if mean_node is None or var_node is None:
        return "no running statistics (track_running_stats=False): it normalizes with each batch's statistics"
    if layout.training is not None and _arg(bn, layout.training, "training") is not False:
        return "in training mode (batch statistics): export the module after calling .eval()"
    mean, var = lifted.tensor(mean_node), lifted.tensor(var_node)
    if mean is None or var is None:
        return "its running mean/variance are not lifted parameters, buffers or constants"
    gamma_node, beta_node = bn.args[layout.weight], bn.args[layout.bias]
    gamma = lifted.tensor(gamma_node) if gamma_node is not None else None
    beta = lifted.tensor(beta_node) if beta_node is not None else None
    if (gamma_node is not None and gamma is None) or (beta_node is not None and beta is None):
        return "its weight/bias are not lifted parameters, buffers or constants"
    eps = bn.args[layout.eps]
    if not isinstance(eps, float | int):
        return "its eps is not a constant"
    if kind != "aten::batch_norm":
        users = [u for u in bn.users if not (u.target is operator.getitem and (u.args[1] == 0 or not u.users))]
        if users:
            return f"its extra output is read by {next(iter(users[0].users), users[0]).name}"
    c = mean.numel()
    if var.numel() != c or any(t is not None and t.numel() != c for t in (gamma, beta)):
        return "its weight/bias/mean/var have different lengths"
    return BnStats(gamma=gamma, beta=beta, mean=mean, var=var, eps=float(eps)), bn.args[layout.input]


@dataclass(frozen=True)
class _Producer:
    node: Any  # the node whose output BN reads
    compute: Any  # the node holding the weight (differs for add(mm, b))
    rule: str  # conv | conv_transpose | linear
    weight_node: Any
    weight_axis: int  # output-channel axis of the stored weight (0, or 1 for a [in, out] matmul operand)
    transpose_node: Any | None  # permute/t between the weight placeholder and the matmul
    bias_node: Any | None
    groups: int
    mm_to_addmm: bool = False


def matmul_weight(mat2: Any) -> tuple[Any, int, Any | None] | str:
    """(weight placeholder, its output axis, the transpose node) for the right operand of mm/addmm."""
    if mat2.op == "placeholder":
        return mat2, 1, None
    if op_name(mat2) in _TRANSPOSE and mat2.args[0].op == "placeholder":
        if op_name(mat2) == "aten::permute" and list(mat2.args[1]) not in ([1, 0], [-1, -2]):
            return "its weight goes through a permute that is not a 2-D transpose"
        return mat2.args[0], 0, mat2
    return "its weight is not a lifted tensor (or a transpose of one)"


def _producer(node: Any) -> _Producer | str:
    kind = op_name(node)
    if kind == "aten::add" and len(node.args) == 2 and _arg(node, 2, "alpha", 1) == 1:
        for mm, bias in (node.args, node.args[::-1]):
            if hasattr(mm, "op") and op_name(mm) == "aten::mm" and getattr(bias, "op", None) == "placeholder":
                inner = _producer(mm)
                if isinstance(inner, str):
                    return inner
                if len(mm.users) != 1:
                    return f"output %{mm.name} of aten::mm also feeds another op"
                return _Producer(node, mm, "linear", inner.weight_node, inner.weight_axis, inner.transpose_node,
                                 bias, 1)
    if kind in ("aten::addmm", "aten::mm"):
        if kind == "aten::addmm" and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            return "aten::addmm with alpha or beta other than 1"
        mat2 = node.args[2] if kind == "aten::addmm" else node.args[1]
        found = matmul_weight(mat2)
        if isinstance(found, str):
            return found
        weight, axis, transpose = found
        bias = node.args[0] if kind == "aten::addmm" else None
        return _Producer(node, node, "linear", weight, axis, transpose, bias, 1, mm_to_addmm=kind == "aten::mm")
    if kind not in PRODUCERS:
        where = "a program input" if node.op == "placeholder" else f"%{node.name} ({kind or node.op})"
        return f"its input comes from {where}, not from a Conv, ConvTranspose, Linear, addmm or mm"
    op = PRODUCERS[kind]
    rule = op.rule
    if op.transposed is not None:
        rule = "conv_transpose" if node.args[op.transposed] else "conv"
    groups = 1
    if rule == "conv_transpose" and op.groups is not None:
        groups = _arg(node, op.groups, "groups", 1)
    if not isinstance(groups, int):
        return f"%{node.name} has a symbolic `groups`"
    return _Producer(node, node, rule, node.args[1], 0, None, _arg(node, 2, "bias"), groups)


def _plan(bn: Any, lifted: Lifted) -> list[ProgramPlan] | str:
    from bnfold.torch import program_patterns as patterns

    found = _match_bn(bn, lifted)
    if isinstance(found, str):
        return found
    stats, source = found
    if op_name(source) == "aten::cat":
        return patterns.plan_concat(bn, stats, source, lifted)
    if op_name(source) in patterns.LAYOUT_OPS:
        back = patterns.plan_layout(bn, stats, source, lifted)
    else:
        bad = only_reader(source, bn)
        back = bad if bad else plan_into(bn, stats, source, lifted)
    if not isinstance(back, str):
        return back if isinstance(back, list) else [back]
    forward = patterns.plan_forward(bn, stats, lifted)
    if forward is None:
        return back
    if isinstance(forward, str):
        return f"{back}; and {forward}"
    return [forward]


def plan_into(bn: Any, stats: BnStats, source: Any, lifted: Lifted, axis: int = 1,
              rule: str | None = None) -> ProgramPlan | str:
    """Fold ``stats`` (normalizing ``axis`` of ``source``) into the producer of ``source``: a plan or the reason."""
    prod = _producer(source)
    if isinstance(prod, str):
        return prod
    weight = lifted.tensor(prod.weight_node)
    if weight is None or not weight.is_floating_point():
        return f"the weight of %{prod.compute.name} is not a lifted floating-point tensor"
    if len(prod.weight_node.users) != 1 or (prod.transpose_node is not None and len(prod.transpose_node.users) != 1):
        return f"the weight {prod.weight_node.name} of %{prod.compute.name} is shared with another op"
    bias = None
    if prod.bias_node is not None:
        bias = lifted.tensor(prod.bias_node)
        if bias is None or bias.dim() != 1:
            return f"the bias of %{prod.node.name} is not a lifted 1-D tensor"
        if len(prod.bias_node.users) != 1:
            return f"the bias {prod.bias_node.name} of %{prod.node.name} is shared with another op"
    rank = _rank(source)
    if rank is None:
        return f"the rank of %{source.name} is unknown (no shape metadata)"
    if prod.rule == "linear":
        channel_axis = rank - 1
        out_channels = weight.shape[prod.weight_axis]
    else:
        channel_axis = 1 if rank == weight.dim() else 0
        out_channels = weight.shape[1] * prod.groups if prod.rule == "conv_transpose" else weight.shape[0]
    if channel_axis != axis:
        return f"it normalizes axis {axis} of %{source.name}, whose channel axis is {channel_axis}"
    if out_channels != stats.mean.numel():
        return f"%{prod.compute.name} has {out_channels} output channels, the BatchNorm {stats.mean.numel()}"
    if bias is not None and bias.numel() != out_channels:
        return f"the bias of %{prod.node.name} has {bias.numel()} values, not one per output channel"

    affine = bn_stats_affine(stats)
    w64 = to64(weight)
    if prod.rule == "conv_transpose":
        new_w = scale_grouped_axis1(w64, affine.scale, prod.groups)
    else:
        new_w = scale_axis(w64, affine.scale, prod.weight_axis)
    new_b = fold_bias(to64(bias) if bias is not None else None, affine)
    try:
        w_t = from64(np.ascontiguousarray(new_w), weight, f"weight of %{prod.compute.name}")
        b_t = from64(new_b, bias if bias is not None else weight, f"bias of %{prod.compute.name}")
    except RoundingError as exc:
        return str(exc)
    record = FoldedPair(rule=rule or prod.rule, producer_op=op_name(prod.compute), output=bn_output(bn).name,
                        norm_op=op_name(bn))
    return ProgramPlan(bn=bn, producer=prod.node, weight_node=prod.weight_node, weight=w_t, bias_node=prod.bias_node,
                 bias=b_t, record=record, mm_to_addmm=prod.mm_to_addmm)


def fold_program_graph(program: Any) -> ProgramFold:
    """Decide every BatchNorm of ``program`` (read only): a plan per foldable one, a Skip per other."""
    lifted = Lifted(program)
    out = ProgramFold()
    touched: set[Any] = set()
    for bn in bn_nodes(program.graph):
        planned = _plan(bn, lifted)
        if isinstance(planned, str):
            out.skipped.append(Skip(output=bn_output(bn).name, op_type=op_name(bn),
                                    reason=f"{op_name(bn)} %{bn.name}: {planned}"))
            continue
        nodes = {n for p in planned for n in (p.bn, bn_output(p.bn), p.producer, p.weight_node, p.bias_node,
                                               p.replacement) if n is not None}
        if nodes & touched:  # e.g. BN -> Conv -> BN: one folds forward, the other backward, into one weight
            out.deferred += 1
            continue
        touched |= nodes
        out.plans.extend(planned)
        out.folded.append(planned[-1].record)
    return out


def drop_placeholder(graph: Any, node: Any, spec: Any, specs: list[Any], state: dict[str, Any],
                     constants: dict[str, Any]) -> None:
    """Erase placeholder ``node`` and its input ``spec``; its tensor goes too once no other spec names it."""
    graph.erase_node(node)
    specs.remove(spec)
    if not any(s.target == spec.target for s in specs):
        state.pop(spec.target, None)
        constants.pop(spec.target, None)


def rebuilt(program: Any, gm: Any, specs: list[Any], outputs: list[Any], state: dict[str, Any],
            constants: dict[str, Any]) -> Any:
    """A new ExportedProgram around the edited graph module ``gm``: ``program``'s range constraints, module
    call graph, example inputs and verifiers kept; its signature, state and constants as given."""
    import torch
    from torch.export.graph_signature import ExportGraphSignature

    gm.graph.lint()
    gm.recompile()
    return torch.export.ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(input_specs=specs, output_specs=outputs),
        state_dict=state,
        range_constraints=copy.deepcopy(program.range_constraints),
        module_call_graph=copy.deepcopy(program.module_call_graph),
        example_inputs=program.example_inputs,
        constants=constants,
        verifiers=program.verifiers,
    )
