"""bn_gemm: fold a normalization into the Gemm(s) / MatMul(s) that follow it, on their input side.

Before:   ``Y = BatchNormalization(X)`` over ``[N, C]`` (or ``[N, C, S...]`` then ``F = Flatten(Y)`` /
          ``F = Reshape(Y, [N, C*S])``); ``Z_i = Gemm_i(F, B_i, C_i?; alpha, beta, transB)`` or
          ``Z_i = MatMul_i(F, W_i)`` for every consumer ``i``
After:    ``Z_i = Gemm_i(F', B_i', C_i'; alpha, beta=1, transB)`` or ``Z_i = Add(MatMul_i(F', W_i'), b_i)``
          where ``F'`` is ``X`` (or the Flatten / Reshape of ``X``): the normalization is gone
Conditions:
  - every consumer of ``Y`` is a Gemm or MatMul reading ``Y`` as its data input (Gemm ``A``, MatMul input
    0), directly or through one Flatten / Reshape that only that consumer reads, looking through Identity
    nodes (the dynamo exporter's Dropout in eval; they are removed); ``Y`` and the reshaped
    tensor are not graph outputs: the normalization is folded into all of them or into none;
  - the normalization's channel axis is 1 and the feature index of the Gemm input is provably
    ``c * S + s`` for channel ``c``: ``Y`` has rank 2, or the Flatten (axis 1) / Reshape (to
    ``[N, C*S]``, ``N`` provably kept) merges a channel axis followed by axes of known total size ``S``;
  - Gemm: ``transA = 0`` (with ``transA = 1`` the data is read transposed, its rows would be the
    channels; refused), ``B`` and ``C`` floating-point constants, ``C`` broadcastable to ``[M, K]``;
  - MatMul: the weight is a floating-point constant matrix ``[F, K]`` (rank 2);
  - the folded tensors are finite in the model's dtype.
  A weight shared with another node is not changed: each consumer gets private folded copies. The fold
  is reported under the first consumer's output, which both models compute.
Formula:  with ``a = repeat(scale, S)``, ``b = repeat(shift, S)`` (float64, one value per feature ``f``):
          ``alpha * (x diag(a) + b) B' + beta * C = alpha * x (diag(a) B') + (alpha * b B' + beta * C)``,
          so row ``f`` of ``B'`` (column ``f`` of ``B`` with ``transB = 1``) is scaled by ``a[f]`` and
          ``C' = alpha * b @ B' + beta * C`` broadcast to ``broadcast(C.shape, [K])``, ``beta`` becomes 1;
          MatMul: ``W'[f] = a[f] * W[f]`` and ``bias = b @ W`` (an Add is written unless it is all zero).
          Each tensor rounded once to the weight's dtype.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from bnfold.folding.math import Affine, RoundingError, fold_into_linear_input
from bnfold.folding.rules.base import FLOAT_TYPES, Fold, FoldContext, Norm, Skip, copy_node, new_tensor, rounding_skip
from bnfold.folding.rules.readers import through_identity
from bnfold.ir.nodes import attr, is_op
from bnfold.ir.shapes import ONE, product, shape_of

__all__ = ["NAME", "match"]

NAME = "bn_gemm"

_RESHAPES = ("Flatten", "Reshape")


@dataclasses.dataclass(frozen=True)
class _Target:
    node: int
    """The Gemm or MatMul."""
    via: int | None
    """The Flatten / Reshape between the normalization and it, if any."""
    reads: str
    """The tensor it (or ``via``) reads: the normalization's output, or an Identity of it."""


