"""Refusals shared by the producer rules (Conv, ConvTranspose, Gemm: bnfold/folding/rules/linear.py,
base.py, gemm.py, conv_transpose.py) on malformed producers: one test per reason, asserting its text."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import make_model, tensor
from onnx import helper
from refusal_graphs import bn, bn_inits, reasons, vi


def _producer_bn(op: str, inputs: list[str], weight: np.ndarray, x_shape: list[int],
                 extra: tuple[onnx.TensorProto, ...] = (), **attrs: object) -> onnx.ModelProto:
    inits = [tensor("W", weight), *extra, *bn_inits(4)]
    nodes = [helper.make_node(op, inputs, ["t"], **attrs), bn("t", "y")]
    return make_model(nodes, [vi("x", x_shape)], [vi("y", None)], inits)


def test_refuses_conv_without_weight_input() -> None:
    model = _producer_bn("Conv", ["x"], np.ones((4, 3, 1, 1), np.float32), [1, 3, 4, 4])
    assert reasons(model) == ["Conv (output 't') has no weight input"]


def test_refuses_conv_weight_of_rank_one() -> None:
    model = _producer_bn("Conv", ["x", "W"], np.ones(4, np.float32), [1, 3, 4, 4])
    assert reasons(model) == ["weight 'W' of Conv (output 't') has rank 1"]


def test_refuses_conv_bias_of_the_wrong_size() -> None:
    model = _producer_bn("Conv", ["x", "W", "B"], np.ones((4, 3, 1, 1), np.float32), [1, 3, 4, 4],
                         extra=(tensor("B", np.zeros(3, np.float32)),))
    assert reasons(model) == ["bias 'B' of Conv (output 't') has 3 values, not 4"]


def test_refuses_gemm_b_of_rank_three() -> None:
    model = _producer_bn("Gemm", ["x", "W"], np.ones((3, 4, 1), np.float32), [2, 3])
    assert reasons(model) == ["B 'W' of Gemm (output 't') has rank 3, not 2"]


def test_refuses_conv_transpose_with_group_zero() -> None:
    model = _producer_bn("ConvTranspose", ["x", "W"], np.ones((3, 4, 1, 1), np.float32), [1, 3, 4, 4], group=0)
    assert reasons(model) == ["ConvTranspose (output 't') has group=0"]
