"""bnfold.verify on models that do not run or do not match: a folded model that fails is a failure, an
original that fails is bad input, a changed signature fails before running.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper
from verify_models import (
    FAST,
    two_convs,
)

from bnfold.check import (
    verify,
)
from bnfold.check.runtime import clean_ort_message
from bnfold.errors import BadInputError


def test_folded_model_that_does_not_load_is_a_failure_not_an_error():
    orig, _ = two_convs()
    broken = onnx.ModelProto()
    broken.CopyFrom(orig)
    broken.graph.node[0].op_type = "NoSuchOp"
    result = verify(orig, broken, seeds=(0,), **FAST)
    assert not result and result.runs[0].error.startswith("the folded model does not load on CPUExecutionProvider")
    assert "NoSuchOp" in result.runs[0].error and "\n" not in result.runs[0].error
    assert result.localisation is None  # nothing ran, so there is nothing to localise


def test_original_that_does_not_load_is_bad_input_in_one_line():
    orig, fold = two_convs()
    orig.ir_version = 99
    with pytest.raises(BadInputError) as err:
        verify(orig, fold, **FAST)
    msg = str(err.value)
    assert msg.startswith("onnxruntime cannot load the original model") and "Unsupported model IR version: 99" in msg
    assert "\n" not in msg and "onnxruntime_src" not in msg


def test_signature_change_fails_before_running():
    orig, fold = two_convs()
    fold.graph.input[0].name = "image"
    fold.graph.node[0].input[0] = "image"
    result = verify(orig, fold, **FAST)
    assert not result and result.runs == ()
    assert result.problems == ("the folded model lacks input 'x'", "the folded model has an extra input 'image'")
    assert (
        result.summary
        == "verification failed: the folded model lacks input 'x'; the folded model has an extra input 'image'"
    )


def test_missing_output_is_a_failure():
    orig, fold = two_convs()
    for m in (orig, fold):
        m.graph.output.append(helper.make_tensor_value_info("relu1", TensorProto.FLOAT, None))
    del fold.graph.output[1]
    result = verify(orig, fold, seeds=(0,), **FAST)
    reasons = {o.name: o.reason for o in result.runs[0].outputs}
    assert not result and reasons == {"y": "", "relu1": "missing from the folded model"}


def test_clean_ort_message():
    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 "
        "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&) "
        "Unsupported model IR version: 14, max supported IR version: 13"
    )
    assert clean_ort_message(raw) == "Unsupported model IR version: 14, max supported IR version: 13"
    assert clean_ort_message("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find X") == "Could not find X"
