"""bn_conv: fold a normalization into the Conv(s) that follow it, on their input side.

Before:   ``Y = BatchNormalization(X, gamma, beta, mean, var)``; ``Z_i = Conv_i(Y, W_i, B_i?)`` for every
          consumer ``i`` of ``Y``
After:    ``Z_i = Conv_i(X, W_i', B_i')``  (the normalization is gone; one fold rewrites every Conv)
Conditions:
  - every consumer of ``Y`` is a Conv (default domain) reading ``Y`` as its data input only (directly or
    through Identity nodes, which are removed), and ``Y`` is not a graph output: the normalization is
    folded into all of them or into none;
  - each Conv's ``W`` (and ``B``) are floating-point constants, ``W.shape[1] * group`` equals the
    channel count, and the normalization's channel axis is 1 (the Conv's input channel axis);
  - no padding: ``pads`` absent or all 0 with ``auto_pad`` NOTSET, or ``VALID``, or ``SAME_UPPER`` /
    ``SAME_LOWER`` that provably pads nothing (effective kernel 1, or input size known). Padding adds
    zeros *after* the normalization, which a folded Conv cannot reproduce, so a padded Conv is refused,
    unless the shift is exactly 0 on every channel (then ``scale * 0 + 0 = 0`` and padding is exact);
  - the folded ``W'`` and ``B'`` are finite in the model's dtype (no fp16 overflow).
  A ``W`` shared with another node is not changed: each Conv gets private folded copies. The fold is
  reported under the first Conv's output, the tensor both models compute (``Y`` no longer exists).
Formula:  input channel ``c = g * (C/group) + j`` feeds output channels ``m`` of group ``g = m // (M/group)``:
          ``W'[m, j, k...] = W[m, j, k...] * scale[c]``,
          ``B'[m] = B[m] + sum over j, k of W[m, j, k...] * shift[c]`` (``B`` = 0 if absent), in float64,
          each rounded once to ``W``'s dtype.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold.folding.math import RoundingError, fold_into_conv_input
from bnfold.folding.producers import linear_producer
from bnfold.folding.rules.base import (
    FLOAT_TYPES,
    Fold,
    FoldContext,
    Norm,
    Skip,
    by_blocking,
    copy_node,
    new_tensor,
    rounding_skip,
)
from bnfold.folding.rules.readers import through_identity
from bnfold.ir.nodes import attr, is_op
from bnfold.ir.shapes import shape_of

__all__ = ["NAME", "match"]

NAME = "bn_conv"


def _padding(ctx: FoldContext, conv: int, kernel: list[int], x_name: str) -> str | None:
    """A phrase describing the padding ``conv`` applies, or None when it provably pads nothing."""
    view = ctx.view
    node = view.node(conv)
    n = len(kernel)
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto == "VALID":
        return None
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        strides = list(attr(node, "strides", [1] * n))
        dilations = list(attr(node, "dilations", [1] * n))
        eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
        if all(e == 1 for e in eff):
            return None
        shape = shape_of(view, x_name)
        dims = [d.value for d in shape[2:]] if shape is not None and len(shape) == n + 2 else []
        sizes = [d for d in dims if d is not None]
        if len(sizes) != n:
            return f"auto_pad={auto} on an input of unknown size may pad"
        total = [max((-(-s // st) - 1) * st + e - s, 0) for s, st, e in zip(sizes, strides, eff, strict=True)]
        return None if not any(total) else f"auto_pad={auto} pads {total}"
    pads = [int(p) for p in attr(node, "pads", [])]
    return f"pads={pads}" if any(pads) else None


def _no_backward(ctx: FoldContext, norm: Norm) -> str:
    """Why the normalization has no producer to fold into, as the start of a refusal; empty when it
    has a linear producer (then that producer's rule gives its own reason first)."""
    view = ctx.view
    if linear_producer(view, norm.input) is not None:
        return ""
    producer = view.producer_of(norm.input)
    if producer is None:
        where = "is a graph input" if norm.input in view.graph_inputs else "is not produced by a node here"
    else:
        where = f"comes from {view.describe(producer)}"
    return f"there is no linear producer to fold into (its input '{norm.input}' {where}), and it "


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    view = ctx.view
    out = norm.output
    readers, identities, id_blocker = through_identity(view, out)  # a Dropout in eval is an Identity
    reads = dict(readers)
    consumers = [i for i, _ in readers]
    convs = [i for i in consumers if is_op(view.node(i), "Conv")]
    if not convs:
        return None

    prefix = _no_backward(ctx, norm)

    def skip(reason: str) -> Skip:
        return ctx.skip(norm.output, norm.op_type, prefix + reason)

    into = f"fold into the following {view.describe(convs[0])}"
    if view.is_graph_output(out):
        return skip(f"cannot {into}: '{out}' is also a graph output, so it must keep its values")
    if id_blocker:
        return skip(f"cannot {into}: {id_blocker}")
    others = by_blocking(view, out, [i for i in consumers if i not in convs])
    if others:
        return skip(f"cannot {into}: '{out}' also feeds {view.describe(others[0])}, which is not a Conv")
    if norm.channel_axis != 1:
        return skip(f"cannot {into}: the normalization's channel axis {norm.channel_axis} is not the Conv's "
                    "input channel axis 1")
    shift_zero = not np.any(norm.affine.shift)
    replace: dict[int, onnx.NodeProto] = {}
    tensors: list[onnx.TensorProto] = []
    done: dict[tuple[str, str, int], tuple[str, str]] = {}
    for idx in convs:
        node = view.node(idx)
        desc = view.describe(idx)
        if list(node.input).count(reads[idx]) != 1 or node.input[0] != reads[idx]:
            return skip(f"cannot fold into {desc}: it reads '{out}' as a weight or bias")
        if len(node.input) < 2 or not node.input[1]:
            return skip(f"cannot fold into {desc}: it has no weight")
        w_name = node.input[1]
        b_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        w_type = view.constant_dtype(w_name)
        if w_type is not None and w_type not in FLOAT_TYPES:
            return skip(f"cannot fold into {desc}: weight '{w_name}' is not floating point")
        found = view.constant(w_name)
        if found.value is None:
            return skip(f"cannot fold into {desc}: weight '{w_name}' {found.why_not}")
        weight = found.value
        bias = None
        if b_name:
            got = view.constant(b_name)
            if got.value is None:
                return skip(f"cannot fold into {desc}: bias '{b_name}' {got.why_not}")
            bias = got.value
        groups = int(attr(node, "group", 1))
        if weight.ndim < 3 or weight.shape[0] % groups:
            return skip(f"cannot fold into {desc}: weight '{w_name}' has shape {list(weight.shape)}")
        channels = weight.shape[1] * groups
        if channels != norm.affine.channels:
            return skip(f"cannot fold into {desc}: it has {channels} input channels but the normalization "
                        f"has {norm.affine.channels}")
        if bias is not None and bias.size != weight.shape[0]:
            return skip(f"cannot fold into {desc}: bias '{b_name}' has {bias.size} values")
        kernel = [int(k) for k in attr(node, "kernel_shape", weight.shape[2:])]
        padding = _padding(ctx, idx, kernel, node.input[0])
        if padding is not None and not shift_zero:
            return skip(
                f"cannot fold into {desc}: it pads its input ({padding}), and the padded zeros would not "
                "be normalized (the shift is not zero), so the fold would not be exact"
            )
        key = (w_name, b_name, groups)
        if key not in done:
            w64, b64 = fold_into_conv_input(weight, bias, norm.affine, groups)
            try:
                w_new = new_tensor(ctx, w64, weight.dtype, f"{w_name}_bnfold", f"weight of {desc}")
                b_new = new_tensor(ctx, b64, weight.dtype, f"{b_name or node.output[0]}_bnfold_bias",
                                   f"bias of {desc}")
            except RoundingError as exc:
                return rounding_skip(ctx, norm, exc)
            tensors += [w_new, b_new]
            done[key] = (w_new.name, b_new.name)
        replace[idx] = copy_node(node, inputs=[norm.input, *done[key]])
    first_out = view.node(convs[0]).output[0]
    return Fold(
        rule=NAME,
        producer_op="Conv",
        norm=dataclasses.replace(norm, output=first_out),
        replace=replace,
        remove=(*norm.nodes, *identities),
        tensors=tuple(tensors),
    )
