"""gemm: fold a per-column normalization into the Gemm that produces its input.

Before:   ``t = Gemm(A, B, C?; alpha, beta, transA, transB)``  (``t = alpha * A' @ B' + beta * C``, ``[M, N]``);
          ``Y = BatchNormalization(t, gamma, beta_bn, mean, var)``  (channel axis 1 of ``[M, N]``: ``N``)
After:    ``Y = Gemm(A, B_f, C_f; alpha, beta=1, transA, transB)``  (the BatchNormalization is gone)
Conditions:
  - the Gemm is in the default domain (any version: 1, 6, 7, 9, 11, 13; the opset < 7 ``broadcast``
    attribute is kept); ``B`` (and ``C`` if present) are constants, not graph inputs; ``A`` may be
    anything, and ``transA`` does not matter;
  - ``B`` is a floating-point matrix (fp16, bf16, fp32, fp64) with ``N`` (``B.shape[1]``, or
    ``B.shape[0]`` with ``transB=1``) equal to the channel count;
  - ``C`` is absent or unidirectionally broadcastable to ``[M, N]``: scalar, ``[1]``, ``[N]``, ``[1, N]``,
    ``[M, 1]`` or ``[M, N]``; it contains no NaN or inf;
  - the normalization's channel axis is 1 (or -1) of the rank-2 output;
  - ``t`` feeds only the normalization and is not a graph output, or else (cloning allowed, the folded
    tensors within ``max_clone_bytes``) a folded clone of the Gemm writes ``Y`` and the original keeps
    its other users;
  - the folded ``B_f`` and ``C_f`` are finite in the model's dtype (no fp16 overflow).
  A ``B`` or ``C`` shared with another node is not changed: the Gemm gets private folded copies.
Formula:  with ``scale``/``shift`` per column ``n`` (float64):
          ``scale * t + shift = alpha * A' @ (B' * scale) + (beta * scale * C + shift)``, so
          ``B_f`` is ``B`` with column ``n`` of ``B'`` scaled by ``scale[n]`` (axis 1 of ``B``, or axis 0
          when ``transB=1``), ``C_f = beta * scale * C + shift`` (``C`` = 0 if absent) broadcast to
          ``broadcast(C.shape, [N])`` and ``beta`` becomes 1 (the attribute is dropped: 1 is its
          default). This holds element by element, so an ``[M, N]`` or ``[M, 1]`` ``C`` folds exactly
          too (``[M, 1]`` becomes ``[M, N]``). ``alpha``, ``transA``, ``transB`` are unchanged. Setting
          ``beta = 1`` avoids dividing by ``beta`` (``beta = 0``, or a tiny ``beta`` that would overflow).
          Each folded tensor is rounded once to ``B``'s dtype.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.math import RoundingError, fold_bias
from bnfold.folding.producers import weight_layout
from bnfold.folding.rules.base import (
    Fold,
    FoldContext,
    Norm,
    Skip,
    clone_refusal,
    copy_node,
    new_tensor,
    producer_fold,
    producer_index,
    rounding_skip,
    sole_consumer_skip,
    unique_node_name,
    weight_and_bias,
)
from bnfold.ir.nodes import attr

__all__ = ["NAME", "match"]

NAME = "gemm"


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    view = ctx.view
    producer = producer_index(ctx, norm.input, "Gemm")
    if producer is None:
        return None
    node = view.node(producer)
    desc = view.describe(producer)

    def skip(reason: str) -> Skip:
        return ctx.skip(norm.output, norm.op_type, reason)

    if norm.channel_axis not in (1, -1):
        return skip(
            f"the normalization's channel axis {norm.channel_axis} is not the column axis (1) of the "
            f"rank-2 output of {desc}"
        )
    conflict = sole_consumer_skip(ctx, producer, norm)
    if conflict is not None and not ctx.options.clone:
        return clone_refusal(ctx, norm, conflict, 0)
    read = weight_and_bias(ctx, norm, node, desc, ("B", "C"))
    if isinstance(read, Skip):
        return read
    b, c = read
    b_name = node.input[1]
    c_name = node.input[2] if c is not None else None
    if b.ndim != 2:
        return skip(f"B '{b_name}' of {desc} has rank {b.ndim}, not 2")
    layout = weight_layout(node)
    n = layout.channels(b.shape)
    if n != norm.affine.channels:
        return skip(f"{desc} has {n} output columns but the normalization has {norm.affine.channels} channels")
    c_shape: tuple[int, ...] = (n,)
    if c is not None:
        if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n)):
            return skip(f"C '{c_name}' of {desc} has shape {list(c.shape)}, not broadcastable to [M, {n}]")
        if not np.all(np.isfinite(np.asarray(c, dtype=np.float64))):
            return skip(f"C '{c_name}' of {desc} contains NaN or inf")
        c_shape = tuple(int(d) for d in np.broadcast_shapes(c.shape, (n,)))
    beta = float(attr(node, "beta", 1.0))
    c64 = fold_bias(c, norm.affine, beta=beta, flat=False)
    if conflict is not None:  # decided before computing (or, for a large model, spilling) any tensor
        c_bytes = int(np.prod(c_shape)) * (b if c is None else c).itemsize
        refusal = clone_refusal(ctx, norm, conflict, b.nbytes + c_bytes)
        if refusal is not None:
            return refusal
    try:
        b_new = new_tensor(ctx, layout.scale(b, norm.affine.scale), b.dtype, f"{b_name}_bnfold",
                           f"B of {desc}")
        c_new = new_tensor(ctx, np.broadcast_to(c64, c_shape), b.dtype if c is None else c.dtype,
                           f"{c_name or node.output[0]}_bnfold_bias", f"C of {desc}")
    except RoundingError as exc:
        return rounding_skip(ctx, norm, exc)
    # with conflict, the Gemm keeps its other users and a folded clone writes the output
    new_node = copy_node(node, inputs=[node.input[0], b_new.name, c_new.name], outputs=[norm.output],
                         name=unique_node_name(view, node) if conflict is not None else node.name)
    kept = [a for a in new_node.attribute if a.name != "beta"]
    del new_node.attribute[:]
    new_node.attribute.extend(kept)
    return producer_fold(ctx, NAME, producer, norm, new_node, (b_new, c_new), clone=conflict is not None)
