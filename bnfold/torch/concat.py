"""TorchScript: a BatchNorm after ``aten::cat`` of Conv / ConvTranspose / Linear outputs (MixNet-style mixed
convolutions), split by channel range and folded into each producer (the ONNX rule ``concat``).

Before::

    %a = aten::conv2d(%x, %Wa, %ba, ...)
    %b = aten::conv2d(%x, %Wb, %bb, ...)
    %t = aten::cat(prim::ListConstruct(%a, %b), 1)
    %z = aten::batch_norm(%t, ...)

After::

    %a = aten::conv2d(%x, %Wa', %ba', ...); %b = aten::conv2d(%x, %Wb', %bb', ...); %z is %t

Conditions: ``cat`` joins along the BatchNorm's axis 1 (a negative dim read against the observed rank);
its output feeds only the BatchNorm; every joined value is the output of a supported producer read only
by the list, and each producer's own conditions hold for its channel range (``producers.plan_fold``).

Formula: channels ``o_i .. o_i + C_i`` of the BatchNorm are producer ``i``'s: its statistics are those
slices, folded as usual (float64, rounded once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from bnfold.folding.result import FoldedPair, Skip
from bnfold.torch.ir import const, describe, other_uses
from bnfold.torch.producers import PRODUCERS, BnStats, Plan, plan_fold

__all__ = ["CatPlan", "plan_concat"]


@dataclass(eq=False)
class CatPlan:
    """Every part decided: applying rewrites each producer, then removes the BatchNorm once."""

    bn: Any
    parts: list[Plan]
    record: FoldedPair


def _channels(producer: Any) -> int | None:
    op = PRODUCERS[producer.kind()]
    ok_w, weight = const(producer.inputsAt(1))
    if not ok_w or weight is None or not hasattr(weight, "shape") or weight.dim() < 2:
        return None
    transposed = op.rule == "conv_transpose"
    if op.transposed is not None:
        ok, flag = const(producer.inputsAt(op.transposed))
        if not ok:
            return None
        transposed = bool(flag)
    if not transposed:
        return int(weight.shape[0])
    groups = 1
    if op.groups is not None:
        ok, groups = const(producer.inputsAt(op.groups))
        if not ok or not isinstance(groups, int):
            return None
    return int(weight.shape[1]) * groups


def plan_concat(
    bn: Any, stats: BnStats, rank: int | None, skip: Callable[[str], Skip], graph_label: str
) -> CatPlan | Skip:
    """Fold ``bn`` (its input written by ``aten::cat``) into the producers of the joined values."""
    cat = bn.inputsAt(0).node()
    desc = describe(cat)
    listed = cat.inputsAt(0).node()
    if listed.kind() != "prim::ListConstruct":
        return skip(f"it follows {desc}, whose list of tensors is built at run time")
    ok, dim = const(cat.inputsAt(1))
    if not ok or not isinstance(dim, int):
        return skip(f"it follows {desc}, which joins along a dimension computed at run time")
    if dim < 0:
        if rank is None:
            return skip(f"it follows {desc}, which joins along dim {dim} of a tensor of unknown rank")
        dim %= rank
    if dim != 1:
        return skip(f"it follows {desc}, which joins along dim {dim}, not the BatchNorm's channel axis 1")
    parts: list[Plan] = []
    offset = 0
    total = stats.mean.numel()
    values = list(listed.inputs())
    for i, value in enumerate(values):
        producer = value.node()
        which = f"cat input {i} %{value.debugName()}"
        if producer.kind() not in PRODUCERS:
            source = "a graph input" if producer.kind() == "prim::Param" else describe(producer)
            return skip(f"it follows {desc}, and {which} comes from {source}, not from a Conv, ConvTranspose "
                        "or Linear")
        if sum(1 for v in values if v.unique() == value.unique()) > 1:
            return skip(f"it follows {desc}, which joins {which} more than once")
        shared = other_uses(value, listed)
        if shared:
            return skip(f"it follows {desc}, and {which} cannot take its part: {shared}")
        c = _channels(producer)
        if c is None or offset + c > total:
            return skip(f"it follows {desc}, and the channel count of {which} is not known or too large")
        sl = slice(offset, offset + c)
        part = BnStats(gamma=None if stats.gamma is None else stats.gamma[sl],
                       beta=None if stats.beta is None else stats.beta[sl],
                       mean=stats.mean[sl], var=stats.var[sl], eps=stats.eps)
        offset += c

        def part_skip(reason: str, which: str = which) -> Skip:
            return skip(f"it follows {desc}, and {which} cannot take its part: {reason}")

        planned = plan_fold(bn, producer, part, 1, rank, part_skip, graph_label)
        if isinstance(planned, Skip):
            return planned
        parts.append(planned)
    if offset != total:
        return skip(f"it follows {desc}, whose inputs have {offset} channels, the BatchNorm {total}")
    first = parts[0].record
    return CatPlan(bn=bn, parts=parts, record=replace(first, rule="concat"))
