"""conv_transpose: fold a per-channel normalization into the ConvTranspose that produces its input.

Before:   ``t = ConvTranspose(X, W, B?)``; ``Y = BatchNormalization(t, gamma, beta, mean, var)``
After:    ``Y = ConvTranspose(X, W', B')``  (the BatchNormalization is gone; ``t`` no longer exists)
Conditions:
  - the ConvTranspose (any rank: 1-D, 2-D, 3-D; any group, stride, dilation, pads, auto_pad,
    output_padding, output_shape) is in the default domain; ``W`` (and ``B`` if present) are constants:
    initializers, ``Constant`` nodes, or constants of an enclosing graph, not graph inputs;
  - ``W`` is floating point (fp16, bf16, fp32, fp64), ``group >= 1`` divides ``W.shape[0]``, and
    ``W.shape[1] * group`` equals the channel count;
  - ``t`` feeds only the normalization and is not a graph output, or else (cloning allowed, the folded
    tensors within ``max_clone_bytes``) a folded clone of the ConvTranspose writes ``Y`` and the
    original keeps its other users;
  - the folded ``W'`` and ``B'`` are finite in the model's dtype (no fp16 overflow).
  A ``W`` shared with another node is not changed: the ConvTranspose gets a private folded copy.
  Strides, pads, output_padding and output_shape only move values between positions of one channel,
  and the bias is added at every output position (the output_padding rim included), so none of them
  changes the fold.
Formula:  the weight is ``[C_in, C_out/group, k...]``; output channel ``m = g * (C_out/group) + j`` is
          column ``j`` of the rows ``g * C_in/group ... (g+1) * C_in/group - 1``. So
          ``W'[g*C_in/group + i, j] = W[g*C_in/group + i, j] * scale[m]`` and
          ``B'[m] = B[m] * scale[m] + shift[m]`` (``B`` = 0 if absent), float64, each rounded once to
          ``W``'s dtype. Scaling axis 0, or axis 1 without the group split, is wrong for group > 1.
"""

from __future__ import annotations

from bnfold.folding.producers import weight_layout
from bnfold.folding.rules.base import Fold, FoldContext, Norm, Skip, producer_index
from bnfold.folding.rules.linear import fold_weight_bias
from bnfold.ir.nodes import attr

__all__ = ["NAME", "match"]

NAME = "conv_transpose"


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    view = ctx.view
    producer = producer_index(ctx, norm.input, "ConvTranspose")
    if producer is None:
        return None
    node = view.node(producer)
    group = int(attr(node, "group", 1))
    if group < 1:
        return ctx.skip(norm.output, norm.op_type, f"{view.describe(producer)} has group={group}")
    if len(node.input) > 1 and node.input[1]:
        weight = view.constant(node.input[1]).value
        if weight is not None and weight.ndim >= 2 and weight.shape[0] % group:
            return ctx.skip(
                norm.output, norm.op_type,
                f"weight '{node.input[1]}' of {view.describe(producer)} has {weight.shape[0]} input "
                f"channels, not a multiple of group={group}",
            )
    return fold_weight_bias(ctx, NAME, producer, norm, weight_layout(node))
