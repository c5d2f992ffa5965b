"""layout: fold a normalization reached from a linear producer through layout-only ops.

Before:   ``t0 = P(X, W, ...)``; ``t1 = L1(t0)``; ... ``tk = Lk(t(k-1))``; ``Y = BatchNormalization(tk)``
          (P: Conv, ConvTranspose, Gemm, MatMul [+ bias Add]; L: Identity, Reshape, Flatten, Squeeze,
          Unsqueeze, Transpose), e.g. ``Gemm [N, C] -> Unsqueeze(2, 3) -> BN over [N, C, 1, 1]``,
          ``MatMul [B, T, C] -> Transpose(0, 2, 1) -> BN over [B, C, T]``, ``Conv -> Identity -> BN``
After:    ``f0 = P(X, W', ...)``; ``f1 = L1(f0)``; ... ``Y = Lk(f(k-1))``  (the normalization is gone; the
          layout ops stay, reading fresh intermediate names, and the last one writes ``Y``)
Conditions:
  - the normalization's channel axis, mapped back through every op, provably lands on P's output
    channel axis, channel ``c`` on channel ``c``: Identity; Transpose (its ``perm``); Unsqueeze (the
    channel axis is not an inserted one); Squeeze; Flatten (every other axis merged with the channel
    axis has size 1); Reshape (constant target shape; the dimensions before the channel axis multiply
    to the same product on both sides, and the channel dimension is the same). Shapes come from graph
    inputs, constants and each op's semantics, never from ``value_info``; what cannot be proven is refused;
  - a tensor of the chain that has other users, or is a graph output, makes P and the ops up to it be
    cloned (as for any producer: ``clone``, ``max_clone_bytes``); otherwise the fold is refused;
  - then P's own rule conditions (constant weights, no overflow, ...).
Formula:  the layout ops only move elements, and channel ``c`` of ``tk`` is channel ``c`` of ``t0``, so
          ``BN(Lk(...L1(t0)))  = Lk(...L1(scale * t0 + shift))``: P's rule folds the same affine map.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.folding.math import Affine
from bnfold.folding.producers import Producer, delegate, linear_producer
from bnfold.folding.rules.base import Fold, FoldContext, Norm, Skip, by_blocking, copy_node, unique_node_name
from bnfold.ir.nodes import attr, is_op
from bnfold.ir.shapes import ONE, Shape, int_list, product, reshape_dims, shape_of
from bnfold.ir.unknown import why_unknown
from bnfold.ir.view import GraphView

__all__ = ["LAYOUT_OPS", "NAME", "match", "rewire", "uniform", "walk_back"]

NAME = "layout"
LAYOUT_OPS = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
_MAX_CHAIN = 32


def _dims(shape: Shape | None) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join(str(d.value) if d.value is not None else "?" for d in shape) + "]"


def _map_back(ctx: FoldContext, idx: int, axis: int, prod: Producer) -> int | str:
    """The input axis of layout node ``idx`` whose channel ``c`` is channel ``c`` of output ``axis``, or
    why there is none (a phrase)."""
    view = ctx.view
    node = view.node(idx)
    desc = view.describe(idx)
    op = node.op_type
    if op == "Identity":
        return axis
    xs = shape_of(view, node.input[0])
    ys = shape_of(view, node.output[0])
    if op == "Transpose":
        perm = attr(node, "perm")
        if perm is None:
            rank = len(xs) if xs is not None else None
            if rank is None:
                return f"{desc} reverses the axes of a tensor of unknown rank"
            return rank - 1 - axis
        return int(perm[axis])
    try:
        axes = int_list(view, node, "axes", 1) if op in ("Squeeze", "Unsqueeze") else None
    except ValueError:
        return f"{desc} takes its axes from a tensor computed at run time"
    if op in ("Squeeze", "Unsqueeze") and axes == []:
        return f"{desc} has an empty axes list"
    if op == "Unsqueeze":
        if axes is None:
            return f"{desc} has no axes"
        rank = len(ys) if ys is not None else (len(xs) + len(axes) if xs is not None else None)
        if rank is None and any(a < 0 for a in axes):
            return f"{desc} inserts negative axes into a tensor of unknown rank"
        inserted = {a + rank if a < 0 else a for a in axes} if rank is not None else set(axes)
        if axis in inserted:
            return f"{desc} inserts the channel axis {axis} itself"
        return axis - sum(1 for a in inserted if a < axis)
    if xs is None:
        return f"the shape of '{node.input[0]}', the input of {desc}, is unknown{why_unknown(view, node.input[0])}"
    rank = len(xs)
    if op == "Squeeze":
        if axes is None:
            if any(d.value is None for d in xs):
                return f"{desc} removes every size-1 axis of '{node.input[0]}' of shape {_dims(xs)}"
            drop = {i for i, d in enumerate(xs) if d.value == 1}
        else:
            drop = {a + rank if a < 0 else a for a in axes}
        kept = [i for i in range(rank) if i not in drop]
        return kept[axis] if axis < len(kept) else f"{desc} leaves no axis {axis}"
    if op == "Flatten":
        k = int(attr(node, "axis", 1))
        k = k + rank if k < 0 else k
        side = range(k) if axis == 0 else range(k, rank)
        big = [i for i in side if xs[i] != ONE]
        if len(big) == 1:
            return big[0]
        channel = prod.channel_axis
        if not big and channel is not None and channel in side:
            return channel  # one channel: every axis has size 1
        return (f"{desc} merges axes {list(side)} of '{node.input[0]}' (shape {_dims(xs)}) into axis {axis}: "
                "the channel axis would mix with other axes")
    if op == "Reshape":
        try:
            target = int_list(view, node, "shape", 1)
        except ValueError:
            target = None
        if target is None:
            return f"{desc} takes its target shape from a tensor computed at run time"
        try:
            es = reshape_dims(xs, target, bool(attr(node, "allowzero", 0)), node.output[0])
        except (ValueError, IndexError):
            return f"{desc} has target shape {target}, which does not fit '{node.input[0]}'"
        if axis >= len(es):
            return f"{desc} has no output axis {axis}"
        found = [m for m in range(rank) if xs[m] == es[axis] and product(xs[:m]) == product(es[:axis])]
        if not found:
            return (f"{desc} reshapes '{node.input[0]}' of shape {_dims(xs)} to {target}: output axis {axis} "
                    "is not provably one input axis (the dimensions before it differ or are unknown)")
        return prod.channel_axis if prod.channel_axis in found else found[0]
    return f"{desc} is not a layout op"


def _channel_axis_reason(ctx: FoldContext, norm: Norm, chain: list[int], t: str, prod: Producer) -> str | None:
    """None when the normalization's channel axis provably maps to the producer's channel axis."""
    view = ctx.view
    axis = norm.channel_axis
    if axis < 0:
        shape = shape_of(view, norm.input)
        if shape is None:
            return (f"the rank of '{norm.input}' is unknown, so its channel axis {axis} cannot be mapped"
                    f"{why_unknown(view, norm.input)}")
        axis += len(shape)
    for idx in reversed(chain):
        try:
            mapped = _map_back(ctx, idx, axis, prod)
        except (IndexError, ValueError, TypeError):  # malformed attributes: nothing is proven
            mapped = f"the axes of {view.describe(idx)} cannot be read"
        if isinstance(mapped, str):
            return mapped
        axis = mapped
    if prod.channel_axis is None:
        return f"the rank of its output '{t}' is unknown, so its last (column) axis is not known"
    if axis != prod.channel_axis:
        return f"its channel axis maps to axis {axis} of '{t}', not to the output channel axis {prod.channel_axis}"
    return None


def _users_outside(ctx: FoldContext, name: str, allowed: set[int]) -> str | None:
    """A phrase naming another user of ``name`` (or that it is a graph output), else None."""
    view = ctx.view
    if view.is_graph_output(name):
        return "is a graph output"
    others = by_blocking(view, name, [i for i in view.consumers_of(name) if i not in allowed])
    return f"also feeds {view.describe(others[0])}" if others else None


def walk_back(view: GraphView, name: str) -> tuple[list[int], str, Producer] | None:
    """``(layout ops L1..Lk, t0, producer)`` when ``name`` is reached from a linear producer's output
    ``t0`` through one or more layout ops, else None."""
    chain: list[int] = []
    t = name
    while len(chain) <= _MAX_CHAIN:
        idx = view.producer_of(t)
        if idx is None:
            break
        node = view.node(idx)
        if not is_op(node, LAYOUT_OPS) or node.output[0] != t:
            break
        chain.append(idx)
        t = node.input[0]
    if not chain or len(chain) > _MAX_CHAIN:
        return None
    prod = linear_producer(view, t)
    if prod is None:
        return None
    return chain[::-1], t, prod


def uniform(affine: Affine) -> bool:
    """One scale and one shift for every channel: such a map commutes with any data movement."""
    return bool(np.all(affine.scale == affine.scale[0]) and np.all(affine.shift == affine.shift[0]))


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    view = ctx.view
    found = walk_back(view, norm.input)
    if found is None:
        return None
    chain, t, prod = found  # L1 .. Lk, from the producer towards the normalization

    def skip(reason: str) -> Skip:
        return ctx.skip(norm.output, norm.op_type, reason)

    via = " -> ".join(view.node(i).op_type for i in chain)
    affine = norm.affine
    if uniform(affine):  # the same map on every element: it moves through any layout op unchanged
        affine = Affine(np.full(prod.channels, affine.scale[0]), np.full(prod.channels, affine.shift[0]))
    else:
        reason = _channel_axis_reason(ctx, norm, chain, t, prod)
        if reason is not None:
            return skip(f"{norm.op_type} is reached from {prod.describe(view)} via {via}, but {reason}")

    # the tensors along the chain: t0 (producer output), t1 .. tk (tk = the normalization's input)
    tensors = [t] + [view.node(i).output[0] for i in chain]
    allowed = [{chain[i]} for i in range(len(chain))] + [set(norm.nodes)]
    last_shared: int | None = None
    for i, name in enumerate(tensors):
        other = _users_outside(ctx, name, allowed[i])
        if other is not None:
            last_shared = i
            shared_reason = f"'{name}' (on the way from {prod.describe(view)}) {other}"
    if last_shared is not None and last_shared >= 1 and not ctx.options.clone:
        return skip(f"{shared_reason}; cloning it is turned off")
    cut = last_shared or 0  # chain[:cut] is cloned, chain[cut:] rewritten in place
    virtual = Norm(
        nodes=(*chain[cut:], *norm.nodes),
        input=t,
        output=norm.output,
        affine=affine,
        channel_axis=prod.norm_axis,
        op_type=norm.op_type,
    )
    outcome = delegate(ctx, virtual, ctx.producer_rules)  # every one, selected or not: P's rule decides
    if outcome is None:
        return skip(f"{norm.op_type} is reached from {prod.describe(view)} via {via}, but no enabled rule folds "
                    f"into {prod.op}")
    if isinstance(outcome, Skip):
        return outcome
    return rewire(ctx, outcome, norm, chain, tensors, cut)


def rewire(ctx: FoldContext, fold: Fold, norm: Norm, chain: list[int], tensors: list[str], cut: int) -> Fold | Skip:
    """Turn the producer rule's fold (written as if the normalization followed the producer) into one
    that keeps the layout ops: the producer writes a fresh ``f0``, each op reads and writes fresh names,
    and the last op writes the normalization's output."""
    view = ctx.view
    if set(chain) & set(fold.replace):
        return ctx.skip(norm.output, norm.op_type, "the producer rule rewrote a layout op of the chain")
    fresh = [ctx.names.fresh(f"{name}_bnfold") for name in tensors[:-1]]

    def renamed(node: onnx.NodeProto) -> onnx.NodeProto:
        return copy_node(node, outputs=[fresh[0] if out == norm.output else out for out in node.output])

    # nodes the rule placed where the normalization stood must now come before the layout ops: they
    # read only the producer's inputs and new constants, which exist before the first layout op
    region = set(chain) | set(norm.nodes)
    head: list[onnx.NodeProto] = []
    replace: dict[int, onnx.NodeProto] = {}
    before: dict[int, tuple[onnx.NodeProto, ...]] = {}
    for k in sorted(set(fold.replace) | set(fold.insert_before)):
        new_nodes = [renamed(n) for n in fold.insert_before.get(k, ())]
        if k in region:
            head += new_nodes
            if k in fold.replace:
                head.append(renamed(fold.replace[k]))
        else:
            if new_nodes:
                before[k] = tuple(new_nodes)
            if k in fold.replace:
                replace[k] = renamed(fold.replace[k])
    remove = (set(fold.remove) - set(chain)) | set(norm.nodes)
    for i, idx in enumerate(chain):
        node = view.node(idx)
        out = fresh[i + 1] if i + 1 < len(chain) else norm.output
        new = copy_node(node, inputs=[fresh[i], *node.input[1:]], outputs=[out, *node.output[1:]],
                        name=unique_node_name(view, node) if i < cut else None)
        if i < cut:
            before[idx] = (*before.get(idx, ()), *(head if i == 0 else ()), new)
        else:
            replace[idx] = new
            if i == 0 and head:
                before[idx] = (*before.get(idx, ()), *head)
    return Fold(
        rule=NAME,
        producer_op=fold.producer_op,
        norm=norm,
        replace=replace,
        remove=tuple(sorted(remove)),
        tensors=fold.tensors,
        insert_before=before,
    )
