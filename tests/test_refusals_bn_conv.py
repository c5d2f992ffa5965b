"""bn_conv refusals (a normalization folded forward into the Conv after it, bnfold/folding/rules/bn_conv.py)
on Convs that cannot take it: one test per reason, asserting its text. The BatchNormalization reads a
graph input, so there is no producer to fold it into backwards and the reason says so first."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, tensor
from onnx import helper
from refusal_graphs import bn, bn_inits, reasons, vi

PREFIX = ("there is no linear producer to fold into (its input 'x' is a graph input), and it cannot fold into "
          "Conv (output 'z'): ")


def _bn_conv(conv_inputs: list[str], weight: np.ndarray, extra: tuple[onnx.TensorProto, ...] = ()) -> onnx.ModelProto:
    inits = [tensor("W", weight), *extra, *bn_inits(3)]
    inputs = [vi("x", [1, 3, 4, 4])] + ([vi("B", [4])] if "B" in conv_inputs and not extra else [])
    nodes = [bn("x", "y"), helper.make_node("Conv", conv_inputs, ["z"])]
    return make_model(nodes, inputs, [vi("z", None)], inits)


F32 = np.ones((4, 3, 1, 1), np.float32)


@pytest.mark.parametrize(
    ("conv_inputs", "weight", "extra", "reason"),
    [
        (["y"], F32, (), "it has no weight"),
        (["y", "W"], np.ones((4, 3, 1, 1), np.int32), (), "weight 'W' is not floating point"),
        (["y", "W", "B"], F32, (), "bias 'B' is a graph input, not a constant"),
        (["y", "W"], np.ones((4, 3), np.float32), (), "weight 'W' has shape [4, 3]"),
        (["y", "W"], np.ones((4, 2, 1, 1), np.float32), (), "it has 2 input channels but the normalization has 3"),
        (["y", "W", "B"], F32, (tensor("B", np.zeros(3, np.float32)),), "bias 'B' has 3 values"),
    ],
    ids=["no-weight", "int-weight", "bias-not-constant", "weight-rank-2", "channel-count", "bias-size"],
)
def test_refuses_conv_that_cannot_take_the_normalization(
    conv_inputs: list[str], weight: np.ndarray, extra: tuple[onnx.TensorProto, ...], reason: str
) -> None:
    assert reasons(_bn_conv(conv_inputs, weight, extra)) == [PREFIX + reason]
