"""affine: fold a decomposed BatchNormalization (Mul / Add / Sub / Div by constants) into the producer.

Before:   ``t = P(X, W, ...)``  (P: Conv, ConvTranspose, Gemm, or MatMul with its optional bias Add);
          ``u = Mul(t, s)``; ``Y = Add(u, b)``  (any order, either one alone, repeated; also
          ``Sub(t, c)``, ``Sub(c, t)``, ``Div(t, c)``; the constant may be either input), or the same
          chain on ``t`` reached from P through layout-only ops (then the layout rule folds it)
After:    ``Y = P(X, W', ...)``  (the chain is gone; the producer rule writes the folded weights)
Conditions:
  - every constant is per-channel on P's output channel axis, judged by its broadcast axes, never by
    its element count: right-aligned against the rank of ``t`` (Conv/ConvTranspose: the weight's rank;
    Gemm: 2; MatMul: from propagated shapes) it may vary along P's channel axis only (axis 1; the last
    axis for MatMul). A ``[C]`` constant broadcasts along the LAST axis, so on an NCHW Conv output it
    is not per-channel even when W == C; ``[C, 1, 1]`` is. A scalar is per-channel for any producer;
  - the constant does not have more dimensions than ``t`` (that would broadcast ``t`` to a new shape);
    where the rank of a MatMul output is unknown only scalars and 1-D constants are judged;
  - ``Div`` by a constant containing a zero is refused; legacy (opset < 7) ``axis`` broadcasting too;
  - the producer's output (and every tensor on the way, through layout ops) feeds only the chain and
    is not a graph output: a Mul/Add on a tensor that is also used elsewhere is arithmetic on it (GELU's
    ``x / sqrt(2)``), not a normalization, so it is left alone and not reported (no clone for it);
  - the chain grows only through tensors with one consumer that are not graph outputs;
  - a lone Add/Sub right after a bare MatMul is its bias, the folded form: left alone;
  - then the producer rule's own conditions (constant weights, no overflow, ...).
  A Mul/Add not after a linear producer (directly, or through Identity / Reshape / Flatten / Squeeze /
  Unsqueeze / Transpose, where the layout rule proves the channel mapping), or by a tensor computed at
  run time, is an ordinary op, not a normalization: it is neither folded nor reported.
Formula:  each op is ``scale * x + shift`` per channel (Mul: ``(s, 0)``, Add: ``(1, b)``, ``t - c``:
          ``(1, -c)``, ``c - t``: ``(-1, c)``, ``t / c``: ``(1/c, 0)``), composed in float64 along the
          chain, then folded like a BatchNormalization by the producer's rule (rounded once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnfold.folding.math import Affine, compose, op_affine
from bnfold.folding.producers import Producer, delegate, linear_producer
from bnfold.folding.rules.base import FLOAT_TYPES, Fold, FoldContext, Norm, Skip
from bnfold.folding.rules.layout import walk_back
from bnfold.ir.nodes import attr, is_op
from bnfold.ir.shapes import shape_of

__all__ = ["NAME", "OPS", "match", "norm_source"]

NAME = "affine"
OPS = ("Mul", "Add", "Sub", "Div")


@dataclass(frozen=True)
class _Step:
    """One ``op(x, const)`` node: which input is the tensor, the constant's name and value."""

    idx: int
    op: str
    x: str
    const: str
    value: np.ndarray
    const_first: bool


def _step(ctx: FoldContext, idx: int) -> _Step | None:
    """The node at ``idx`` as ``op(tensor, constant)``, or None when it is not one."""
    view = ctx.view
    node = view.node(idx)
    if not is_op(node, OPS) or len(node.input) != 2:
        return None
    if len(node.output) != 1 or not node.output[0]:
        return None
    values = [view.constant(n).value for n in node.input]
    if (values[0] is None) == (values[1] is None):
        return None  # two run-time tensors, or constant folding: not a normalization
    pos = 0 if values[0] is not None else 1
    dtype = view.constant_dtype(node.input[pos])
    if dtype is not None and dtype not in FLOAT_TYPES:
        return None
    value = values[pos]
    assert value is not None
    if value.dtype.kind not in "fV":
        return None
    if node.op_type == "Div" and pos == 0:
        return None  # c / t is not affine in t
    return _Step(idx, node.op_type, node.input[1 - pos], node.input[pos], value, pos == 0)


