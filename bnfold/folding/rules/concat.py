"""concat: fold a normalization after a Concat into the linear producers of the Concat's inputs.

Before:   ``t_i = P_i(X_i, W_i, ...)`` (directly, or through layout ops as in the ``layout`` rule);
          ``T = Concat(t_1, ..., t_k; axis)``; ``Y = BatchNormalization(T)`` (MixNet-style mixed
          convolutions: split the channels, convolve each part, concatenate, normalize)
After:    ``f_i = P_i(X_i, W_i', ...)``; ``Y = Concat(f_1, ..., f_k; axis)``  (the normalization is gone)
Conditions:
  - the Concat (default domain) joins along the normalization's channel axis (1; a negative axis is
    read against the known rank), and the channel count of every input along it is known and they
    add up to the normalization's channels;
  - ``T`` feeds only the normalization and is not a graph output;
  - each input ``t_i`` whose part of the map is not the identity comes from a linear producer (Conv,
    ConvTranspose, Gemm, MatMul [+ bias Add]) directly or through layout ops, and that producer's own
    rule folds its part (constant weights, no overflow, channel axis proven). A producer whose output
    is read elsewhere is cloned as the producer rules do (``clone``, ``max_clone_bytes``); otherwise the
    whole fold is refused with a reason naming the Concat input that blocks it;
  - no two inputs need the same node rewritten (the same tensor twice, or one producer for two inputs).
Formula:  channel ``c`` of ``T`` is channel ``c - o_i`` of input ``i`` for ``o_i <= c < o_i + C_i``
          (``o_i`` the sum of the earlier inputs' channels), so ``BN(Concat(t_i)) = Concat(scale_i * t_i +
          shift_i)`` with ``scale_i = scale[o_i : o_i + C_i]``, ``shift_i`` likewise; each part is folded
          into ``P_i`` by its rule (float64, rounded once).
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.folding.math import Affine
from bnfold.folding.producers import delegate, linear_producer
from bnfold.folding.rules import layout
from bnfold.folding.rules.base import Fold, FoldContext, Norm, Skip, by_blocking, copy_node
from bnfold.ir.nodes import attr, is_op
from bnfold.ir.shapes import shape_of

__all__ = ["NAME", "match"]

NAME = "concat"


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    view = ctx.view
    cat = view.producer_of(norm.input)
    if cat is None or not is_op(view.node(cat), "Concat"):
        return None
    node = view.node(cat)
    desc = view.describe(cat)

    def skip(reason: str) -> Skip:
        return ctx.skip(norm.output, norm.op_type, f"{norm.op_type} follows {desc}, but {reason}")

    if view.is_graph_output(norm.input):
        return skip(f"its output '{norm.input}' is also a graph output, so it must keep its values")
    others = by_blocking(view, norm.input, [i for i in view.consumers_of(norm.input) if i not in norm.nodes])
    if others:
        return skip(f"its output '{norm.input}' also feeds {view.describe(others[0])}")
    out_shape = shape_of(view, norm.input) or next(
        (sh for sh in (shape_of(view, t) for t in node.input if t) if sh is not None), None)
    axis = int(attr(node, "axis", 1))
    if axis < 0:
        if out_shape is None:
            return skip(f"it joins along axis {axis} of a tensor of unknown rank")
        axis += len(out_shape)
    if axis != norm.channel_axis:
        return skip(f"it joins along axis {axis}, not the normalization's channel axis {norm.channel_axis}")
    sizes: list[int] = []
    for i, t in enumerate(node.input):
        shape = shape_of(view, t) if t else None
        dim = shape[axis].value if shape is not None and len(shape) > axis else None
        if dim is None:
            return skip(f"the channel count of its input {i} '{t}' is not known")
        sizes.append(dim)
    if sum(sizes) != norm.affine.channels:
        return skip(f"its inputs have {sum(sizes)} channels but the normalization has {norm.affine.channels}")

    replace: dict[int, onnx.NodeProto] = {}
    before: dict[int, tuple[onnx.NodeProto, ...]] = {}
    remove: set[int] = set(norm.nodes)
    tensors: list[onnx.TensorProto] = []
    touched: set[int] = set()
    inputs = list(node.input)
    producer_op = ""
    offset = 0
    for i, (t, size) in enumerate(zip(node.input, sizes, strict=True)):
        part = Affine(norm.affine.scale[offset:offset + size], norm.affine.shift[offset:offset + size])
        offset += size
        if size == 0 or (np.all(part.scale == 1.0) and not np.any(part.shift)):
            continue  # the identity on these channels: nothing to fold
        which = f"Concat input {i} '{t}'"
        if list(node.input).count(t) > 1:
            return skip(f"{which} is joined more than once")
        prod = linear_producer(view, t)
        chain = layout.walk_back(view, t) if prod is None else None
        if prod is None and chain is None:
            src = view.producer_of(t)
            where = ("is a graph input" if t in view.graph_inputs else "is a constant"
                     if src is None else f"comes from {view.describe(src)}")
            return skip(f"{which} {where}, not a linear producer (Conv, ConvTranspose, Gemm, MatMul), "
                        "directly or through layout ops")
        fresh = ctx.names.fresh(f"{t}_bnfold")
        axis_for = 1
        if prod is not None and prod.channel_axis == 1:
            axis_for = prod.norm_axis
        # written as if the Concat were this part's normalization (the producer rules check that the
        # normalization's output is written by one of its nodes); the output is renamed to ``fresh`` below
        virtual = Norm(nodes=(cat,), input=t, output=norm.input, affine=part, channel_axis=axis_for,
                       op_type=norm.op_type)
        outcome = delegate(ctx, virtual, ctx.producer_rules) if prod is not None else layout.match(ctx, virtual)
        if outcome is None:
            return skip(f"no rule folds into the producer of {which}")
        if isinstance(outcome, Skip):
            return skip(f"{which} cannot take its part: {outcome.reason}")
        sub_touched = (set(outcome.replace) | set(outcome.insert_before) | set(outcome.remove)) - {cat}
        if sub_touched & touched:
            return skip(f"{which} shares a node with another input's fold")
        touched |= sub_touched
        replace.update({k: _renamed(v, norm.input, fresh) for k, v in outcome.replace.items() if k != cat})
        for k, v in outcome.insert_before.items():
            before[k] = (*before.get(k, ()), *(_renamed(n, norm.input, fresh) for n in v))
        remove |= set(outcome.remove) - {cat}
        tensors += outcome.tensors
        inputs[i] = fresh
        producer_op = producer_op or outcome.producer_op
    if not producer_op:
        return None  # the identity on every channel: another rule's business
    if cat in before:
        return skip("a producer fold placed nodes at the Concat")
    replace[cat] = copy_node(node, inputs=inputs, outputs=[norm.output])
    return Fold(rule=NAME, producer_op=producer_op, norm=norm, replace=replace, remove=tuple(sorted(remove)),
                tensors=tuple(tensors), insert_before=before)


def _renamed(node: onnx.NodeProto, old: str, new: str) -> onnx.NodeProto:
    """``node`` writing ``new`` where it wrote ``old``."""
    if old not in node.output:
        return node
    return copy_node(node, outputs=[new if o == old else o for o in node.output])
