"""Reading an inference BatchNormalization as a per-channel affine map (the source, not a rule).

Before:   ``Y = BatchNormalization(X, scale, B, mean, var)``  (any opset: 1, 6, 7, 9, 14, 15)
After:    ``Norm(scale = scale/sqrt(var+eps), shift = B - mean*scale, channel axis 1)``
Conditions:
  - inference mode: no ``training_mode=1``, no ``is_test=0`` (opset 1/6), no extra outputs;
  - ``scale``, ``B``, ``mean``, ``var`` are constants with C elements each
    (opset 6/7 ``spatial=0`` only when the statistics hold one value per channel);
  - every statistic finite and ``var + epsilon > 0`` (otherwise the original computes NaN/inf);
  - ``epsilon`` defaults to 1e-5 when absent.
Formula:  ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` in float64.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.math import bn_affine
from bnfold.folding.rules.base import FoldContext, Norm, Skip
from bnfold.ir.nodes import attr

__all__ = ["NEVER_FOLDABLE", "bn_norm"]

DEFAULT_EPSILON = 1e-5

NEVER_FOLDABLE = {
    "LayerNormalization": "LayerNormalization computes its statistics from each input at run time; "
    "there is nothing fixed to fold",
    "InstanceNormalization": "InstanceNormalization computes its statistics from each input at run time; "
    "there is nothing fixed to fold",
    "GroupNormalization": "GroupNormalization computes its statistics from each input at run time; "
    "there is nothing fixed to fold",
    "RMSNormalization": "RMSNormalization computes its statistics from each input at run time; "
    "there is nothing fixed to fold",
    "LpNormalization": "LpNormalization divides by a norm computed from each input at run time",
    "MeanVarianceNormalization": "MeanVarianceNormalization computes its statistics from each input "
    "at run time",
}


def bn_norm(ctx: FoldContext, idx: int) -> Norm | Skip:
    """The BatchNormalization at ``idx`` as a :class:`Norm`, or why it is not a fixed affine map."""
    view = ctx.view
    node = view.node(idx)
    out = node.output[0]

    def skip(reason: str) -> Skip:
        return ctx.skip(out, "BatchNormalization", reason)

    if attr(node, "training_mode", 0):
        return skip(f"{view.describe(idx)} has training_mode=1: it normalizes with batch statistics")
    # BatchNormalization-1 and -6 default to training (is_test=0); opset 7 removed the attribute
    legacy = 0 < ctx.opset < 7
    if attr(node, "is_test", 0 if legacy else 1) == 0:
        return skip(f"{view.describe(idx)} is in training mode (is_test=0, the default before opset 7)")
    extra = [o for o in node.output[1:] if o]
    if extra:
        return skip(
            f"{view.describe(idx)} has extra outputs ({', '.join(repr(o) for o in extra)}): "
            "running or saved statistics are training-mode outputs"
        )
    if len(node.input) < 5 or not all(node.input[:5]):
        return skip(f"{view.describe(idx)} does not have the five inputs X, scale, B, mean, var")
    stats: list[np.ndarray] = []
    for role, name in zip(("scale", "bias", "mean", "variance"), node.input[1:5], strict=True):
        found = view.constant(name)
        if found.value is None:
            return skip(f"BatchNormalization {role} '{name}' {found.why_not}")
        stats.append(np.asarray(found.value, dtype=np.float64))
    sizes = {s.size for s in stats}
    if len(sizes) != 1:
        return skip(f"{view.describe(idx)} has statistics of different sizes {sorted(sizes)}")
    if attr(node, "spatial", 1) == 0 and any(s.ndim > 1 and s.size != s.shape[0] for s in stats):
        return skip(
            f"{view.describe(idx)} has spatial=0 with per-position statistics of shape "
            f"{list(stats[0].shape)}: not one value per channel"
        )
    for role, name, s in zip(("scale", "bias", "mean", "variance"), node.input[1:5], stats, strict=True):
        if not np.all(np.isfinite(s)):
            return skip(f"BatchNormalization {role} '{name}' contains NaN or inf")
    eps = float(attr(node, "epsilon", DEFAULT_EPSILON))
    if not np.all(stats[3] + float(np.float32(eps)) > 0):
        return skip(
            f"BatchNormalization variance '{node.input[4]}' plus epsilon is not positive somewhere: "
            "the original computes NaN or inf there"
        )
    return Norm(
        nodes=(idx,),
        input=node.input[0],
        output=out,
        affine=bn_affine(stats[0], stats[1], stats[2], stats[3], eps),
        channel_axis=1,
        op_type="BatchNormalization",
    )
