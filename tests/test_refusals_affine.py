"""Affine-rule refusals (Mul / Add / Sub / Div by constants after a producer): one test each, asserting the
reason; arithmetic that is not a normalization is not reported at all.
"""

from __future__ import annotations

import numpy as np
from affine_cases import conv_then
from conftest import assert_same_outputs, make_model, ops, tensor
from onnx import TensorProto, helper

import bnfold


def test_refuses_constant_varying_along_several_axes() -> None:
    model, feeds = conv_then("Mul", np.random.default_rng(0).uniform(1, 2, (4, 3, 1)).astype(np.float32))
    result = bnfold.fold(model)
    assert result.folded == ()
    [skip] = result.skipped
    assert "varies along axes [1, 2]" in skip.reason and "not one value per channel" in skip.reason
    assert_same_outputs(model, result.model, feeds)


def test_refuses_constant_of_higher_rank() -> None:
    model, feeds = conv_then("Add", np.ones((1, 1, 1, 1, 1), np.float32))
    result = bnfold.fold(model)
    [skip] = result.skipped
    assert "more dimensions than the rank-4 output 't'" in skip.reason
    assert_same_outputs(model, result.model, feeds)


def test_refuses_division_by_zero() -> None:
    model, _ = conv_then("Div", np.array([1.0, 0.0, 2.0, 4.0], np.float32).reshape(4, 1, 1))
    result = bnfold.fold(model)
    [skip] = result.skipped
    assert "contains a zero" in skip.reason and "'k'" in skip.reason


def test_refuses_fp16_overflow() -> None:
    rng = np.random.default_rng(1)
    inits = [tensor("W", rng.uniform(1, 2, (2, 2, 1, 1)).astype(np.float16)),
             tensor("k", np.array([6e4, 1.0], np.float16).reshape(2, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["t"], name="conv"),
             helper.make_node("Mul", ["t", "k"], ["y"], name="scale")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2, 2, 2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], inits)
    result = bnfold.fold(model)
    [skip] = result.skipped
    assert skip.op_type == "Mul" and "overflows float16" in skip.reason


def test_refuses_legacy_axis_broadcast() -> None:
    model, _ = conv_then("Mul", np.array([0.5, 2.0, -1.0, 3.0], np.float32))
    model.opset_import[0].version = 6
    model.graph.node[1].attribute.extend([helper.make_attribute("broadcast", 1), helper.make_attribute("axis", 1)])
    result = bnfold.fold(model, check=False)
    [skip] = result.skipped
    assert "legacy broadcasting with an axis attribute" in skip.reason


def test_refuses_channel_axis_that_is_not_the_producers() -> None:
    rng = np.random.default_rng(2)
    inits = [tensor("W", rng.standard_normal((3, 4)).astype(np.float32)),
             tensor("k", rng.uniform(1, 2, (5, 1)).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "W"], ["t"], name="gemm"),
             helper.make_node("Mul", ["t", "k"], ["y"], name="rows")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    [skip] = result.skipped
    assert "broadcasts along axis 0" in skip.reason and "channel axis 1" in skip.reason
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((5, 3)).astype(np.float32)})


def test_ordinary_mul_add_are_not_reported() -> None:
    """Not after a linear producer, or by a run-time tensor: not a normalization, nothing to say."""
    rng = np.random.default_rng(4)
    inits = [tensor("W", rng.standard_normal((4, 2, 1, 1)).astype(np.float32)),
             tensor("k", np.float32(2.0).reshape(()))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["t"], name="conv"),
        helper.make_node("Relu", ["t"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "k"], ["m"], name="after_relu"),
        helper.make_node("Sigmoid", ["m"], ["g"], name="gate"),
        helper.make_node("Mul", ["m", "g"], ["y"], name="runtime_mul"),
        helper.make_node("Div", ["k", "y"], ["z"], name="reciprocal"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert result.folded == () and result.skipped == ()
    assert ops(result.model) == ops(model)


def test_bare_matmul_bias_add_is_left_alone_and_does_not_loop() -> None:
    rng = np.random.default_rng(5)
    inits = [tensor("W", rng.standard_normal((3, 4)).astype(np.float32)),
             tensor("b", rng.standard_normal(4).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert result.folded == () and result.skipped == ()
    assert result.model.SerializeToString() == bnfold.fold(result.model).model.SerializeToString()


def test_refuses_constant_that_broadcasts_the_channels_to_more() -> None:
    inits = [tensor("W", np.ones((1, 3, 1, 1), np.float32)),
             tensor("k", np.array([1.0, 2.0, 3.0], np.float32).reshape(3, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["t"]), helper.make_node("Mul", ["t", "k"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)  # a valid model: Conv's one channel is broadcast to three
    assert result.folded == ()
    assert [s.reason for s in result.skipped] == [
        "constant 'k' of shape [3, 1, 1] has 3 values along the channel axis but the rank-4 output 't' of "
        "Conv (output 't') has 1"]


def test_refuses_legacy_broadcast_of_the_first_input() -> None:
    inits = [tensor("W", np.ones((4, 3, 1, 1), np.float32)),
             tensor("k", np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(4, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["t"]), helper.make_node("Mul", ["k", "t"], ["y"], broadcast=1)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, opset=6, ir_version=3)
    result = bnfold.fold(model, check=False)
    assert result.folded == ()
    assert [s.reason for s in result.skipped] == ["Mul (output 'y') broadcasts its first input (legacy broadcast=1)"]
