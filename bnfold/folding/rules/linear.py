"""Shared mechanics for producers of the form ``op(X, W, B?)`` with a per-output-channel bias.

Conv, ConvTranspose (and any op whose output channel ``c`` is ``W``-slice ``c`` plus ``B[c]``) fold the
same way: check the producer owns its output, read ``W`` and ``B`` as constants, scale ``W`` on the
output-channel layout, fold the bias, round once, and rebuild the node writing the normalization's
output. Only the weight layout differs: each rule passes its producer's :class:`WeightLayout`.

A producer whose output also feeds another node, or is a graph output, is cloned when
``options.clone`` allows and the folded tensors fit in ``options.max_clone_bytes``: the clone (inserted
just before the original) carries the folded weights and writes the normalization's output, the
original is untouched and keeps its other users. Otherwise the fold is refused with the reason.
"""

from __future__ import annotations

from bnfold.folding.math import RoundingError, WeightLayout, fold_bias
from bnfold.folding.rules.base import (
    Fold,
    FoldContext,
    Norm,
    Skip,
    clone_refusal,
    copy_node,
    new_tensor,
    producer_fold,
    rounding_skip,
    sole_consumer_skip,
    unique_node_name,
    weight_and_bias,
)

__all__ = ["fold_weight_bias"]


def fold_weight_bias(
    ctx: FoldContext,
    rule: str,
    producer: int,
    norm: Norm,
    layout: WeightLayout,
) -> Fold | Skip:
    view = ctx.view
    node = view.node(producer)
    desc = view.describe(producer)
    if norm.channel_axis != 1:
        return ctx.skip(
            norm.output, norm.op_type, f"the normalization's channel axis {norm.channel_axis} is not "
            f"the channel axis (1) of {desc}"
        )
    conflict = sole_consumer_skip(ctx, producer, norm)
    if conflict is not None and not ctx.options.clone:
        refusal = clone_refusal(ctx, norm, conflict, 0)  # always a Skip: cloning is off
        if refusal is not None:
            return refusal
    read = weight_and_bias(ctx, norm, node, desc, ("weight", "bias"))
    if isinstance(read, Skip):
        return read
    weight, bias = read
    w_name = node.input[1]
    b_name = node.input[2] if bias is not None else None
    if weight.ndim < 2:
        return ctx.skip(norm.output, norm.op_type, f"weight '{w_name}' of {desc} has rank {weight.ndim}")
    channels = layout.channels(weight.shape)
    if channels != norm.affine.channels:
        return ctx.skip(
            norm.output, norm.op_type,
            f"{desc} has {channels} output channels but the normalization has {norm.affine.channels}",
        )
    if bias is not None and bias.size != channels:
        return ctx.skip(norm.output, norm.op_type, f"bias '{b_name}' of {desc} has {bias.size} values, "
                        f"not {channels}")
    if conflict is not None:  # decided before computing (or, for a large model, spilling) any tensor
        refusal = clone_refusal(ctx, norm, conflict, weight.nbytes + channels * weight.itemsize)
        if refusal is not None:
            return refusal
    try:
        w_new = new_tensor(ctx, layout.scale(weight, norm.affine.scale), weight.dtype, f"{w_name}_bnfold",
                           f"weight of {desc}")
        b_new = new_tensor(ctx, fold_bias(bias, norm.affine), weight.dtype,
                           f"{b_name or node.output[0]}_bnfold_bias", f"bias of {desc}")
    except RoundingError as exc:
        return rounding_skip(ctx, norm, exc)
    inputs = [node.input[0], w_new.name, b_new.name, *node.input[3:]]
    if conflict is not None:
        # the producer keeps its other users; a clone next to it writes the normalization's output
        new_node = copy_node(node, inputs=inputs, outputs=[norm.output], name=unique_node_name(view, node))
    else:
        new_node = copy_node(node, inputs=inputs, outputs=[norm.output, *node.output[1:]])
    return producer_fold(ctx, rule, producer, norm, new_node, (w_new, b_new), clone=conflict is not None)
