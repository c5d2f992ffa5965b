"""conv: fold a per-channel normalization into the Conv that produces its input.

Before:   ``t = Conv(X, W, B?)``; ``Y = BatchNormalization(t, gamma, beta, mean, var)``
After:    ``Y = Conv(X, W', B')``  (the BatchNormalization is gone; ``t`` no longer exists)
Conditions:
  - the Conv (any rank: 1-D, 2-D, 3-D; any group, dilation, stride, pads, auto_pad) is in the default
    domain; ``W`` (and ``B`` if present) are constants: initializers, ``Constant`` nodes, or constants
    of an enclosing graph, not graph inputs;
  - ``W`` is floating point (fp16, bf16, fp32, fp64) with ``W.shape[0]`` equal to the channel count;
  - ``t`` feeds only the normalization and is not a graph output; otherwise the Conv is cloned (the
    clone carries the folded weights and writes ``Y``, the original keeps its other users) when
    cloning is on and the folded tensors fit ``max_clone_bytes``;
  - the folded ``W'`` and ``B'`` are finite in the model's dtype (no fp16 overflow).
  A ``W`` shared with another node is not changed: the Conv gets a private folded copy.
Formula:  ``W'[m] = W[m] * scale[m]``, ``B'[m] = B[m] * scale[m] + shift[m]`` (``B`` = 0 if absent),
          float64, each rounded once to ``W``'s dtype. Output channel ``m`` is weight row ``m`` for every
          ``group``: a grouped Conv's weight is ``[M, C/group, k...]``.
"""

from __future__ import annotations

from bnfold.folding.producers import weight_layout
from bnfold.folding.rules.base import Fold, FoldContext, Norm, Skip, producer_index
from bnfold.folding.rules.linear import fold_weight_bias

__all__ = ["NAME", "match"]

NAME = "conv"


def match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    producer = producer_index(ctx, norm.input, "Conv")
    if producer is None:
        return None
    return fold_weight_bias(ctx, NAME, producer, norm, weight_layout(ctx.view.node(producer)))
