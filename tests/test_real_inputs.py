"""Inputs that real models accept: dynamic dims in every spelling, sizes the original runs at, every dtype.

Each test builds the model in code (see tests/dialects.py) and proves the check against onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.check import verify
from bnfold.check.feeds import model_inputs, plan_feeds
from bnfold.check.sizes import LADDER, UnrunnableModelError
from bnfold.errors import BadInputError
from tests import dialects

FAST = {"threads": 1, "seeds": (0,)}


def _model(nodes, inputs, outputs, inits=(), opset: int = 17, ir: int = 8, domains=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *domains])
    m.ir_version = ir
    return m


def test_every_dynamic_spelling_is_dynamic():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 0, "N", -7, 5])
    x.type.tensor_type.shape.dim.add()  # a dim with neither value nor symbol
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    assert model_inputs(m)[0].dims == (None, None, "N", None, 5, None)


def test_paddle_detector_runs_at_a_multiple_of_32_not_at_16():
    m = dialects.paddle_detector()
    with pytest.raises(BadInputError) as err:  # the old default, 16 x 16, cannot run the original
        verify(m, m, shapes={"x": (1, 3, 16, 16)}, **FAST)
    assert "with inputs x[1,3,16,16] float32: Add node: " in str(err.value) and ".h:" not in str(err.value)
    folded = bnfold.fold(m)
    assert len(folded.folded) == 3 and not folded.skipped
    result = verify(m, folded.model, fold_outputs=folded.folded, **FAST)
    assert result.passed, result.summary
    info = result.inputs[0]
    assert info.shape == (1, 3, 32, 32) and info.shape_source == "ladder: size 32" and info.defaulted_dims == (0, 2, 3)
    assert result.summary.endswith("; dynamic inputs x[1,3,32,32] (ladder: size 32)")
    assert result.to_dict()["inputs"][0]["shape_source"] == "ladder: size 32"


def test_shape_option_wins_over_the_ladder():
    m = dialects.paddle_detector()
    result = verify(m, m, shapes={"x": (1, 3, 64, 96)}, **FAST)
    assert result.passed and result.inputs[0].shape == (1, 3, 64, 96) and result.inputs[0].shape_source == ""


def test_metadata_shape_is_tried_before_the_ladder():
    m = dialects.paddle_detector()
    helper.set_model_props(m, {"image_shape": "3,96,64"})
    result = verify(m, m, **FAST)
    assert result.passed and result.inputs[0].shape == (1, 3, 96, 64)
    assert result.inputs[0].shape_source == "model metadata 'image_shape' = '3,96,64'"


def test_a_model_that_runs_on_no_synthesised_input_says_it_is_its_own_limit():
    m = dialects.reshape_locked()
    with pytest.raises(UnrunnableModelError) as err:
        verify(m, m, **FAST)
    msg = str(err.value)
    assert msg.startswith("the original model runs on none of the synthesised inputs (tried x[1,3,32,32]; ")
    assert "this is the model's limit, not the fold's" in msg and "--shape NAME=DIMS for x" in msg
    assert "--inputs FILE.npz" in msg and "\n" not in msg and ".h:" not in msg
    assert len(err.value.tried) == len(LADDER)
    assert verify(m, m, shapes={"x": (1, 3, 7, 9)}, **FAST).passed


def _if_model() -> onnx.ModelProto:
    """cond: a scalar bool graph input choosing between two branches after a Conv + BN."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "w")
    bn = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
          (("s", rng.random(2) + 0.5), ("b", rng.standard_normal(2)), ("m", rng.standard_normal(2)),
           ("v", rng.random(2) + 0.5))]
    then_g = helper.make_graph([helper.make_node("Relu", ["n"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["n"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])],
                  [w, *bn])


def test_scalar_bool_if_condition_is_fed_as_an_array():
    m = _if_model()
    folded = bnfold.fold(m)
    assert len(folded.folded) == 1
    result = verify(m, folded.model, seeds=(0, 1, 2), threads=1)
    assert result.passed, result.summary
    cond = next(i for i in result.inputs if i.name == "cond")
    assert cond.shape == () and cond.dtype == "bool" and cond.source == "bool"
    plan = plan_feeds(model_inputs(m), shapes={"x": (1, 3, 4, 4)})
    assert isinstance(plan.feeds(0)["cond"], np.ndarray) and plan.feeds(0)["cond"].shape == ()


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE, TensorProto.INT8,
                                  TensorProto.UINT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                                  TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL])
def test_every_numeric_dtype_and_scalars_are_generated(elem):
    inputs = [helper.make_tensor_value_info("a", elem, ["N", -1]), helper.make_tensor_value_info("k", elem, [])]
    nodes = [helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["af", "kf"], ["y"])]
    m = _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", -1])])
    result = verify(m, m, **FAST)
    assert result.passed, result.summary
    a, k = result.inputs
    want = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
    assert a.dtype == want and a.shape == (1, 32) and k.shape == () and k.dtype == want


def _string_model() -> onnx.ModelProto:
    enc = helper.make_node("LabelEncoder", ["s"], ["code"], domain="ai.onnx.ml", keys_strings=["w1", "w2", "w3"],
                           values_floats=[1.0, 2.0, 3.0], default_float=-1.0)
    nodes = [enc, helper.make_node("Add", ["code", "x"], ["y"])]
    inputs = [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
                  domains=[helper.make_opsetid("ai.onnx.ml", 3)])


def test_string_inputs_are_generated_and_accepted_from_npz(tmp_path):
    m = _string_model()
    result = verify(m, m, **FAST)
    assert result.passed, result.summary
    s = result.inputs[0]
    assert s.dtype == "object" and s.source == "strings w0..w7" and s.shape == (32,)
    npz = tmp_path / "in.npz"
    np.savez(npz, s=np.array(["w1", "w3", "zz"]), x=np.zeros(3, np.float32))  # saved as <U2: no pickles
    supplied = verify(m, m, inputs=npz, threads=1)
    assert supplied.passed and supplied.inputs[0].source == "supplied" and supplied.inputs[0].shape == (3,)


def test_optional_tensor_input_is_fed_as_a_tensor_and_sequences_are_refused_plainly():
    opt = helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, ["N"])))
    nodes = [helper.make_node("OptionalGetElement", ["o"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    m = _model(nodes, [opt], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], opset=18)
    assert verify(m, m, **FAST).passed
    seq = helper.make_value_info("q", helper.make_sequence_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, ["N"])))
    nodes = [helper.make_node("SequenceAt", ["q", "zero"], ["y"])]
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    m = _model(nodes, [seq], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], [zero], opset=18)
    with pytest.raises(BadInputError) as err:
        verify(m, m, **FAST)
    assert str(err.value) == ("input 'q' is a sequence, which verification cannot generate; fold without the check "
                              "with --no-verify, or verify the written model with your own data")


def test_input_without_any_shape_takes_the_rank_its_conv_proves():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [x],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    result = verify(m, m, **FAST)
    assert result.passed and result.inputs[0].shape == (1, 3, 32, 32)
    assert result.inputs[0].shape_source == "ladder: size 32 (x: rank 4 from its Conv's weight)"
    assert verify(m, m, shapes={"x": (1, 3, 5, 5)}, **FAST).passed


def test_only_a_dynamic_batch_says_so():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 8])
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                          [-1, 3, 8, 8])])
    result = verify(m, m, **FAST)
    assert result.inputs[0].shape == (1, 3, 8, 8) and result.inputs[0].shape_source == "default: batch 1"
