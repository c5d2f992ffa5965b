"""The affine rule through layout ops (Transpose, Reshape, Identity): the layout rule proves the channel
mapping; a constant on a non-channel axis is refused by it, an ordinary broadcast is not reported.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_same_outputs, make_model, ops, tensor
from onnx import TensorProto, helper

import bnfold


def conv_layout_then(layout: list[onnx.NodeProto], steps: list[tuple[str, np.ndarray]],
                     extra: tuple[onnx.TensorProto, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(8)
    inits = [tensor("W", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)), *extra]
    nodes = [helper.make_node("Conv", ["x", "W"], ["t"], name="conv", pads=[1, 1, 1, 1]), *layout]
    cur = layout[-1].output[0]
    for i, (op, const) in enumerate(steps):
        inits.append(tensor(f"k{i}", const))
        out = "y" if i == len(steps) - 1 else f"s{i}"
        nodes.append(helper.make_node(op, [cur, f"k{i}"], [out], name=f"step{i}"))
        cur = out
    shape = [2, 2, 5, 3]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return model, {"x": rng.standard_normal(shape).astype(np.float32)}


def test_c_vector_on_nhwc_after_transpose_is_per_channel() -> None:
    """The same [C] constant that is refused on NCHW is the channel axis once a Transpose made it NHWC."""
    rng = np.random.default_rng(9)
    nhwc = helper.make_node("Transpose", ["t"], ["u"], perm=[0, 2, 3, 1], name="nhwc")
    model, feeds = conv_layout_then([nhwc], [("Mul", rng.uniform(0.5, 2, 4).astype(np.float32)),
                                             ("Add", rng.standard_normal(4).astype(np.float32))])
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv", "Transpose"]
    assert [(p.rule, p.norm_op) for p in result.folded] == [("layout", "Mul+Add")]
    assert_same_outputs(model, result.model, feeds)


def test_scalar_after_reshape_folds_whatever_the_layout() -> None:
    shape = tensor("target", np.array([0, 2, -1], np.int64))  # mixes channels: fine for one value
    reshape = helper.make_node("Reshape", ["t", "target"], ["u"], name="reshape")
    model, feeds = conv_layout_then([reshape], [("Mul", np.array(0.25, np.float32)),
                                                ("Sub", np.array([1.5], np.float32))], (shape,))
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv", "Reshape"]
    assert_same_outputs(model, result.model, feeds)


def test_through_layout_a_constant_on_a_non_channel_axis_is_refused_by_layout() -> None:
    identity = helper.make_node("Identity", ["t"], ["u"], name="identity")
    model, feeds = conv_layout_then([identity], [("Mul", np.array([1.0, 2.0, 3.0], np.float32))])
    result = bnfold.fold(model)
    [skip] = result.skipped
    assert skip.op_type == "Mul" and "maps to axis 3 of 't', not to the output channel axis 1" in skip.reason
    assert_same_outputs(model, result.model, feeds)


def test_through_layout_an_ordinary_broadcast_is_not_reported() -> None:
    nhwc = helper.make_node("Transpose", ["t"], ["u"], perm=[0, 2, 3, 1], name="nhwc")
    pos = np.random.default_rng(10).standard_normal((5, 3, 1)).astype(np.float32)  # a positional term
    model, _ = conv_layout_then([nhwc], [("Add", pos)])
    result = bnfold.fold(model)
    assert result.folded == () and result.skipped == ()
