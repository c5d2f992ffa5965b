"""Which node is a linear producer, where its output channels are, and handing a normalization to the
producer rules (conv, conv_transpose, gemm, matmul). Shared by the affine, layout and bn_conv rules.

A *linear producer* is a Conv, ConvTranspose, Gemm or MatMul (default domain) whose weight is a
constant or an initializer (an initializer listed as a graph input still counts, so the producer rule
can say why it is not folded), or the bias ``Add(MatMul(A, B), const)`` of such a MatMul: the
matmul rule folds through that Add.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import onnx

from bnfold.folding.math import WeightLayout
from bnfold.folding.rules.base import Fold, FoldContext, Norm, Skip
from bnfold.ir.nodes import attr, is_op
from bnfold.ir.shapes import const_dims, rank_of
from bnfold.ir.view import GraphView

__all__ = ["Producer", "delegate", "linear_producer", "weight_layout"]


@dataclass(frozen=True)
class Producer:
    """A linear producer of tensor ``output``."""

    node: int
    """The node writing ``output``: the producer, or the bias Add after a MatMul."""
    op: str
    """``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul``."""
    output: str
    channels: int
    """Output channels (columns for Gemm / MatMul)."""
    rank: int | None
    """Rank of ``output``; None where it is unknown (MatMul with an activation of unknown rank)."""
    norm_axis: int
    """The channel axis a Norm for this producer carries: 1, or -1 (last axis) for MatMul."""
    bare_matmul: bool = False
    """A MatMul without its bias Add: a constant Add right after it is its bias, not a normalization."""

    @property
    def channel_axis(self) -> int | None:
        """The channel axis as a non-negative axis of ``output`` (None: rank unknown)."""
        if self.norm_axis >= 0:
            return self.norm_axis
        return None if self.rank is None else self.rank + self.norm_axis

    def describe(self, view: GraphView) -> str:
        return view.describe(self.node)


def weight_layout(node: onnx.NodeProto) -> WeightLayout:
    """Where the output channels of ``node``'s weight (input 1) lie, declared once per op: Conv
    ``[M, C/g, k...]`` axis 0; ConvTranspose ``[C, M/g, k...]`` axis 1 per group; Gemm ``B`` ``[K, N]`` axis 1
    (``[N, K]`` axis 0 with ``transB``); MatMul ``[..., K, N]`` its last axis."""
    op = node.op_type
    if op == "Conv":
        return WeightLayout(0)
    if op == "ConvTranspose":
        return WeightLayout(1, groups=int(attr(node, "group", 1)))
    if op == "Gemm":
        return WeightLayout(0 if attr(node, "transB", 0) else 1)
    if op == "MatMul":
        return WeightLayout(-1)
    raise ValueError(f"{op} is not a linear producer")


def _matmul(view: GraphView, idx: int) -> tuple[int, ...] | None:
    """The constant weight dims of the MatMul at ``idx`` (rank >= 2), else None."""
    node = view.node(idx)
    if not is_op(node, "MatMul") or len(node.input) < 2:
        return None
    dims = const_dims(view, node.input[1])
    return dims if dims is not None and len(dims) >= 2 else None


def linear_producer(view: GraphView, name: str) -> Producer | None:
    """The linear producer writing ``name``, or None when ``name`` is written by anything else."""
    idx = view.producer_of(name)
    if idx is None:
        return None
    node = view.node(idx)
    if name != node.output[0]:
        return None
    if is_op(node, "Conv") or is_op(node, "ConvTranspose"):
        dims = const_dims(view, node.input[1]) if len(node.input) > 1 else None
        if dims is None or len(dims) < 3:
            return None
        return Producer(idx, node.op_type, name, weight_layout(node).channels(dims), len(dims), 1)
    if is_op(node, "Gemm"):
        dims = const_dims(view, node.input[1]) if len(node.input) > 1 else None
        if dims is None or len(dims) != 2:
            return None
        return Producer(idx, "Gemm", name, weight_layout(node).channels(dims), 2, 1)
    dims = _matmul(view, idx)
    if dims is not None:
        return Producer(idx, "MatMul", name, dims[-1], rank_of(view, name), -1, bare_matmul=True)
    if is_op(node, "Add") and len(node.input) == 2:
        for pos in (0, 1):
            mm = view.producer_of(node.input[pos])
            other = node.input[1 - pos]
            if mm is None or view.constant(other).value is None:
                continue
            dims = _matmul(view, mm)
            if dims is not None and view.node(mm).output[0] == node.input[pos]:
                return Producer(idx, "MatMul", name, dims[-1], rank_of(view, name), -1)
    return None


def delegate(ctx: FoldContext, norm: Norm, rules: tuple[ModuleType, ...]) -> Fold | Skip | None:
    """The first Fold of ``rules`` for ``norm``, else their first Skip, else None."""
    first_skip: Skip | None = None
    for rule in rules:
        outcome = rule.match(ctx, norm)
        if isinstance(outcome, Fold):
            return outcome
        if isinstance(outcome, Skip) and first_skip is None:
            first_skip = outcome
    return first_skip
