"""TorchScript: fold a BatchNorm forward into the Linear or unpadded convolution that reads it (the ONNX
rules ``bn_gemm`` and ``bn_conv``, same math).

Before::

    %y = aten::batch_norm(%x, ...)             # no Conv / ConvTranspose / Linear before it to fold into
    %z = aten::linear(%y, %W, %b)              # or aten::conv{1,2,3}d(%y, %W, %b, stride, padding, ...)

After::

    %z = aten::linear(%x, %W', %b')            # %W', %b' new constants; the BatchNorm is gone

Conditions (otherwise the backward refusal stands, with the forward one added):

* ``%y`` has exactly one use, as the input (argument 0) of that Linear / convolution, and is not returned;
* Linear: the BatchNorm input has rank 2 ([N, C]: Linear's feature axis is BatchNorm's axis 1), observed
  by running the model; weight a constant floating-point ``[K, C]``, bias constant or None;
* convolution (``aten::conv{1,2,3}d``): batched, constant weight / bias / ``groups``, and ``padding``
  all zeros or ``'valid'`` (padding inserts zeros after the shift), unless the shift is zero everywhere;
* the folded tensors are finite in the weight's dtype.

Formula (float64, each tensor rounded once): Linear ``W' = W * scale`` on axis 1, ``b' = b + W @ shift``;
convolution: :func:`bnfold.folding.math.fold_into_conv_input`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bnfold.folding.math import RoundingError, fold_into_conv_input, fold_into_linear_input
from bnfold.folding.result import FoldedPair, Skip
from bnfold.torch.ir import const, describe, floating
from bnfold.torch.producers import BnStats, Plan, bn_stats_affine, from64, to64

__all__ = ["plan_forward"]

_CONVS = frozenset({"aten::conv1d", "aten::conv2d", "aten::conv3d"})


def plan_forward(
    bn: Any, stats: BnStats, rank: int | None, skip: Callable[[str], Skip], graph_label: str
) -> Plan | Skip | None:
    """A forward fold of ``bn`` into its one reader, a Skip saying why not, or None when that reader is
    not a Linear / convolution at all."""
    y = bn.outputsAt(0)
    uses = list(y.uses())
    if len(uses) != 1:
        return None
    user, offset = uses[0].user, uses[0].offset
    kind = user.kind()
    if kind != "aten::linear" and kind not in _CONVS:
        return None
    udesc = describe(user)
    if offset != 0:
        return skip(f"{udesc} reads it as a weight or bias, not as its input")
    ok_w, weight = const(user.inputsAt(1))
    ok_b, bias = const(user.inputsAt(2))
    if not (ok_w and floating(weight)):
        return skip(f"the weight of the following {udesc} is not a constant floating-point tensor")
    if not (ok_b and (bias is None or floating(bias))):
        return skip(f"the bias of the following {udesc} is not a constant")
    affine = bn_stats_affine(stats)
    channels = affine.channels
    w64 = to64(weight)
    b64 = to64(bias) if bias is not None else None
    if kind == "aten::linear":
        if rank != 2:
            what = "unknown" if rank is None else str(rank)
            return skip(f"the following {udesc} contracts the last axis, and the BatchNorm input's rank is {what}, "
                        "not 2, so its channel axis 1 is not the Linear's feature axis")
        if weight.dim() != 2 or weight.shape[1] != channels:
            return skip(f"the following {udesc} has weight shape {list(weight.shape)}, not [K, {channels}]")
        new_w, contribution = fold_into_linear_input(w64, affine, 1)
        new_b = contribution + (b64 if b64 is not None else 0.0)
        rule = "bn_gemm"
    else:
        ok_p, padding = const(user.inputsAt(4))
        ok_g, groups = const(user.inputsAt(6))
        if not ok_p or not ok_g or not isinstance(groups, int) or groups < 1:
            return skip(f"the following {udesc} has a non-constant padding or groups")
        pads = padding if isinstance(padding, str) else list(padding)
        padded = pads == "same" or (not isinstance(pads, str) and any(int(p) for p in pads))
        if padded and np.any(affine.shift):
            return skip(f"the following {udesc} pads its input (padding={pads}), and the padded zeros would not "
                        "be normalized, so the fold would not be exact")
        if rank is not None and rank != weight.dim():
            return skip(f"the following {udesc} is unbatched")
        if weight.shape[1] * groups != channels or weight.shape[0] % groups:
            return skip(f"the following {udesc} has {weight.shape[1] * groups} input channels, the BatchNorm "
                        f"{channels}")
        new_w, new_b = fold_into_conv_input(w64, b64, affine, groups)
        rule = "bn_conv"
    try:
        w_t = from64(new_w, weight, f"weight of {udesc}")
        b_t = from64(new_b, bias if bias is not None else weight, f"bias of {udesc}")
    except RoundingError as exc:
        return skip(str(exc))
    record = FoldedPair(rule=rule, producer_op=kind, output=y.debugName(), norm_op=bn.kind(), graph=graph_label)
    return Plan(bn=bn, producer=user, weight=w_t, bias=b_t, record=record)
