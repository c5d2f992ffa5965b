"""matmul: fold a normalization of the last axis into a MatMul with a constant weight (and its bias Add).

Before:   ``t = MatMul(A, B)`` [``u = Add(t, bias)`` or ``Add(bias, t)``]; ``Y = BatchNormalization(t or u)``
After:    ``Y = Gemm(A, B_f, bias_f)``                     when ``A`` and ``B`` are provably rank 2;
          ``t = MatMul(A, B_f)``; ``Y = Add(t, bias_f)``   otherwise (the existing Add is rewritten,
                                                           or a new one takes the normalization's place);
          ``Y = MatMul(A, B_f)``                           when there is no Add and every shift is 0
Conditions:
  - MatMul (any version: 1, 9, 13) and Add in the default domain; ``B`` is a constant floating-point
    tensor (fp16, bf16, fp32, fp64) of rank >= 2 (not a graph input) whose last dimension ``N`` equals
    the channel count; ``A`` may be anything;
  - the optional ``bias`` is a constant broadcastable against ``t`` whose last dimension is 1 or ``N``
    (scalar, ``[N]``, ``[1, N]``, ``[M, 1]``, ``[M, N]``, ...), with no legacy ``axis`` attribute;
  - the normalized axis provably is the MatMul's column axis, the last axis of ``Y``: a channel axis
    of -1, or a channel axis ``c`` with ``rank(Y) == c + 1``. For BatchNormalization (``c = 1``) this
    means rank-2 activations; a rank >= 3 ``Y`` (``[N, C, L]``: BN on axis 1, MatMul columns on
    axis 2) is refused, and so is a ``Y`` of unknown rank. Ranks are proven by
    :mod:`bnfold.ir.shapes` (graph input types, constants, each op's semantics; no opset number and
    no ``value_info`` trusted; an opset < 7 ``Add(t, bias, broadcast=1)`` has ``t``'s shape);
  - ``t`` (and ``u``) feed only the next node of the chain and are not graph outputs, or else (cloning
    allowed, the folded tensors within ``max_clone_bytes``) the new nodes are a folded clone of the
    chain and the originals keep their other users;
  - the folded ``B_f`` and ``bias_f`` are finite in the model's dtype (no fp16 overflow).
  A lone constant Add right after a MatMul is its bias, already the folded form: it is not a
  normalization here. A ``B`` or ``bias`` shared with another node is not changed: private folded copies are written.
Formula:  per column ``n`` (float64): ``scale * (A @ B + bias) + shift = A @ (B * scale) +
          (scale * bias + shift)``, so ``B_f = B * scale`` on its last axis and
          ``bias_f = scale * bias + shift`` (``bias`` = 0 if absent), shaped ``broadcast(bias, [N])``;
          element by element, so any bias of the shapes above is exact. Each folded tensor is rounded
          once to ``B``'s dtype. The Gemm form (``alpha = beta = 1``, no transposes) computes the same
          ``A @ B_f + bias_f`` in one node, as onnxruntime's own MatMul+BN fusion emits; it is only used
          where Gemm's rank-2 inputs are proven, never guessed. In opset < 7 models the new Gemm or Add
          carries ``broadcast=1``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from onnx import helper

from bnfold.folding.math import RoundingError, WeightLayout, fold_bias
from bnfold.folding.rules.base import (
    Fold,
    FoldContext,
    Norm,
    Skip,
    clone_refusal,
    constant_or_skip,
    copy_node,
    float_constant,
    new_tensor,
    rounding_skip,
    sole_consumer_skip,
    unique_node_name,
)
from bnfold.ir.nodes import attr, is_op
from bnfold.ir.shapes import Shape, rank_of, shape_of
from bnfold.ir.unknown import why_unknown
from bnfold.ir.view import GraphView

__all__ = ["NAME", "match"]

log = logging.getLogger(__name__)

NAME = "matmul"

_LEGACY_ATTRS = frozenset({"is_test", "consumed_inputs", "broadcast"})


def _find_chain(view: GraphView, norm: Norm) -> tuple[int, int | None, int | None] | None:
    """``(matmul, add, bias input position)`` feeding ``norm``, or None when the pattern is not ours."""
    producer = view.producer_of(norm.input)
    if producer is None:
        return None
    node = view.node(producer)
    if is_op(node, "MatMul"):
        return producer, None, None
    if not is_op(node, "Add") or len(node.input) != 2:
        return None
    for pos in (0, 1):
        mm = view.producer_of(node.input[pos])
        if mm is not None and is_op(view.node(mm), "MatMul"):
            return mm, producer, 1 - pos
    return None


def _legacy_broadcast(view: GraphView, nodes: list[int]) -> bool:
    """Whether these nodes carry attributes that exist only before opset 7 (``is_test``, ``broadcast``):
    how an Add-1/6 says it broadcasts, and a fallback when the model's opset is unknown."""
    return any(a.name in _LEGACY_ATTRS for i in nodes for a in view.node(i).attribute)


