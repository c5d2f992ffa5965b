"""Exporter dialects built in code (tests/dialects.py): the plain command folds every BN and verifies it.

paddle2onnx (-1 dims, Constant-node weights, Conv + separate bias Add, Squeeze before BN, Resize + Concat
heads), tf2onnx (NHWC Transposes around the Conv, BN decomposed to Mul/Add, Identity chains), old torch
(IR 3 with initializers listed as inputs), nodes out of topological order with a STRING input through
ai.onnx.ml, and opsets 7 to 23.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.check import verify
from bnfold.check.feeds import model_inputs
from bnfold.cli.app import main
from bnfold.errors import ExitCode
from tests import dialects


def _ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def _fold_and_verify(m: onnx.ModelProto) -> tuple[bnfold.FoldResult, bnfold.check.Comparison]:
    result = bnfold.fold(m)
    onnx.checker.check_model(result.model)
    comparison = verify(m, result.model, fold_outputs=result.folded, threads=1, seeds=(0, 1))
    assert comparison.passed, comparison.summary
    return result, comparison


def test_paddle_detector_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    src, out, report = tmp_path / "det.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(dialects.paddle_detector(), src)
    with pytest.raises(SystemExit) as info:
        main([str(src), "-o", str(out), "--report", str(report), "-q"])
    assert info.value.code == ExitCode.OK and out.exists()
    data = json.loads(report.read_text())
    assert data["input"]["batch_norms"] == 2 and data["output"]["batch_norms"] == 0
    assert data["verification"]["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert data["verification"]["inputs"][0]["shape_source"] == "ladder: size 32"
    assert {c["verified_by"] for c in data["fold_checks"]} == {"whole model"}
    assert "BatchNormalization" not in _ops(onnx.load(out)) and "Add" in _ops(onnx.load(out))  # the head's Add


def test_paddle_squeeze_before_bn_folds_without_concrete_dims():
    for opset in (11, 13):
        m = dialects.squeeze_after_resize(opset=opset)
        result, comparison = _fold_and_verify(m)
        assert not result.skipped and _ops(result.model) == ["Resize", "Conv", "Squeeze"], opset
        assert comparison.inputs[0].shape == (1, 3, 3, 32)  # -1 dims are dynamic; H is fixed at 3


@pytest.mark.parametrize("decomposed", [True, False])
def test_tf2onnx_nhwc_block_folds(decomposed: bool):
    m = dialects.tf2onnx_block(decomposed=decomposed)
    result, comparison = _fold_and_verify(m)
    assert len(result.folded) == 1 and not result.skipped
    left = _ops(result.model)
    assert "BatchNormalization" not in left and "Mul" not in left and left.count("Conv") == 1
    assert comparison.inputs[0].shape == (1, 32, 32, 3)


def test_ir3_initializers_as_inputs_fold_by_default_and_keep_the_required_inputs():
    m = dialects.ir3_conv_bn()
    result, _ = _fold_and_verify(m)
    assert _ops(result.model) == ["Conv"] and result.model.ir_version == 3
    notes = list(result.notes)
    assert notes == ["IR version 3: initializers listed as graph inputs (as that IR requires) are treated as "
                            "constants; the folded tensors are listed as inputs too"]
    inits = {t.name for t in result.model.graph.initializer}
    assert inits <= {i.name for i in result.model.graph.input}  # IR 3: every initializer is listed
    assert [s.name for s in model_inputs(result.model)] == [s.name for s in model_inputs(m)] == ["x"]


def test_ir4_initializer_listed_as_input_stays_overridable():
    m = dialects.ir3_conv_bn()
    m.ir_version = 4
    result = bnfold.fold(m)
    assert not result.folded and "--initializers-as-constants" in result.skipped[0].reason
    assert bnfold.fold(m, initializers_as_constants=True).folded


def test_unsorted_nodes_and_string_input_through_label_encoder():
    m = dialects.unsorted_string_model()
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(m)
    result, comparison = _fold_and_verify(m)
    assert _ops(result.model) == ["LabelEncoder", "Gemm"] and not result.skipped  # MatMul + Add + BN -> Gemm
    assert list(result.notes) == ["the input's nodes were out of topological order in 1 graph(s); the output has them "
                            "sorted"]
    assert comparison.inputs[0].dtype == "object"


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15, 17, 19, 21, 23])
def test_conv_bn_with_paddle_dims_across_opsets(opset: int):
    rng = np.random.default_rng(opset)
    c = 3
    inits = [numpy_helper.from_array(rng.standard_normal((c, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "m"),
             numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 2, -1, -1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, c, -1, -1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = max(4, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    result, comparison = _fold_and_verify(m)
    assert _ops(result.model) == ["Conv"]
    assert comparison.inputs[0].shape == (1, 2, 32, 32) and comparison.inputs[0].defaulted_dims == (0, 2, 3)


def _custom_domain_matmul_bn(with_value_info: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
             numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "be"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
             numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "v")]
    nodes = [helper.make_node("MyOp", ["x"], ["z"], domain="com.example"),
             helper.make_node("MatMul", ["z", "W"], ["mm"]),
             helper.make_node("BatchNormalization", ["mm", "g", "be", "m", "v"], ["y"])]
    vi = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8])] if with_value_info else []
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits, value_info=vi)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    m.ir_version = 8
    return m


def test_custom_domain_rank_from_value_info_and_a_precise_refusal_without_it():
    result = bnfold.fold(_custom_domain_matmul_bn(True))
    assert len(result.folded) == 1 and not result.skipped
    assert [n.op_type for n in result.model.graph.node] == ["MyOp", "Gemm"]
    left = bnfold.fold(_custom_domain_matmul_bn(False))
    assert not left.folded
    assert left.skipped[0].reason == (
        "the rank of 'mm', the input of the BatchNormalization, is unknown, so its channel axis 1 cannot be proven "
        "to be the column axis (the last) of MatMul (output 'mm'); it is unknown from 'z', the output of MyOp "
        "(output 'z') on: an op of domain 'com.example' that onnx has no schema for, and no value_info gives its "
        "output")


def test_output_declared_without_a_shape_fails_the_checker_but_folds_with_a_note():
    m = dialects.ir3_conv_bn()
    m.ir_version = 8
    del m.graph.input[1:]  # IR 8: initializers need not be inputs
    m.graph.output[0].type.tensor_type.ClearField("shape")
    with pytest.raises(onnx.checker.ValidationError, match="Field 'shape' of 'type' is required"):
        onnx.checker.check_model(m)
    result = bnfold.fold(m)
    assert _ops(result.model) == ["Conv"]
    assert result.notes[-1].startswith("the input fails onnx.checker only for a reason the fold does not touch")
    assert verify(m, result.model, threads=1, seeds=(0,)).passed
