"""Conv -> BatchNormalization refusals: one test each, asserting the reason."""

from __future__ import annotations

import numpy as np
from conftest import assert_same_outputs, ops, tensor
from conv_cases import _only_skip, _simple, build_conv_bn
from onnx import TensorProto, helper

import bnfold


def test_refuses_training_mode() -> None:
    model, _ = build_conv_bn(_simple())
    bn = model.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    assert "training_mode=1" in _only_skip(model, check=False)


def test_refuses_extra_outputs() -> None:
    model, _ = build_conv_bn(_simple(bn_opset=9))
    bn = model.graph.node[1]
    bn.output.extend(["rm", "rv"])
    reason = _only_skip(model, check=False)
    assert "extra outputs" in reason and "'rm'" in reason


def test_refuses_non_constant_statistics() -> None:
    model, _ = build_conv_bn(_simple())
    init = [t for t in model.graph.initializer if t.name != "var"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(init)
    model.graph.input.append(helper.make_tensor_value_info("var", TensorProto.FLOAT, [3]))
    reason = _only_skip(model)
    assert "variance 'var' is a graph input" in reason


def test_refuses_weight_graph_input() -> None:
    model, _ = build_conv_bn(_simple())
    w = next(t for t in model.graph.initializer if t.name == "W")
    init = [t for t in model.graph.initializer if t.name != "W"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(init)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    assert "'W' is a graph input" in _only_skip(model)


def test_initializer_listed_as_input_refused_unless_flag() -> None:
    model, feeds = build_conv_bn(_simple())
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    reason = _only_skip(model)
    assert "also listed as a graph input" in reason and "--initializers-as-constants" in reason
    result = bnfold.fold(model, initializers_as_constants=True)
    assert ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, feeds)


def test_refuses_conv_output_with_another_consumer() -> None:
    model, _ = build_conv_bn(_simple())
    model.graph.node.append(helper.make_node("Relu", ["conv_out"], ["r"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3, 5, 5]))
    reason = _only_skip(model, clone=False)
    assert "'conv_out'" in reason and ("also feeds Relu 'other'" in reason or "graph output" in reason)


def test_refuses_conv_output_that_is_graph_output() -> None:
    model, _ = build_conv_bn(_simple())
    model.graph.output.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [2, 3, 5, 5]))
    assert "also a graph output" in _only_skip(model, clone=False)


def test_refuses_fp16_overflow() -> None:
    model, _ = build_conv_bn(_simple(dtype=np.dtype(np.float16)))
    for t in model.graph.initializer:
        if t.name == "var":
            t.CopyFrom(tensor("var", np.full(3, 1e-9, np.float32)))
        if t.name == "gamma":
            t.CopyFrom(tensor("gamma", np.full(3, 5000.0, np.float32)))
    reason = _only_skip(model)
    assert "overflows float16" in reason


def test_refuses_nan_statistics_and_non_positive_variance() -> None:
    model, _ = build_conv_bn(_simple())
    for t in model.graph.initializer:
        if t.name == "mean":
            t.CopyFrom(tensor("mean", np.array([0.0, np.nan, 1.0], np.float32)))
    assert "mean 'mean' contains NaN or inf" in _only_skip(model)
    model, _ = build_conv_bn(_simple(epsilon=1e-5))
    for t in model.graph.initializer:
        if t.name == "var":
            t.CopyFrom(tensor("var", np.array([1.0, -1.0, 1.0], np.float32)))
    assert "plus epsilon is not positive" in _only_skip(model)


def test_negative_variance_with_large_epsilon_still_folds() -> None:
    model, feeds = build_conv_bn(_simple(epsilon=0.5))
    for t in model.graph.initializer:
        if t.name == "var":
            t.CopyFrom(tensor("var", np.array([0.1, -0.2, 0.0], np.float32)))
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, feeds)


def test_refuses_bn_after_non_linear_op() -> None:
    model, _ = build_conv_bn(_simple())
    model.graph.node.insert(1, helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"))
    model.graph.node[2].input[0] = "relu_out"
    reason = _only_skip(model)
    assert "comes from Relu 'relu'" in reason


def test_refuses_bn_on_graph_input() -> None:
    model, _ = build_conv_bn(_simple())
    model.graph.node[1].input[0] = "x"
    model.graph.node[1].output[0] = "y"
    del model.graph.node[0]
    model.graph.initializer.pop(0)
    assert "'x' is a graph input" in _only_skip(model, check=False)


def test_spatial0_per_channel_statistics_fold_and_per_position_refused() -> None:
    model, feeds = build_conv_bn(_simple(bn_opset=7))
    model.graph.node[1].attribute.append(helper.make_attribute("spatial", 0))
    model.ir_version = 3
    result = bnfold.fold(model, check=False)
    assert "BatchNormalization" not in ops(result.model)
    model2, _ = build_conv_bn(_simple(bn_opset=7))
    model2.graph.node[1].attribute.append(helper.make_attribute("spatial", 0))
    rng = np.random.default_rng(0)
    for t in model2.graph.initializer:
        if t.name in {"gamma", "beta", "mean", "var"}:
            t.CopyFrom(tensor(t.name, rng.uniform(0.5, 1.0, (3, 5, 5)).astype(np.float32)))
    assert "spatial=0" in _only_skip(model2, check=False)
    assert feeds