def _features_per_channel(ctx: FoldContext, norm: Norm, via: int | None, gemm: bool) -> int | str:
    """``S``, the features each channel becomes at the Gemm's input, or why it is not proven."""
    view = ctx.view
    if via is None and gemm:
        return 1  # Gemm's A is a matrix by definition: [N, C], one feature per channel
    xs = shape_of(view, norm.output) or shape_of(view, norm.input)
    if xs is None:
        return f"the shape of '{norm.input}' is unknown"
    if via is None:
        if len(xs) != 2:
            return f"'{norm.output}' has rank {len(xs)}, not the rank 2 a Gemm / MatMul input has"
        return 1
    node = view.node(via)
    desc = view.describe(via)
    rest = xs[2:]
    s = product(rest).value if rest else 1
    if s is None:
        return f"{desc} merges axes of unknown size into the channel axis"
    if is_op(node, "Flatten"):
        k = int(attr(node, "axis", 1))
        k = k + len(xs) if k < 0 else k
        if k != 1 and not (k == 0 and xs[0] == ONE):
            return f"{desc} flattens at axis {k}, not at the channel axis 1"
        return s
    ys = shape_of(view, node.output[0])
    if ys is None or len(ys) != 2:
        return f"the output shape of {desc} is not provably rank 2"
    if ys[0] != xs[0] or ys[1] != product(xs[1:]):
        return f"{desc} does not provably keep the batch axis and merge the channel axis with what follows it"
    return s


def _targets(ctx: FoldContext, norm: Norm) -> tuple[list[_Target], list[int]] | str | None:
    """The Gemm / MatMul consumers and the Identity nodes before them (None: no such consumer, so not
    this rule's pattern), or why not every consumer is one."""
    view = ctx.view
    readers, identities, blocker = through_identity(ctx.view, norm.output)
    found: list[_Target] = []
    for idx, out in readers:
        node = view.node(idx)
        if is_op(node, "Gemm") or is_op(node, "MatMul"):
            found.append(_Target(idx, None, out))
            continue
        if is_op(node, _RESHAPES) and node.input[0] == out and list(node.input).count(out) == 1:
            mid = node.output[0]
            nxt = view.consumers_of(mid)
            if len(nxt) == 1 and not view.is_graph_output(mid) and (
                    is_op(view.node(nxt[0]), "Gemm") or is_op(view.node(nxt[0]), "MatMul")):
                found.append(_Target(nxt[0], idx, out))
                continue
            where = "is a graph output" if view.is_graph_output(mid) else (
                f"feeds {view.describe(nxt[0])}" if nxt else "feeds nothing")
            blocker = blocker or f"'{mid}' from {view.describe(idx)} {where}" + (
                f" and {len(nxt) - 1} more" if len(nxt) > 1 else "")
            continue
        blocker = blocker or f"'{out}' also feeds {view.describe(idx)}, which is not a Gemm or MatMul"
    if not found:
        return None
    if view.is_graph_output(norm.output):
        return f"'{norm.output}' is also a graph output, so it must keep its values"
    return blocker or (found, identities)


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    view = ctx.view
    found = _targets(ctx, norm)
    if found is None:
        return None
    first = view.describe(found[0][0].node) if isinstance(found, tuple) else "following Gemm / MatMul"

    def skip(reason: str) -> Skip:
        return ctx.skip(norm.output, norm.op_type, f"cannot fold into the {first}: {reason}")

    if isinstance(found, str):
        return skip(found)
    targets, identities = found
    if norm.channel_axis != 1:
        return skip(f"the normalization's channel axis {norm.channel_axis} is not 1")
    replace: dict[int, onnx.NodeProto] = {}
    before: dict[int, tuple[onnx.NodeProto, ...]] = {}
    tensors: list[onnx.TensorProto] = []
    for t in targets:
        per = _features_per_channel(ctx, norm, t.via, is_op(view.node(t.node), "Gemm"))
        if isinstance(per, str):
            return skip(per)
        affine = Affine(np.repeat(norm.affine.scale, per), np.repeat(norm.affine.shift, per))
        folded = _fold_one(ctx, norm, t, affine)
        if isinstance(folded, Skip):
            return folded
        if isinstance(folded, str):
            return skip(folded)
        new_nodes, new_tensors = folded
        tensors += new_tensors
        if t.via is not None:
            replace[t.via] = copy_node(view.node(t.via), inputs=[norm.input, *view.node(t.via).input[1:]])
        replace[t.node] = new_nodes[-1]
        if len(new_nodes) > 1:
            before[t.node] = tuple(new_nodes[:-1])
    first_out = view.node(targets[0].node).output[0]
    return Fold(rule=NAME, producer_op=view.node(targets[0].node).op_type,
                norm=dataclasses.replace(norm, output=first_out), replace=replace,
                remove=(*norm.nodes, *identities),
                tensors=tuple(tensors), insert_before=before)


