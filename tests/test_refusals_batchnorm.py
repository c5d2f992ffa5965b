"""BatchNormalization refusals read from the node itself (bnfold/folding/rules/batchnorm.py): one test
per reason not covered by the Conv refusal tests, asserting the reason's distinctive phrase."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import make_model, tensor
from onnx import helper
from refusal_graphs import bn, bn_inits, reasons, vi


def _conv_bn(sizes: list[int] | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    inits = [tensor("W", np.ones((4, 3, 1, 1), np.float32)), *bn_inits(4, sizes=sizes)]
    return [helper.make_node("Conv", ["x", "W"], ["t"]), bn("t", "y")], inits


def test_refuses_bn_without_five_inputs() -> None:
    nodes, inits = _conv_bn()
    del nodes[1].input[4]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    assert reasons(model) == ["BatchNormalization (output 'y') does not have the five inputs X, scale, B, mean, var"]


def test_refuses_statistics_of_different_sizes() -> None:
    nodes, inits = _conv_bn(sizes=[4, 4, 3, 4])
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    assert reasons(model) == ["BatchNormalization (output 'y') has statistics of different sizes [3, 4]"]
