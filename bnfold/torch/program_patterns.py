"""torch.export programs: the folds beyond "BatchNorm after its producer" that the ONNX rules ``bn_gemm``,
``bn_conv``, ``concat`` and ``layout`` make, with the same math (:mod:`bnfold.folding.math`).

Forward (``bn_gemm`` / ``bn_conv``), tried when the backward fold is refused::

    %y = aten.batch_norm(%x, ...)          ->   %z = aten.linear(%x, %W', %b')
    %z = aten.linear(%y, %W, %b)                # addmm(%b, %y, permute(%W)), mm(%y, permute(%W)) or
                                                # conv{1,2,3}d / convolution with no padding

Concat (``concat``)::

    %t = aten.cat([%a, %b], 1)             ->   %a, %b from their producers with W', b' (each its channel
    %z = aten.batch_norm(%t, ...)               range of the BatchNorm); %z is %t

Layout (``layout``): Linear on tokens, flattened to ``[M, C]`` (LeViT) or transposed to ``[N, C, T]``::

    %y = aten.linear(%x, %W, %b)           ->   %y = aten.linear(%x, %W', %b')
    %f = aten.flatten(%y, 0, -2)                # or view / reshape / _unsafe_view to [M, C], or
    %z = aten.batch_norm(%f, ...)               # permute / transpose / t bringing the last axis to 1; %z is %f

Conditions (each failing one is a refusal naming the node):

* forward: the BatchNorm's output has one reader, which reads it as its input (argument 0); Linear / mm /
  addmm: the BatchNorm input has rank 2 (its axis 1 is the contracted feature axis); convolution: batched,
  ``padding`` zero (padded zeros would not be normalized) unless the shift is zero, not transposed,
  constant ``groups``; the weight (and bias) lifted tensors read by that op only;
* concat: ``cat`` joins along axis 1 (a negative dim read against the rank), its output feeds only the
  BatchNorm, each input is a distinct producer's output read only by the ``cat``, each producer's own
  conditions hold for its channel range; the ranges cover the BatchNorm's channels;
* layout: the layout op's input is the output of a Linear / addmm / mm (channels on its last axis), directly
  or through views whose last dimension is the channel count, each read only by the next op (shape queries
  such as ``reshape_as(..., %y)`` aside); a view / flatten / reshape gives a 2-D ``[M, C]`` (row-major: each
  row is one token's channels); a permute / transpose takes the BatchNorm's axis 1 from the last axis.

Formula: forward ``W' = W * scale`` on the input features, ``b' = b + W @ shift``
(:func:`bnfold.folding.math.fold_into_linear_input`), or :func:`bnfold.folding.math.fold_into_conv_input`;
concat and layout: the backward fold of each part, statistics sliced by channel range. Float64, rounded once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnfold.folding.math import RoundingError, fold_into_conv_input, fold_into_linear_input
from bnfold.folding.result import FoldedPair
from bnfold.torch.producers import BnStats, bn_stats_affine, from64, to64
from bnfold.torch.program_fold import (
    Lifted,
    ProgramPlan,
    bn_output,
    matmul_weight,
    only_reader,
    op_name,
    plan_into,
)

__all__ = ["LAYOUT_OPS", "plan_concat", "plan_forward", "plan_layout"]

_VIEWS = frozenset({"aten::flatten", "aten::view", "aten::reshape", "aten::_unsafe_view"})
_TRANSPOSES = frozenset({"aten::permute", "aten::transpose", "aten::t"})
LAYOUT_OPS = _VIEWS | _TRANSPOSES
"""The layout ops a BatchNorm is folded through (into the Linear before them)."""
_CONVS = frozenset({"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution"})
_LINEARS = frozenset({"aten::linear", "aten::addmm", "aten::mm"})
_SHAPE_READERS = frozenset({"aten::reshape_as", "aten::view_as", "aten::expand_as"})


def _shape(node: Any) -> tuple[Any, ...] | None:
    val: Any = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(val.shape) if hasattr(val, "shape") else None


def _rank(node: Any) -> int | None:
    shape = _shape(node)
    return None if shape is None else len(shape)


def _sliced(stats: BnStats, sl: slice) -> BnStats:
    return BnStats(gamma=None if stats.gamma is None else stats.gamma[sl],
                   beta=None if stats.beta is None else stats.beta[sl],
                   mean=stats.mean[sl], var=stats.var[sl], eps=stats.eps)


def plan_forward(bn: Any, stats: BnStats, lifted: Lifted) -> ProgramPlan | str | None:
    """Fold ``bn`` into its one reader, a Linear / addmm / mm / unpadded convolution: a plan, the reason it
    cannot, or None when its reader is not such an op."""
    out = bn_output(bn)
    users = list(out.users)
    if len(users) != 1:
        return None
    user = users[0]
    kind = op_name(user)
    if kind not in _LINEARS and kind not in _CONVS:
        return None
    what = f"it cannot fold into the following {kind} %{user.name}"
    source = bn.args[0]
    data_arg = 1 if kind == "aten::addmm" else 0
    if user.args[data_arg] is not out or any(a is out for i, a in enumerate(user.args) if i != data_arg):
        return f"{what}: it reads the BatchNorm as a weight or bias, not as its input"
    rank = _rank(source)
    affine = bn_stats_affine(stats)
    transpose = None
    if kind in _LINEARS:
        if rank != 2:
            return (f"{what}: that op contracts the last axis, and the BatchNorm input's rank is "
                    f"{'unknown' if rank is None else rank}, not 2")
        if kind == "aten::addmm" and (user.kwargs.get("beta", 1) != 1 or user.kwargs.get("alpha", 1) != 1):
            return f"{what}: alpha or beta is not 1"
        if kind == "aten::linear":
            weight_node, features_axis = user.args[1], 1
        else:
            found = matmul_weight(user.args[2] if kind == "aten::addmm" else user.args[1])
            if isinstance(found, str):
                return f"{what}: {found}"
            weight_node, out_axis, transpose = found
            features_axis = 1 - out_axis
        bias_node = user.args[0] if kind == "aten::addmm" else (user.args[2] if len(user.args) > 2 else None)
        rule = "bn_gemm"
    else:
        weight_node = user.args[1]
        bias_node = user.args[2] if len(user.args) > 2 else None
        if kind == "aten::convolution":
            if user.args[6]:
                return f"{what}: it is transposed"
            padding, groups = user.args[4], user.args[8]
        else:
            padding = user.args[4] if len(user.args) > 4 else [0]
            groups = user.args[6] if len(user.args) > 6 else 1
        if not isinstance(groups, int):
            return f"{what}: its groups is symbolic"
        padded = padding == "same" or (not isinstance(padding, str) and any(p != 0 for p in padding))
        if padded and np.any(affine.shift):
            return (f"{what}: it pads its input (padding={padding}), and the padded zeros would not be "
                    "normalized, so the fold would not be exact")
        rule = "bn_conv"
    weight = lifted.tensor(weight_node)
    if weight is None or not weight.is_floating_point():
        return f"{what}: its weight is not a lifted floating-point tensor"
    if len(weight_node.users) != 1 or (transpose is not None and len(transpose.users) != 1):
        return f"{what}: its weight {weight_node.name} is shared with another op"
    bias = None
    if bias_node is not None:
        bias = lifted.tensor(bias_node)
        if bias is None or bias.dim() != 1 or len(bias_node.users) != 1:
            return f"{what}: its bias is not a lifted 1-D tensor read by it only"
    channels = affine.channels
    w64 = to64(weight)
    if rule == "bn_gemm":
        if weight.dim() != 2 or weight.shape[features_axis] != channels:
            return f"{what}: its weight has shape {list(weight.shape)}, not {channels} input features"
        new_w, new_b = fold_into_linear_input(w64, affine, features_axis)
        if bias is not None:
            new_b = new_b + to64(bias)
    else:
        if rank is not None and rank != weight.dim():
            return f"{what}: it is unbatched"
        if weight.shape[1] * groups != channels or weight.shape[0] % groups:
            return f"{what}: it has {weight.shape[1] * groups} input channels, the BatchNorm {channels}"
        new_w, new_b = fold_into_conv_input(w64, to64(bias) if bias is not None else None, affine, groups)
    try:
        w_t = from64(np.ascontiguousarray(new_w), weight, f"weight of %{user.name}")
        b_t = from64(new_b, bias if bias is not None else weight, f"bias of %{user.name}")
    except RoundingError as exc:
        return f"{what}: {exc}"
    record = FoldedPair(rule=rule, producer_op=kind, output=out.name, norm_op=op_name(bn))
    return ProgramPlan(bn=bn, producer=user, weight_node=weight_node, weight=w_t, bias_node=bias_node, bias=b_t,
                       record=record, mm_to_addmm=kind == "aten::mm", replacement=source)


def plan_concat(bn: Any, stats: BnStats, cat: Any, lifted: Lifted) -> list[ProgramPlan] | str:
    """Split ``bn`` (its input written by ``aten.cat``) by channel range and fold each part into its producer."""
    desc = f"aten::cat %{cat.name}"
    bad = only_reader(cat, bn)
    if bad:
        return bad
    values, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    rank = _rank(cat)
    if not isinstance(dim, int):
        return f"it follows {desc}, which joins along a symbolic dimension"
    if dim < 0:
        if rank is None:
            return f"it follows {desc}, which joins along dim {dim} of a tensor of unknown rank"
        dim %= rank
    if dim != 1:
        return f"it follows {desc}, which joins along dim {dim}, not the BatchNorm's channel axis 1"
    total, offset = stats.mean.numel(), 0
    parts: list[ProgramPlan] = []
    for i, value in enumerate(values):
        which = f"cat input {i} %{getattr(value, 'name', value)}"
        if sum(1 for v in values if v is value) > 1:
            return f"it follows {desc}, which joins {which} more than once"
        shape = _shape(value)
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
            return f"it follows {desc}, and the channel count of {which} is not known"
        c = int(shape[1])
        if offset + c > total:
            return f"it follows {desc}, whose inputs have more channels than the BatchNorm's {total}"
        part = plan_into(bn, _sliced(stats, slice(offset, offset + c)), value, lifted, rule="concat")
        shared = only_reader(value, cat)
        if isinstance(part, str) or shared:
            return f"it follows {desc}, and {which} cannot take its part: {part if isinstance(part, str) else shared}"
        part.remove_bn = False
        parts.append(part)
        offset += c
    if offset != total:
        return f"it follows {desc}, whose inputs have {offset} channels, the BatchNorm {total}"
    parts[-1].remove_bn = True
    parts[-1].replacement = cat
    return parts


def _axis_before(layout: Any, axis: int) -> int | None:
    """The input axis of a permute / transpose / t that becomes its output ``axis`` (None: unknown)."""
    kind, rank = op_name(layout), _rank(layout)
    if kind == "aten::t":
        return 1 - axis if rank == 2 else axis
    if rank is None:
        return None
    if kind == "aten::permute":
        perm = [int(p) % rank for p in layout.args[1]]
        return perm[axis]
    a, b = (int(d) % rank for d in layout.args[1:3])
    return b if axis == a else a if axis == b else axis


def plan_layout(bn: Any, stats: BnStats, layout: Any, lifted: Lifted) -> ProgramPlan | str:
    """Fold ``bn`` through a flatten / view / reshape to ``[M, C]``, or a permute / transpose that brings the
    last axis to axis 1, into the Linear before it."""
    desc = f"{op_name(layout)} %{layout.name}"
    bad = only_reader(layout, bn)
    if bad:
        return bad
    channels = stats.mean.numel()
    if op_name(layout) in _TRANSPOSES:
        inner, outer = layout.args[0], layout
        source_axis, rank = _axis_before(layout, 1), _rank(inner)
        if source_axis is None or rank is None or source_axis != rank - 1:
            return (f"it follows {desc}, which brings axis {source_axis} of %{inner.name} to the BatchNorm's axis "
                    "1, not its last axis (a Linear's channels)")
    else:
        after = _shape(layout)
        if after is None or len(after) != 2:
            return f"it follows {desc}, whose result is not a 2-D tensor of known shape"
        inner, outer = layout.args[0], layout
    while True:
        before = _shape(inner)
        if before is None or len(before) < 2 or before[-1] != channels:
            shown = "unknown" if before is None else list(before)
            return (f"it follows {desc}, and %{inner.name} has shape {shown}: the BatchNorm's axis 1 is not "
                    "provably the last axis of a Linear")
        others = [u for u in inner.users if u is not outer and not (
            op_name(u) in _SHAPE_READERS and u.args[0] is not inner)]
        if others:
            return f"it follows {desc}, and %{inner.name} also feeds {others[0].name}"
        if op_name(inner) not in _VIEWS:
            break
        inner, outer = inner.args[0], inner
    is_linear = op_name(inner) in _LINEARS or (op_name(inner) == "aten::add" and any(
        op_name(a) == "aten::mm" for a in inner.args if hasattr(a, "op")))
    if not is_linear:
        return (f"it follows {desc} of %{inner.name} ({op_name(inner) or inner.op}), not of a Linear, addmm "
                "or mm whose channels are its last axis")
    planned = plan_into(bn, stats, inner, lifted, axis=len(before) - 1, rule="layout")
    if isinstance(planned, str):
        return planned
    planned.replacement = layout
    return planned
