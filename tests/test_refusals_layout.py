"""layout refusals (bnfold/folding/rules/layout.py): a normalization reached from a producer through
layout ops whose channel mapping cannot be proven. One case per reason, asserting its text. Most graphs
are malformed on purpose (an axes list that is empty, missing or too short, a target shape that does not
fit), so the fold runs with ``check=False``: the rule, not the checker, must refuse them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import tensor
from onnx import TensorProto, helper
from test_rule_layout import _conv_layout_bn, _single_skip, bn_inits, bn_node

H = helper.make_node
PREFIX = "BatchNormalization is reached from Conv 'conv' via "


def _axes(values: list[int]) -> list[onnx.TensorProto]:
    return [tensor("ax", np.array(values, np.int64))]


def _runtime_axes() -> onnx.ModelProto:
    model = _conv_layout_bn([H("Unsqueeze", ["t", "ax"], ["u"], name="unsq")], 4, x_shape=[1, 2, 3, 3])
    model.graph.input.append(helper.make_tensor_value_info("ax", TensorProto.INT64, [1]))
    return model


CASES = {
    "transpose-without-perm": (  # the Conv's weight proves rank 4 even with an unshaped input
        lambda: _conv_layout_bn([H("Transpose", ["t"], ["u"], name="tr")], 4, x_shape=None),
        "Transpose, but its channel axis maps to axis 2 of 't', not to the output channel axis 1"),
    "transpose-perm-too-short": (
        lambda: _conv_layout_bn([H("Transpose", ["t"], ["u"], name="tr", perm=[0])], 4, x_shape=[1, 2, 3, 3]),
        "Transpose, but the axes of Transpose 'tr' cannot be read"),
    "unsqueeze-run-time-axes": (
        _runtime_axes, "Unsqueeze, but Unsqueeze 'unsq' takes its axes from a tensor computed at run time"),
    "squeeze-empty-axes": (
        lambda: _conv_layout_bn([H("Squeeze", ["t", "ax"], ["u"], name="sq")], 4, _axes([]), x_shape=[1, 2, 3, 3]),
        "Squeeze, but Squeeze 'sq' has an empty axes list"),
    "unsqueeze-without-axes": (
        lambda: _conv_layout_bn([H("Unsqueeze", ["t"], ["u"], name="unsq")], 4, x_shape=[1, 2, 3, 3]),
        "Unsqueeze, but Unsqueeze 'unsq' has no axes"),
    "unsqueeze-inserts-the-channel-axis": (
        lambda: _conv_layout_bn([H("Unsqueeze", ["t", "ax"], ["u"], name="unsq")], 4, _axes([1]),
                                x_shape=[1, 2, 3, 3]),
        "Unsqueeze, but Unsqueeze 'unsq' inserts the channel axis 1 itself"),
    "squeeze-leaves-no-channel-axis": (
        lambda: _conv_layout_bn([H("Squeeze", ["t", "ax"], ["u"], name="sq")], 4, _axes([0, 2, 3]),
                                x_shape=[1, 2, 1, 1]),
        "Squeeze, but Squeeze 'sq' leaves no axis 1"),
    "reshape-target-does-not-fit": (
        lambda: _conv_layout_bn([H("Reshape", ["t", "ax"], ["u"], name="rs")], 4, _axes([-1, -1]),
                                x_shape=[1, 2, 3, 3]),
        "Reshape, but Reshape 'rs' has target shape [-1, -1], which does not fit 't'"),
    "reshape-has-no-channel-axis": (
        lambda: _conv_layout_bn([H("Reshape", ["t", "ax"], ["u"], name="rs")], 4, _axes([-1]), x_shape=[1, 2, 3, 3]),
        "Reshape, but Reshape 'rs' has no output axis 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refuses_unprovable_channel_mapping(case: str) -> None:
    build, reason = CASES[case]
    assert _single_skip(build(), check=False) == PREFIX + reason


def test_refuses_matmul_output_of_unknown_rank() -> None:
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.standard_normal((3, 4)).astype(np.float32)), *bn_inits(4, np.dtype(np.float32), rng)]
    nodes = [H("MatMul", ["x", "W"], ["t"]), H("Identity", ["t"], ["u"], name="id"), bn_node("u", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert _single_skip(model, check=False) == (
        "BatchNormalization is reached from MatMul (output 't') via Identity, but the rank of its output 't' is "
        "unknown, so its last (column) axis is not known")
