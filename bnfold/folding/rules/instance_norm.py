"""instance_norm: fold an InstanceNorm with running statistics, in the tiled form exporters write.

Before:   ``t = P(X, W, ...)`` of shape ``[N, C, S...]``; ``R = Reshape(t, [1, N*C, S'...])``;
          ``Y = BatchNormalization(R, tile(gamma, N), tile(beta, N), tile(mean, N), tile(var, N))``;
          ``Z = Reshape(Y, [N, C, S...])``  (``nn.InstanceNorm2d(C, track_running_stats=True)`` in eval,
          exported by torch's legacy exporter: the batch size is baked into the shapes)
After:    ``f = P(X, W', ...)``; ``Y = Reshape(f, [1, N*C, S'...])``; ``Z = Reshape(Y, ...)``  (the
          normalization is gone; the Reshapes stay, and cost nothing)
Conditions:
  - ``R`` is reached from the linear producer ``P`` (Conv, ConvTranspose, Gemm, MatMul [+ bias Add])
    through layout ops, the last of which merges the batch and channel axes: ``t``'s shape
    ``[N, C, S...]`` and ``R``'s shape ``[1, N*C, S'...]`` are proven (from graph inputs and constants)
    with ``prod(S) = prod(S')``, so channel ``j`` of ``R`` is channel ``j mod C`` of batch element
    ``j div C``;
  - the statistics are equal for every batch element: ``scale[j] = scale[j mod C]`` and
    ``shift[j] = shift[j mod C]`` exactly (what running statistics tiled over the batch give);
    otherwise the map differs between samples and no weight of ``P`` can hold it: refused;
  - the tensors on the way have no other users; then ``P``'s own rule conditions.
Formula:  ``BN(R)[n*C + c] = scale[c] * t[n, c] + shift[c]``: ``P``'s rule folds the per-channel map
          ``(scale[:C], shift[:C])`` (float64, rounded once) and the Reshapes move its output as before.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.math import Affine
from bnfold.folding.producers import delegate
from bnfold.folding.rules import layout
from bnfold.folding.rules.base import Fold, FoldContext, Norm, Skip
from bnfold.ir.nodes import is_op
from bnfold.ir.shapes import ONE, product, shape_of

__all__ = ["NAME", "match"]

NAME = "instance_norm"


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    view = ctx.view
    merge = view.producer_of(norm.input)
    if merge is None or norm.channel_axis != 1:
        return None
    last = view.node(merge)
    if not is_op(last, "Reshape") or last.output[0] != norm.input:
        return None
    xs = shape_of(view, last.input[0])
    ys = shape_of(view, norm.input)
    if xs is None or ys is None or len(xs) < 2 or len(ys) < 2 or ys[0] != ONE:
        return None
    n, c = xs[0].value, xs[1].value
    if n is None or c is None or n < 2 or ys[1].value != n * c or product(xs[2:]) != product(ys[2:]):
        return None  # not the batch-into-channels reshape: the layout rule says why
    # the tiled form: from here on, every refusal is this rule's own
    desc = view.describe(merge)

    def skip(reason: str) -> Skip:
        return ctx.skip(norm.output, norm.op_type, f"{norm.op_type} normalizes the batch-merged channels of "
                        f"{desc} (an InstanceNorm with running statistics, batch {n}), but {reason}")

    if norm.affine.channels != n * c:
        return skip(f"it has {norm.affine.channels} channels, not {n} x {c}")
    scale = norm.affine.scale.reshape(n, c)
    shift = norm.affine.shift.reshape(n, c)
    if not (np.array_equal(scale, np.broadcast_to(scale[0], scale.shape))
            and np.array_equal(shift, np.broadcast_to(shift[0], shift.shape))):
        return skip("its statistics differ between batch elements, so no weight can hold the map")
    found = layout.walk_back(view, norm.input)
    if found is None:
        src = view.producer_of(last.input[0])
        where = "a graph input" if src is None else view.describe(src)
        return skip(f"its input '{last.input[0]}' comes from {where}, not a linear producer (Conv, "
                    "ConvTranspose, Gemm, MatMul) to fold into")
    chain, t, prod = found
    if len(chain) > 1:
        return skip("the layout ops before the Reshape are not supported")
    if prod.channel_axis != 1:
        return skip(f"the channels are not the output channel axis of {prod.describe(view)}")
    mid = chain[0]
    if view.is_graph_output(t) or view.is_graph_output(norm.input):
        return skip("a tensor on the way is a graph output")
    others = [i for i in view.consumers_of(norm.input) if i not in norm.nodes]
    if others:
        return skip(f"'{norm.input}' also feeds {view.describe(others[0])}")
    virtual = Norm(nodes=(mid, *norm.nodes), input=t, output=norm.output,
                   affine=Affine(scale[0].copy(), shift[0].copy()), channel_axis=prod.norm_axis,
                   op_type=norm.op_type)
    outcome = delegate(ctx, virtual, ctx.producer_rules)
    if outcome is None:
        return skip(f"no rule folds into {prod.describe(view)}")
    if isinstance(outcome, Skip):
        return outcome
    folded = layout.rewire(ctx, outcome, norm, chain, [t, norm.input], 0)
    if isinstance(folded, Fold):
        return Fold(rule=NAME, producer_op=folded.producer_op, norm=folded.norm, replace=folded.replace,
                    remove=folded.remove, tensors=folded.tensors, insert_before=folded.insert_before)
    return folded
