"""The producers a BatchNorm folds into, and the folded tensors for one accepted pair.

========================  ======================================  ===================================
op                        weight layout                           BatchNorm scale applied on
========================  ======================================  ===================================
aten::conv{1,2,3}d        [C_out, C_in/g, k...]                   axis 0
aten::conv_transpose{k}d  [C_in, C_out/g, k...]                   axis 1, within each of the g groups
aten::_convolution,       either, by the constant ``transposed``  as above
aten::convolution
aten::linear              [out, in]                               axis 0
========================  ======================================  ===================================

The output-channel axis is 1 for a batched convolution, 0 for an unbatched one, the last axis for a
Linear; the BatchNorm must normalize exactly that axis.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.folding.math import (
    Affine,
    RoundingError,
    WeightLayout,
    bn_affine,
    fold_bias,
    round_to,
)
from bnfold.folding.result import FoldedPair, Skip
from bnfold.torch.ir import const, describe, floating

if TYPE_CHECKING:
    import torch

__all__ = ["LAYOUTS", "PRODUCERS", "BnStats", "Plan", "ProducerOp", "plan_fold"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProducerOp:
    rule: str
    """"conv", "conv_transpose" or "linear"; generic convolutions decide by their ``transposed`` input."""
    transposed: int | None = None
    """Input index of the ``transposed`` flag (generic convolutions)."""
    groups: int | None = None
    """Input index of ``groups`` where it matters (transposed convolutions)."""


PRODUCERS: dict[str, ProducerOp] = {
    **{f"aten::conv{k}d": ProducerOp("conv") for k in (1, 2, 3)},
    **{f"aten::conv_transpose{k}d": ProducerOp("conv_transpose", groups=6) for k in (1, 2, 3)},
    "aten::_convolution": ProducerOp("conv", transposed=6, groups=8),
    "aten::convolution": ProducerOp("conv", transposed=6, groups=8),
    "aten::linear": ProducerOp("linear"),
}
"""Weight is input 1 and bias (possibly None) input 2 for every one of them."""


LAYOUTS: dict[str, Callable[[int], WeightLayout]] = {
    "conv": lambda groups: WeightLayout(0),
    "conv_transpose": lambda groups: WeightLayout(1, groups=groups),
    "linear": lambda groups: WeightLayout(0),
}
"""Where each rule's weight has its output channels (``[C_out, C_in/g, k...]``, ``[C_in, C_out/g, k...]``,
``[out, in]``): the layouts the fold math scales (:class:`bnfold.folding.math.WeightLayout`)."""


@dataclass(frozen=True)
class BnStats:
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


@dataclass(eq=False)
class Plan:
    """An accepted fold, every tensor computed: applying it cannot fail."""

    bn: Any  # torch._C.Node
    producer: Any
    weight: torch.Tensor
    bias: torch.Tensor
    record: FoldedPair


def to64(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.detach().to(torch.float64).cpu().numpy()


def from64(values: np.ndarray, like: torch.Tensor, what: str) -> torch.Tensor:
    """Round float64 ``values`` once to ``like``'s dtype (RoundingError on overflow)."""
    import ml_dtypes
    import torch

    if like.dtype == torch.bfloat16:
        rounded = round_to(values, np.dtype(ml_dtypes.bfloat16), what)
        return torch.from_numpy(rounded.view(np.uint16).copy()).view(torch.bfloat16)
    np_dtype = torch.empty((), dtype=like.dtype).numpy().dtype
    return torch.from_numpy(round_to(values, np_dtype, what).copy())


def bn_stats_affine(stats: BnStats) -> Affine:
    """BN as scale/shift in float64. torch adds eps in the statistics' compute type: float32 unless the
    statistics are float64."""
    import torch

    c = stats.mean.numel()
    g = to64(stats.gamma) if stats.gamma is not None else np.ones(c)
    b = to64(stats.beta) if stats.beta is not None else np.zeros(c)
    return bn_affine(g, b, to64(stats.mean), to64(stats.var), stats.eps,
                     eps_float32=stats.mean.dtype != torch.float64)


def plan_fold(
    bn: Any,
    producer: Any,
    stats: BnStats,
    axis: int,
    rank: int | None,
    skip: Callable[[str], Skip],
    graph_label: str,
) -> Plan | Skip:
    """Fold ``bn`` (normalizing ``axis`` of ``producer``'s output, of rank ``rank`` if known)."""
    op = PRODUCERS[producer.kind()]
    pdesc = describe(producer)
    ok_w, weight = const(producer.inputsAt(1))
    ok_b, bias = const(producer.inputsAt(2))
    if not (ok_w and floating(weight)):
        return skip(f"the weight of {pdesc} is not a constant floating-point tensor")
    if not (ok_b and (bias is None or floating(bias))):
        return skip(f"the bias of {pdesc} is not a constant")
    rule = op.rule
    if op.transposed is not None:
        ok, transposed = const(producer.inputsAt(op.transposed))
        if not ok:
            return skip(f"{pdesc} has a non-constant `transposed` flag")
        rule = "conv_transpose" if transposed else "conv"
    groups = 1
    if op.groups is not None:
        ok, groups = const(producer.inputsAt(op.groups))
        if not ok or not isinstance(groups, int) or groups < 1:
            return skip(f"{pdesc} has a non-constant `groups`")

    if rule == "linear":
        if rank is None:
            return skip(
                f"the rank of the output of {pdesc} is unknown, so it is not proven that BatchNorm's axis 1 "
                "is its feature axis (give example input shapes)"
            )
        channel_axis, out_channels = rank - 1, weight.shape[0]
    else:
        batched = rank is None or rank == weight.dim()  # [N, C, *spatial] vs unbatched [C, *spatial]
        channel_axis = 1 if batched else 0
        out_channels = weight.shape[1] * groups if rule == "conv_transpose" else weight.shape[0]
        if rank is None:
            log.debug("%s: rank unknown, assuming a batched convolution output", pdesc)
    if axis != channel_axis:
        return skip(f"it normalizes axis {axis} of the output of {pdesc}, whose channel axis is {channel_axis}")
    if out_channels != stats.mean.numel():
        return skip(f"{pdesc} has {out_channels} output channels, the BatchNorm {stats.mean.numel()}")

    affine = bn_stats_affine(stats)
    w64 = to64(weight)
    new_w = LAYOUTS[rule](groups).scale(w64, affine.scale)
    new_b = fold_bias(to64(bias) if bias is not None else None, affine)
    try:
        w_t = from64(new_w, weight, f"weight of {pdesc}")
        b_t = from64(new_b, bias if bias is not None else weight, f"bias of {pdesc}")
    except RoundingError as exc:
        return skip(str(exc))
    record = FoldedPair(
        rule=rule,
        producer_op=producer.kind(),
        output=bn.outputsAt(0).debugName(),
        norm_op=bn.kind(),
        graph=graph_label,
    )
    return Plan(bn=bn, producer=producer, weight=w_t, bias=b_t, record=record)