def _bias_fits_gemm(bias_dims: list[int], a_shape: Shape | None) -> bool:
    """Gemm's C must broadcast to [M, N] without changing the output's shape: a bias with more rows than
    A (``[1, K] @ B + [M', 1]``) makes MatMul + Add taller than a Gemm can be, so it stays an Add."""
    if len(bias_dims) <= 1 or bias_dims[0] == 1:
        return True
    return len(bias_dims) == 2 and a_shape is not None and len(a_shape) == 2 and a_shape[0].value == bias_dims[0]


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    view = ctx.view
    found = _find_chain(view, norm)
    if found is None:
        return None
    mm, add, bias_pos = found
    node = view.node(mm)
    desc = view.describe(mm)
    norm_node = view.producer_of(norm.output)
    if norm_node is None or norm_node not in norm.nodes:
        return None
    if add is None and norm.nodes == (norm_node,) and is_op(view.node(norm_node), "Add"):
        return None  # a lone constant Add after a MatMul is a bias, already the folded form

    def skip(reason: str) -> Skip:
        return ctx.skip(norm.output, norm.op_type, reason)

    # who else reads t (and u): those keep the originals, and the folded chain becomes a clone
    add_conflict = sole_consumer_skip(ctx, add, norm) if add is not None else None
    with_add = dataclasses.replace(norm, nodes=(*norm.nodes, *([add] if add is not None else [])))
    mm_conflict = sole_consumer_skip(ctx, mm, with_add)
    conflict = add_conflict or mm_conflict
    if conflict is not None and not ctx.options.clone:
        return clone_refusal(ctx, norm, conflict, 0)

    bias: np.ndarray | None = None
    bias_name: str | None = None
    if add is not None and bias_pos is not None:
        add_node = view.node(add)
        bias_name = add_node.input[bias_pos]
        got = constant_or_skip(ctx, bias_name, f"bias of {view.describe(add)}", norm)
        if isinstance(got, Skip):
            return got
        if attr(add_node, "axis") is not None:
            return skip(f"{view.describe(add)} broadcasts its bias '{bias_name}' with a legacy axis attribute")
        bias = got

    b_name = node.input[1]
    b = float_constant(ctx, norm, b_name, "weight", desc)
    if isinstance(b, Skip):
        return b
    if b.ndim < 2:
        return skip(f"weight '{b_name}' of {desc} is a vector: the product has no column axis to scale")
    n = int(b.shape[-1])
    if n != norm.affine.channels:
        return skip(f"{desc} has {n} output columns but the normalization has {norm.affine.channels} channels")
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] not in (1, n):
        return skip(f"bias '{bias_name}' has shape {list(bias.shape)}: its last axis is neither 1 nor {n}")

    a_rank, y_rank = rank_of(view, node.input[0]), rank_of(view, norm.input)
    if y_rank is None and add is not None and bias_pos == 1 and _legacy_broadcast(view, [add]):
        y_rank = rank_of(view, node.output[0])  # Add-1/6 with broadcast=1: the output has A's shape
    axis = norm.channel_axis
    if axis < 0 and axis != -1:
        return skip(f"the normalization's channel axis {axis} is not the column axis (-1) of {desc}")
    if axis >= 0:
        what = f"'{norm.input}', the input of the {norm.op_type}"
        if y_rank is None:
            return skip(
                f"the rank of {what}, is unknown, so its channel axis {axis} cannot be proven to be the "
                f"column axis (the last) of {desc}{why_unknown(view, norm.input)}"
            )
        if axis != y_rank - 1:
            return skip(
                f"{norm.op_type} normalizes axis {axis} of the rank-{y_rank} tensor {what}, but the "
                f"columns of {desc} are its last axis ({y_rank - 1})"
            )

    with_bias = add is not None or bool(np.any(norm.affine.shift))
    bias64 = fold_bias(bias, norm.affine, flat=False)
    if conflict is not None:  # decided before computing (or, for a large model, spilling) any tensor
        bias_bytes = bias64.size * (b if bias is None else bias).itemsize if with_bias else 0
        refusal = clone_refusal(ctx, norm, conflict, b.nbytes + bias_bytes)
        if refusal is not None:
            return refusal
    try:
        b_new = new_tensor(ctx, WeightLayout(-1).scale(b, norm.affine.scale), b.dtype, f"{b_name}_bnfold",
                           f"weight of {desc}")
        tensors = [b_new]
        if with_bias:
            tensors.append(new_tensor(ctx, bias64, b.dtype if bias is None else bias.dtype,
                                      f"{bias_name or node.output[0]}_bnfold_bias", f"bias of {desc}"))
    except RoundingError as exc:
        return rounding_skip(ctx, norm, exc)

    keep_add = add is not None and add_conflict is not None
    keep_mm = keep_add or mm_conflict is not None
    mm_name = unique_node_name(view, node) if keep_mm else node.name
    # before opset 7, Gemm and Add broadcast only when told to
    old_opset = 0 < ctx.opset < 7 if ctx.opset else _legacy_broadcast(view, [mm, *with_add.nodes])
    legacy: dict[str, Any] = {"broadcast": 1} if old_opset else {}  # extra attributes for make_node
    if not with_bias:  # nothing to add: the MatMul itself writes the normalization's output
        new_nodes = [copy_node(node, inputs=[node.input[0], b_new.name], outputs=[norm.output], name=mm_name)]
    elif a_rank == 2 and b.ndim == 2 and _bias_fits_gemm(list(tensors[1].dims), shape_of(view, node.input[0])):
        log.debug("%s with %s becomes one Gemm", desc, norm.op_type)
        gemm = helper.make_node("Gemm", [node.input[0], b_new.name, tensors[1].name], [norm.output],
                                name=mm_name, **legacy)
        gemm.doc_string = node.doc_string
        new_nodes = [gemm]
    else:
        t_new = ctx.names.fresh(f"{node.output[0]}_bnfold") if keep_mm else node.output[0]
        new_mm = copy_node(node, inputs=[node.input[0], b_new.name], outputs=[t_new], name=mm_name)
        if add is not None and bias_pos is not None:
            add_inputs = list(view.node(add).input)
            add_inputs[1 - bias_pos], add_inputs[bias_pos] = t_new, tensors[1].name
            add_name = unique_node_name(view, view.node(add)) if keep_add else view.node(add).name
            new_add = copy_node(view.node(add), inputs=add_inputs, outputs=[norm.output], name=add_name)
        else:  # a new Add takes the normalization's place and node name
            new_add = helper.make_node("Add", [t_new, tensors[1].name], [norm.output],
                                       name=view.node(norm_node).name, **legacy)
        new_nodes = [new_mm, new_add]
    removed = [*norm.nodes, *([] if keep_mm else [mm]), *([add] if add is not None and not keep_add else [])]
    # the new chain stands where the normalization stood: after A, before every reader of its output
    return Fold(rule=NAME, producer_op=node.op_type, norm=norm, replace={}, remove=tuple(removed),
                tensors=tuple(tensors), insert_before={norm_node: tuple(new_nodes)})