@dataclass(frozen=True)
class _Target:
    """Where the chain's constants must vary: along ``axis`` of the rank-``rank`` tensor the chain reads,
    with ``channels`` values (a producer output), or along any single axis (``axis`` None: reached
    through layout ops, where the layout rule proves the mapping)."""

    rank: int | None
    axis: int | None
    channels: int | None
    where: str


def _target(ctx: FoldContext, x: str, prod: Producer, via_layout: bool) -> _Target:
    view = ctx.view
    if via_layout:
        shape = shape_of(view, x)
        return _Target(None if shape is None else len(shape), None, None,
                       f"'{x}' (reached from {prod.describe(view)} through layout ops)")
    rank = prod.rank
    where = f"the rank-{rank} output '{x}' of {prod.describe(view)}" if rank is not None else (
        f"the output '{x}' of {prod.describe(view)}")
    axis = prod.channel_axis
    return _Target(rank, axis if axis is not None else -1, prod.channels, where)


def _axis_values(ctx: FoldContext, step: _Step, target: _Target) -> tuple[int | None, np.ndarray] | str | None:
    """``(axis, values)`` of the step's constant: the one axis it varies along (None: the same value
    everywhere) and its float64 values along it; a reason when it is not per-channel; None when that
    cannot be decided (the rank is unknown)."""
    view = ctx.view
    node = view.node(step.idx)
    desc = view.describe(step.idx)
    if attr(node, "axis") is not None:
        return f"{desc} uses legacy broadcasting with an axis attribute"
    if attr(node, "broadcast") and step.const_first:
        return f"{desc} broadcasts its first input (legacy broadcast=1)"
    value = np.asarray(step.value, dtype=np.float64)
    rank = target.rank
    # a producer's output has rank >= 1, so a [1] constant cannot raise it; after layout ops (a Squeeze
    # to rank 0) it could, so there the rank must be known
    if value.size == 1 and (value.ndim == 0 or (value.ndim == 1 and (target.axis is not None or rank))):
        return None, value.reshape(1)
    shape = [int(d) for d in value.shape]
    what = f"constant '{step.const}' of shape {shape}"
    if rank is None:
        if value.ndim == 1 and target.axis == -1 and value.size == target.channels:
            return -1, value  # a 1-D constant aligns with the last axis whatever the rank
        return None if value.ndim > 1 or target.axis != -1 else (
            f"{what} has {value.size} values but {target.where} has {target.channels} columns")
    if value.ndim > rank:
        return f"{what} has more dimensions than {target.where}: it would broadcast it to a new shape"
    padded = [1] * (rank - value.ndim) + shape
    varying = [j for j, d in enumerate(padded) if d != 1]
    if len(varying) > 1:
        return f"{what} varies along axes {varying} of {target.where}: not one value per channel"
    if not varying:
        return None, value.reshape(-1)[:1]
    j = varying[0]
    if target.axis is not None and j != target.axis:
        last = " (a constant broadcasts along the LAST axes, not the channel axis)" if j == rank - 1 else ""
        return (f"{what} broadcasts along axis {j} of {target.where}, not along its channel axis "
                f"{target.axis}{last}: not a per-channel scale or shift")
    if target.channels is not None and padded[j] != target.channels:
        return f"{what} has {padded[j]} values along the channel axis but {target.where} has {target.channels}"
    return j, value.reshape(-1)


