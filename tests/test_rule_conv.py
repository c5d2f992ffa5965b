"""Conv -> BatchNormalization: folds proven on onnxruntime, and the structure of the folded graph."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, make_model, ops, run_ort, runs_on_ort, tensor
from conv_cases import NP_TO_ONNX, ConvCase, _only_skip, _simple, build_conv_bn, conv_cases
from hypothesis import assume, given, settings
from onnx import TensorProto, helper

import bnfold


@settings(max_examples=300)
@given(conv_cases())
def test_conv_bn_folds_and_matches(case: ConvCase) -> None:
    model, feeds = build_conv_bn(case)
    x = feeds["x"]
    effective = [(k - 1) * d + 1 for k, d in zip(case.kernel, case.dilations, strict=True)]
    if case.pads is not None and any(
        x.shape[2 + i] + case.pads[i] + case.pads[i + case.rank] < effective[i] for i in range(case.rank)
    ):
        return  # empty output: not a valid Conv
    if case.auto_pad == "VALID" and any(x.shape[2 + i] < effective[i] for i in range(case.rank)):
        return
    assume(runs_on_ort(model, feeds))
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert [p.output for p in result.folded] == ["y"]
    assert result.skipped == ()
    folded = result.model
    assert [o.name for o in folded.graph.output] == ["y"]
    assert folded.opset_import == model.opset_import
    assert folded.ir_version == model.ir_version
    assert {t.name for t in folded.graph.initializer} == {n for n in folded.graph.node[0].input[1:]}
    for t in folded.graph.initializer:
        assert t.data_type == NP_TO_ONNX[case.dtype]
    assert_same_outputs(model, folded, feeds)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_folded_tensors_are_rounded_once_from_float64(dtype: type) -> None:
    case = ConvCase(2, 1, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), None, True, np.dtype(dtype), 15, 1e-3,
                    (5, 5), 7)
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        case.dtype = np.dtype(ml_dtypes.bfloat16)
        case.bn_opset = 15
    model, _ = build_conv_bn(case)
    result = bnfold.fold(model, check=np.dtype(dtype) != np.dtype(ml_dtypes.bfloat16))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    conv = result.model.graph.node[0]
    orig = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    scale = orig["gamma"] / np.sqrt(orig["var"] + float(np.float32(1e-3)))
    expect_w = orig["W"] * scale[:, None, None, None]
    expect_b = orig["B"] * scale + (orig["beta"] - orig["mean"] * scale)
    from bnfold.folding.math import round_to

    np.testing.assert_array_equal(init[conv.input[1]], round_to(expect_w, np.dtype(dtype), "w"))
    np.testing.assert_array_equal(init[conv.input[2]], round_to(expect_b, np.dtype(dtype), "b"))


def _bf16_as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every bfloat16 tensor widened exactly to float32 (onnxruntime's CPU provider
    has no bf16 Conv): the widened models compute the bf16 models' values in float32."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type == TensorProto.BFLOAT16:
            t.CopyFrom(tensor(t.name, onnx.numpy_helper.to_array(t).astype(np.float32)))
    for v in [*out.graph.input, *out.graph.output, *out.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return out


def test_bfloat16_conv_bn_fold_matches() -> None:
    case = ConvCase(2, 2, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), None, True,
                    np.dtype(ml_dtypes.bfloat16), 15, 1e-3, (5, 5), 3)
    model, feeds = build_conv_bn(case)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert all(t.data_type == TensorProto.BFLOAT16 for t in result.model.graph.initializer)
    x32 = {"x": feeds["x"].astype(np.float32)}
    expected = run_ort(_bf16_as_float32(model), x32)[0]
    got = run_ort(_bf16_as_float32(result.model), x32)[0]
    # folded weights carry bf16 rounding (8 bits of mantissa): compare at that precision
    assert float(np.max(np.abs(expected - got))) <= 2**-7 * 4 * max(1.0, float(np.max(np.abs(expected))))


def test_shared_weight_gets_private_copy() -> None:
    model, feeds = build_conv_bn(_simple(bias=False))
    model.graph.node.append(helper.make_node("Conv", ["x", "W"], ["other"], name="conv2", pads=[1, 1, 1, 1]))
    model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [2, 3, 5, 5]))
    result = bnfold.fold(model)
    assert "BatchNormalization" not in ops(result.model)
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert conv2.input[1] == "W"
    w_orig = next(t for t in model.graph.initializer if t.name == "W")
    w_kept = next(t for t in result.model.graph.initializer if t.name == "W")
    assert w_kept.SerializeToString() == w_orig.SerializeToString()
    assert_same_outputs(model, result.model, feeds)


def test_constant_node_parameters_fold_and_dead_constants_go() -> None:
    model, feeds = build_conv_bn(_simple())
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, feeds)


def test_names_and_contract_preserved() -> None:
    model, feeds = build_conv_bn(_simple())
    model.doc_string = "doc"
    model.producer_name = "unit"
    helper.set_model_props(model, {"author": "me"})
    model.graph.value_info.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [2, 3, 5, 5]))
    result = bnfold.fold(model)
    out = result.model
    assert out.doc_string == "doc" and out.producer_name == "unit"
    assert [(p.key, p.value) for p in out.metadata_props] == [("author", "me")]
    assert [i.SerializeToString() for i in out.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in out.graph.output] == [
        o.SerializeToString() for o in model.graph.output]
    assert all(v.name != "conv_out" for v in out.graph.value_info)
    assert {t.name for t in out.graph.initializer}.isdisjoint({"W", "B", "gamma", "beta", "mean", "var"})
    onnx.checker.check_model(out)
    assert_same_outputs(model, out, feeds)


def test_new_names_never_collide_with_numeric_names() -> None:
    model, feeds = build_conv_bn(_simple())
    rename = {"W": "1", "B": "2", "conv_out": "3", "gamma": "W_bnfold", "beta": "3_bnfold_bias"}
    for t in model.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for n in model.graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
    result = bnfold.fold(model)
    names = [t.name for t in result.model.graph.initializer]
    assert len(names) == len(set(names))
    assert_same_outputs(model, result.model, feeds)


def test_rerun_is_byte_identical_and_idempotent() -> None:
    model, _ = build_conv_bn(_simple())
    first = bnfold.fold(model).model.SerializeToString()
    second = bnfold.fold(model).model.SerializeToString()
    assert first == second
    again = bnfold.fold(first)
    assert again.folded == () and again.skipped == ()
    assert again.model.SerializeToString() == first


def test_input_model_not_mutated() -> None:
    model, _ = build_conv_bn(_simple())
    before = model.SerializeToString()
    bnfold.fold(model)
    assert model.SerializeToString() == before


def test_chained_bn_bn_folds_in_two_rounds() -> None:
    model, feeds = build_conv_bn(_simple())
    model.graph.node[1].output[0] = "mid"
    model.graph.node.append(helper.make_node("BatchNormalization", ["mid", "gamma", "beta", "mean", "var"], ["y"]))
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"] and len(result.folded) == 2
    assert_same_outputs(model, result.model, feeds)


def _if_model_with_conv_bn() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    inner, feeds = build_conv_bn(_simple())
    then_graph = helper.make_graph(list(inner.graph.node), "then", [],
                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                                   [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])
    if_node = helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then_graph,
                               else_branch=else_graph)
    model = make_model(
        [if_node],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), *inner.graph.input],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        list(inner.graph.initializer),
    )
    feeds["cond"] = np.array(True)
    return model, feeds


def test_bn_inside_if_branch_folds_with_outer_constants() -> None:
    model, feeds = _if_model_with_conv_bn()
    result = bnfold.fold(model)
    then_ops = [n.op_type for n in result.model.graph.node[0].attribute[0].g.node]
    assert "BatchNormalization" not in then_ops
    assert result.folded[0].graph == "If 'branch'.then_branch"
    assert {t.name for t in result.model.graph.initializer}.isdisjoint({"W", "gamma"})
    assert_same_outputs(model, result.model, feeds)


def test_graph_output_bn_hands_name_to_conv() -> None:
    model, _ = build_conv_bn(_simple())
    result = bnfold.fold(model)
    assert result.model.graph.node[0].output[0] == "y"


def test_bn6_without_is_test_is_training_mode() -> None:
    model, _ = build_conv_bn(_simple(bn_opset=7))
    model.opset_import[0].version = 6
    reason = _only_skip(model, check=False)
    assert "is_test=0" in reason and "training mode" in reason
    model.graph.node[1].attribute.append(helper.make_attribute("is_test", 1))
    assert ops(bnfold.fold(model, check=False).model) == ["Conv"]


def test_ir3_model_with_initializers_as_constants_lists_folded_tensors_as_inputs() -> None:
    model = onnx.load("models/legacy_ir3_bn.onnx")
    assert model.ir_version == 3
    default = bnfold.fold(model)  # IR < 4: initializers listed as inputs are constants by default
    assert not default.skipped and ops(default.model) == ops(bnfold.fold(model, initializers_as_constants=True).model)
    result = bnfold.fold(model, initializers_as_constants=True)
    out = result.model
    assert "BatchNormalization" not in ops(out) and out.ir_version == 3
    inputs = {i.name for i in out.graph.input}
    assert {t.name for t in out.graph.initializer} <= inputs
    onnx.checker.check_model(out)
    x = np.random.default_rng(0).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    assert_same_outputs(model, out, {model.graph.input[0].name: x})


def test_bn_inside_model_local_function_is_reported() -> None:
    model, _ = build_conv_bn(_simple())
    fn = helper.make_function("local", "ConvBn", ["x", "W", "gamma", "beta", "mean", "var"], ["y"],
                              [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])],
                              [helper.make_opsetid("", 15)])
    model.functions.append(fn)
    result = bnfold.fold(model, check=False)
    inside = [s for s in result.skipped if s.graph == "function local:ConvBn"]
    assert len(inside) == 1 and "model-local function" in inside[0].reason
    assert [p.output for p in result.folded] == ["y"]
