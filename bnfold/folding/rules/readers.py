"""Who reads a tensor, looking through Identity nodes: the forward folds (``bn_conv``, ``bn_gemm``) see
the dynamo exporter's ``BN -> Identity (a Dropout in eval) -> Conv / Gemm`` as ``BN -> Conv / Gemm``."""

from __future__ import annotations

from bnfold.ir.nodes import is_op
from bnfold.ir.view import GraphView

__all__ = ["through_identity"]


def through_identity(view: GraphView, out: str) -> tuple[list[tuple[int, str]], list[int], str]:
    """``(reader, tensor it reads)`` for every reader of ``out`` that is not an Identity, the Identity
    nodes passed on the way (a fold removes them), and a phrase naming one whose output is a graph
    output (empty when none is)."""
    readers: list[tuple[int, str]] = []
    identities: list[int] = []
    blocker = ""
    stack = [out]
    while stack:
        name = stack.pop()
        for idx in view.consumers_of(name):
            node = view.node(idx)
            passes = is_op(node, "Identity") and list(node.input) == [name] and len(node.output) == 1
            if passes and idx not in identities:
                if view.is_graph_output(node.output[0]):
                    blocker = blocker or f"'{node.output[0]}' from {view.describe(idx)} is a graph output"
                identities.append(idx)
                stack.append(node.output[0])
                continue
            readers.append((idx, name))
    return readers, identities, blocker
