"""Valid but unusual input (exit 0): no BatchNormalization, bad statistics, custom domains, external data
given as bytes; each folds what it can and explains the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_faults import (
    NO_VERIFY,
    _external,
    assert_one_error_line,
    listing,
    run_cli,
    save,
)
from conftest import assert_same_outputs, make_model, ops
from onnx import TensorProto, helper, numpy_helper
from test_io_cli import conv_bn_model

import bnfold
from bnfold.errors import ExitCode


def test_no_batchnorm_is_success_nothing_to_fold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    src = save(model, tmp_path / "m.onnx")
    got = run_cli([str(src), "-o", str(tmp_path / "o.onnx")], capsys)
    assert got.code == ExitCode.OK and "nothing to fold" in got.out and got.err == ""
    assert onnx.load(tmp_path / "o.onnx").graph == model.graph
    assert bnfold.fold(src).folded == ()


def _with_stat(role: str, index: int, value: float, epsilon: float | None = None) -> onnx.ModelProto:
    model, _ = conv_bn_model(channels=4)
    t = next(t for t in model.graph.initializer if t.name == role)
    arr = numpy_helper.to_array(t).copy()
    arr[index] = value
    t.CopyFrom(numpy_helper.from_array(arr, role))
    if epsilon is not None:
        bn = model.graph.node[1]
        bn.attribute.append(helper.make_attribute("epsilon", epsilon))
    return model


@pytest.mark.parametrize(
    ("role", "value", "epsilon", "reason"),
    [
        ("var", float("nan"), None, "variance 'var' contains NaN or inf"),
        ("var", float("inf"), None, "variance 'var' contains NaN or inf"),
        ("mean", float("nan"), None, "mean 'mean' contains NaN or inf"),
        ("gamma", float("-inf"), None, "scale 'gamma' contains NaN or inf"),
        ("beta", float("nan"), None, "bias 'beta' contains NaN or inf"),
        ("var", -1.0, None, "plus epsilon is not positive"),
        ("var", -1e-3, 1e-3, "plus epsilon is not positive"),  # var + eps == 0 exactly
        ("var", 0.0, 0.0, "plus epsilon is not positive"),
    ],
    ids=["nan-var", "inf-var", "nan-mean", "inf-gamma", "nan-beta", "negative-var", "var+eps=0", "zero-var-no-eps"],
)
def test_bad_statistics_leave_the_bn_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str, value: float, epsilon: float | None, reason: str
) -> None:
    model = _with_stat(role, 1, value, epsilon)
    src = save(model, tmp_path / "m.onnx")
    result = bnfold.fold(src)
    assert ops(result.model) == ["Conv", "BatchNormalization"]
    assert len(result.skipped) == 1 and reason in result.skipped[0].reason
    got = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")], capsys)
    assert got.code == ExitCode.OK and got.err == ""
    assert "left in the graph (1)" in got.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exit_code"] == 0 and reason in report["skipped"][0]["reason"]
    assert onnx.load(tmp_path / "o.onnx").graph == model.graph


def test_zero_variance_with_positive_epsilon_folds() -> None:
    model = _with_stat("var", 0, 0.0)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, feeds)


def _custom_domain_model(with_function: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv -> BN -> com.example.Scale2 (x * 2), with the domain declared in opset_import. With
    ``with_function`` the op is defined as a model-local function, so onnxruntime can run it."""
    model, feeds = conv_bn_model()
    model.graph.node.append(helper.make_node("Scale2", ["y"], ["z"], domain="com.example"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    if with_function:
        body = [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2), "two")),
                helper.make_node("Mul", ["a", "two"], ["b"])]
        model.functions.append(helper.make_function("com.example", "Scale2", ["a"], ["b"], body,
                                                    [helper.make_opsetid("", 17)]))
    return model, feeds


def test_unknown_domain_folds_around_the_custom_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """onnx.checker accepts an op of a declared custom domain without a schema; bnfold folds the
    default-domain Conv + BN before it and leaves the custom node exactly as it was. onnxruntime cannot
    run the op, so verification cannot either: the CLI says so (exit 3) and --no-verify writes the fold."""
    model, _ = _custom_domain_model(with_function=False)
    onnx.checker.check_model(model, full_check=True)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv", "Scale2"]
    assert result.model.graph.node[1] == model.graph.node[2]
    assert result.model.opset_import == model.opset_import
    src = save(model, tmp_path / "in" / "m.onnx")
    (tmp_path / "out").mkdir()
    if NO_VERIFY:
        got = run_cli([str(src), "-o", str(tmp_path / "out" / "o.onnx")], capsys)
        assert got.code == ExitCode.BAD_INPUT
        assert_one_error_line(got.err, "com.example")
        assert listing(tmp_path / "out") == {}
    got = run_cli([str(src), "-o", str(tmp_path / "out" / "o.onnx"), *NO_VERIFY], capsys)
    assert got.code == ExitCode.OK
    assert ops(onnx.load(tmp_path / "out" / "o.onnx")) == ["Conv", "Scale2"]


def test_external_data_model_given_as_bytes_folds_nothing_with_a_reason(tmp_path: Path) -> None:
    """Bytes have no folder to find the data file in: the model loads, its BN stays, with a reason."""
    src = _external(lambda d: None)(tmp_path)
    result = bnfold.fold(src.read_bytes())
    assert ops(result.model) == ["Conv", "BatchNormalization"]
    assert "external data" in result.skipped[0].reason


def test_custom_domain_function_folds_and_matches_on_onnxruntime() -> None:
    model, feeds = _custom_domain_model(with_function=True)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv", "Scale2"]
    assert list(result.model.functions) == list(model.functions)
    assert_same_outputs(model, result.model, feeds)


def test_conv_of_another_domain_is_not_folded_into() -> None:
    """A Conv in a custom domain is not the ONNX Conv: the BN stays, with a reason naming it."""
    model, _ = conv_bn_model()
    model.graph.node[0].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv", "BatchNormalization"]
    assert "Conv" in result.skipped[0].reason