def _affine(step: _Step, values: np.ndarray) -> Affine | str:
    found = op_affine(step.op, values, step.const_first)
    if found is None:
        return f"Div (output '{step.x}') divides by constant '{step.const}', which contains a zero"
    return found


def norm_source(ctx: FoldContext, idx: int) -> Norm | Skip | None:
    """The chain of constant Mul/Add/Sub/Div starting at node ``idx`` right after a linear producer (or
    after layout ops from one), as one :class:`Norm`; a Skip when that first node is not per-channel;
    None when it is not such a node."""
    if not ctx.runs(NAME):
        return None
    view = ctx.view
    node = view.node(idx)
    if node.op_type not in OPS or len(node.input) != 2:
        return None
    if not any(linear_producer(view, n) or walk_back(view, n) for n in node.input):
        return None  # cheap test first: constants are only decoded after a linear producer
    first = _step(ctx, idx)
    if first is None:
        return None
    prod = linear_producer(view, first.x)
    via_layout = prod is None
    path = [first.x]
    if prod is None:
        found = walk_back(view, first.x)
        if found is None:
            return None
        chain, t0, prod = found
        path = [t0, *(view.node(i).output[0] for i in chain)]
    if any(view.is_graph_output(t) or len(view.consumers_of(t)) != 1 for t in path):
        # the producer's values are used elsewhere too: this is arithmetic on them (GELU's x / sqrt(2),
        # a residual's scale), not a normalization; cloning a producer for it would only add work
        return None
    target = _target(ctx, first.x, prod, via_layout)
    got = _axis_values(ctx, first, target)
    if got is None or (via_layout and isinstance(got, str)):
        return None  # undecidable, or an ordinary broadcast after layout ops: not a normalization
    if isinstance(got, str):
        return ctx.skip(node.output[0], node.op_type, got)
    axis, values = got
    affine = _affine(first, values)
    if isinstance(affine, str):
        return ctx.skip(node.output[0], node.op_type, affine)
    nodes, ops, out = [idx], [node.op_type], node.output[0]
    while not view.is_graph_output(out):
        consumers = view.consumers_of(out)
        if len(consumers) != 1:
            break
        nxt = _step(ctx, consumers[0])
        if nxt is None or nxt.x != out or nxt.const == out:
            break
        more = _axis_values(ctx, nxt, target)
        if more is None or isinstance(more, str):
            break
        if more[0] is not None and axis is not None and (more[0] != axis or more[1].size != affine.channels):
            break
        step_affine = _affine(nxt, more[1])
        if isinstance(step_affine, str):
            break
        affine = compose(affine, step_affine)  # broadcasts a one-value map over the channels
        axis = axis if more[0] is None else more[0]
        nodes.append(nxt.idx)
        ops.append(nxt.op)
        out = view.node(nxt.idx).output[0]
    shift_only = ops[0] == "Add" or (ops[0] == "Sub" and not first.const_first)
    if prod.bare_matmul and not via_layout and len(nodes) == 1 and shift_only:
        return None  # the MatMul's bias: already the folded form
    if axis is None or not via_layout:
        # one value for every channel (or a direct producer): as many channels as the producer has
        affine = Affine(np.broadcast_to(affine.scale, (prod.channels,)).copy(),
                        np.broadcast_to(affine.shift, (prod.channels,)).copy())
    channel_axis = prod.norm_axis if not via_layout else (axis if axis is not None else -1)
    return Norm(
        nodes=tuple(nodes),
        input=first.x,
        output=out,
        affine=affine,
        channel_axis=channel_axis,
        op_type="+".join(ops),
    )


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    """A Mul/Add chain is folded by the producer rules; those the pass does not run itself (``--only
    affine``) are asked here, so selecting this rule is enough to fold decomposed normalizations."""
    if norm.op_type == "BatchNormalization" or not set(norm.op_type.split("+")) <= set(OPS):
        return None
    return delegate(ctx, norm, tuple(r for r in ctx.producer_rules if not ctx.runs(r.NAME)))