def _fold_one(
    ctx: FoldContext, norm: Norm, t: _Target, affine: Affine
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | Skip | str:
    """The rewritten consumer (MatMul: preceded by itself writing a fresh name, then the bias Add) and its
    new tensors; a phrase or Skip when it cannot be folded."""
    view = ctx.view
    node = view.node(t.node)
    desc = view.describe(t.node)
    data = norm.input if t.via is None else view.node(t.via).output[0]
    if node.input[0] != (t.reads if t.via is None else data) or len(node.input) < 2:
        return f"{desc} reads '{norm.output}' as its weight, not as its data input"
    if node.input[1] in (t.reads, data):
        return f"{desc} reads '{norm.output}' as both operands"
    w_name = node.input[1]
    elem = view.constant_dtype(w_name)
    if elem is not None and elem not in FLOAT_TYPES:
        return f"weight '{w_name}' of {desc} is not floating point"
    found = view.constant(w_name)
    if found.value is None:
        return f"weight '{w_name}' of {desc} {found.why_not}"
    w = found.value
    if w.ndim != 2:
        return f"weight '{w_name}' of {desc} has rank {w.ndim}, not 2"
    gemm = is_op(node, "Gemm")
    trans_b = int(attr(node, "transB", 0)) if gemm else 0
    if gemm and int(attr(node, "transA", 0)):
        return f"{desc} has transA=1: it reads its input transposed, so the channels are its rows"
    f_dim = w.shape[1] if trans_b else w.shape[0]
    if f_dim != affine.channels:
        return f"{desc} has {f_dim} input features but the normalization gives {affine.channels}"
    scaled, contribution = fold_into_linear_input(w, affine, 1 if trans_b else 0)
    k = contribution.shape[0]
    data_in = norm.input if t.via is None else data
    out = node.output[0]
    try:
        w_new = new_tensor(ctx, scaled, w.dtype, f"{w_name}_bnfold", f"weight of {desc}")
        if gemm:
            alpha = float(attr(node, "alpha", 1.0))
            beta = float(attr(node, "beta", 1.0))
            c_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
            c64 = alpha * contribution
            shape: tuple[int, ...] = (k,)
            c_dtype = w.dtype
            if c_name:
                got = view.constant(c_name)
                if got.value is None:
                    return f"C '{c_name}' of {desc} {got.why_not}"
                c = got.value
                if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, k)):
                    return f"C '{c_name}' of {desc} has shape {list(c.shape)}, not broadcastable to [M, {k}]"
                shape = tuple(int(d) for d in np.broadcast_shapes(c.shape, (k,)))
                c64 = c64 + beta * np.asarray(c, dtype=np.float64)
                c_dtype = c.dtype
            c_new = new_tensor(ctx, np.broadcast_to(c64, shape), c_dtype, f"{c_name or out}_bnfold_bias",
                               f"C of {desc}")
            new = copy_node(node, inputs=[data_in, w_new.name, c_new.name])
            kept = [a for a in new.attribute if a.name != "beta"]
            del new.attribute[:]
            new.attribute.extend(kept)
            return [new], [w_new, c_new]
        bias64 = contribution
        if not np.any(bias64):
            return [copy_node(node, inputs=[data_in, w_new.name])], [w_new]
        b_new = new_tensor(ctx, bias64, w.dtype, f"{out}_bnfold_bias", f"bias of {desc}")
    except RoundingError as exc:
        return rounding_skip(ctx, norm, exc)
    mid = ctx.names.fresh(f"{out}_bnfold")
    mm = copy_node(node, inputs=[data_in, w_new.name], outputs=[mid])
    add = helper.make_node("Add", [mid, b_new.name], [out])
    return [mm, add], [w_new, b_new]
