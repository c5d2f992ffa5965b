"""What blocks the forward fold of a normalization that has no producer to fold into: a phrase for the
refusal, naming the op by name and kind (``BN -> Relu -> Conv``: the Relu).

A forward fold (``bn_conv``, ``bn_gemm``) needs every reader of the normalization's output to be a
linear op (Conv, Gemm, MatMul, through a Flatten / Reshape for the last two) that reads it as data. The
first reader that is not one blocks it; a reader that reads only the shape or element type
(``Shape``, ``CastLike``'s target) is named last, since it is rarely what the user must change.
"""

from __future__ import annotations

from bnfold.folding.rules.base import FoldContext, Norm, by_blocking
from bnfold.ir.nodes import is_op

__all__ = ["forward_blocker"]

_FORWARD = ("Conv", "Gemm", "MatMul", "Flatten", "Reshape", "Identity")


def forward_blocker(ctx: FoldContext, norm: Norm) -> str:
    """A phrase (starting with "no forward fold either: ...") naming what blocks folding the normalization
    into what follows it; empty when nothing reads its output."""
    view = ctx.view
    out = norm.output
    if view.is_graph_output(out):
        return f"no forward fold either: its output '{out}' is a graph output"
    readers = by_blocking(view, out, [i for i in view.consumers_of(out) if not is_op(view.node(i), _FORWARD)])
    if not readers:
        return ""
    idx = readers[0]
    node = view.node(idx)
    after = [view.describe(j) for j in view.consumers_of(node.output[0])] if node.output else []
    into = f" between it and {after[0]}" if after and len(after) == 1 else ""
    return (f"no forward fold either: its output '{out}' goes to {view.describe(idx)}{into}, and a "
            f"{node.op_type} is not a linear op a normalization can be folded through")
