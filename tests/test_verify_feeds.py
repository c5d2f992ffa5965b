"""bnfold.check.feeds: inputs generated for verification (dynamic dims and symbols, integer / bool /
bfloat16 inputs bounded by ranges, npz files replacing seeds).
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from verify_models import (
    FAST,
    _model,
    _onnx_type,
    two_convs,
)

from bnfold.check import (
    verify,
)
from bnfold.check.feeds import model_inputs, plan_feeds
from bnfold.errors import BadInputError


def test_dynamic_dims_from_shapes_and_symbols():
    orig, fold = two_convs()
    full = verify(orig, fold, shapes={"x": (2, 3, 5, 7)}, seeds=(0,), **FAST)
    assert full and full.inputs[0].shape == (2, 3, 5, 7) and full.inputs[0].defaulted_dims == ()
    assert full.runs[0].outputs[0].shape == (2, 4, 5, 7)
    assert verify(orig, fold, shapes={"": (2, 3, 5, 7)}, seeds=(0,), **FAST).inputs[0].shape == (2, 3, 5, 7)
    sym = verify(orig, fold, shapes={"H": 4, "W": 9}, seeds=(0,), **FAST)
    assert sym.inputs[0].shape == (1, 3, 4, 9) and sym.inputs[0].defaulted_dims == (0,)
    with pytest.raises(BadInputError, match=r"has 4 at dim 1 where the model fixes 3"):
        verify(orig, fold, shapes={"x": (1, 4, 8, 8)})
    with pytest.raises(BadInputError, match=r"--shape names 'y', which is not an input .*symbolic dims: H, N, W"):
        verify(orig, fold, shapes={"y": (1,)})


def test_same_symbol_gets_the_same_value_across_inputs():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", "S"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["B", "S"])
    specs = model_inputs(
        _model(
            [helper.make_node("Add", ["a", "b"], ["c"])],
            [a, b],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        )
    )
    plan = plan_feeds(specs, inputs={"a": np.zeros((2, 5), np.float32)})
    assert plan.shapes == {"a": (2, 5), "b": (2, 5)} and plan.defaulted == {}
    plan = plan_feeds(specs)
    assert plan.shapes == {"a": (1, 16), "b": (1, 16)} and plan.defaulted == {"a": (0, 1), "b": (0, 1)}


def test_fixed_reshape_sizes_the_dynamic_dim_from_its_target():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L"])
    target = numpy_helper.from_array(np.array([1, 4, 6], np.int64), "target")
    m = _model(
        [helper.make_node("Reshape", ["x", "target"], ["y"])],
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [target],
    )
    result = verify(m, m, **FAST)  # the Reshape's element count fixes L = 24 (the old default 16 failed)
    assert result.passed and result.inputs[0].shape == (1, 24)
    assert result.inputs[0].shape_source.startswith("model: Reshape 'y' target [1, 4, 6]")
    assert "dynamic inputs x[1,24]" in result.summary
    assert verify(m, m, shapes={"x": (1, 24)}, **FAST).passed


def _gather_model(vocab: int = 5) -> onnx.ModelProto:
    """ids (int64) index an embedding; a bool mask zeroes rows; outputs: float, int64 (ArgMax), bool."""
    table = numpy_helper.from_array(np.arange(vocab * 3, dtype=np.float32).reshape(vocab, 3), "table")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "S"])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, "S"])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["y"]),
        helper.make_node("ArgMax", ["y"], ["best"], axis=1, keepdims=0),
        helper.make_node("Greater", ["y", "zero"], ["positive"]),
    ]
    outs = [
        helper.make_tensor_value_info(n, t, None)
        for n, t in (("y", TensorProto.FLOAT), ("best", TensorProto.INT64), ("positive", TensorProto.BOOL))
    ]
    inits = [
        table,
        numpy_helper.from_array(np.array([2], np.int64), "axis"),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
    ]
    return _model(nodes, [ids, mask], outs, inits)


def test_integer_and_bool_inputs_bounded_by_input_ranges():
    m = _gather_model(vocab=5)
    with pytest.raises(BadInputError) as err:
        verify(m, m, **FAST)  # default ids in [0, 8) overflow a 5-row table
    msg = str(err.value)
    assert msg.startswith("the original model runs on none of the synthesised inputs (tried ids[1,32], mask[1,32]; ")
    assert "indices element out of data bounds" in msg and "this is the model's limit, not the fold's" in msg
    assert "--input-range NAME=LO,HI" in msg and "\n" not in msg
    result = verify(m, m, input_ranges={"ids": (0, 5)}, **FAST)
    assert result.passed, result.summary
    assert [(i.name, i.dtype, i.source) for i in result.inputs] == [
        ("ids", "int64", "integers[0, 5)"),
        ("mask", "bool", "bool"),
    ]
    outs = {o.name: o for o in result.runs[0].outputs}
    assert (outs["best"].dtype, outs["best"].rtol, outs["best"].atol) == ("int64", 0.0, 0.0)
    assert outs["positive"].dtype == "bool" and outs["positive"].max_abs == 0.0
    plan = plan_feeds(model_inputs(m), input_ranges={"ids": (2, 4)})
    ids = plan.feeds(0)["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 2 and ids.max() <= 3
    mask = plan.feeds(0)["mask"]
    assert mask.dtype == np.bool_ and 0 < mask.sum() < mask.size
    with pytest.raises(BadInputError, match="does not apply to bool input 'mask'"):
        plan_feeds(model_inputs(m), input_ranges={"mask": (0, 1)})


def test_integer_output_change_is_caught_exactly():
    m = _gather_model()
    other = onnx.ModelProto()
    other.CopyFrom(m)
    other.graph.node[4].attribute[0].i = 0  # ArgMax over another axis: int64 output differs
    result = verify(m, other, input_ranges={"ids": (0, 5)}, seeds=(0,), **FAST)
    bad = {o.name: o for o in result.runs[0].outputs if not o.passed}
    assert set(bad) == {"best"} and bad["best"].reason.startswith("shape differs")


def test_npz_inputs_replace_seeds(tmp_path: Path):
    orig, fold = two_convs()
    x = np.random.default_rng(9).standard_normal((2, 3, 6, 6))  # float64: cast to the model's float32
    path = tmp_path / "inputs.npz"
    np.savez(path, x=x)
    result = verify(orig, fold, inputs=path, **FAST)
    assert result.passed and result.seeds == () and [r.seed for r in result.runs] == [None]
    assert result.inputs[0].source == "supplied" and result.inputs[0].shape == (2, 3, 6, 6)
    assert "supplied input 'x' cast from float64 to float32" in result.notes
    assert "every input was supplied, so seeds were not used" in result.notes
    np.savez(path, x=x, extra=x)
    with pytest.raises(BadInputError, match=r"supplied inputs \['extra'\] are not inputs of the model"):
        verify(orig, fold, inputs=path)
    m = _gather_model()
    with pytest.raises(BadInputError, match="supplied input 'ids' is float32 but the model takes int64"):
        verify(m, m, inputs={"ids": np.zeros((1, 3), np.float32)})


def test_partly_supplied_inputs_still_use_seeds():
    m = _gather_model()
    ids = np.array([[0, 4, 2]], np.int64)
    result = verify(m, m, inputs={"ids": ids}, seeds=(0, 1), **FAST)
    assert result.passed and result.seeds == (0, 1)
    assert [i.shape for i in result.inputs] == [(1, 3), (1, 3)]  # mask follows the supplied S = 3


def test_bfloat16_inputs_and_outputs():
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)

    def model(k: float) -> onnx.ModelProto:
        return _model(
            [
                helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["xf", "k"], ["yf"]),
                helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16),
            ],
            [x],
            [y],
            [numpy_helper.from_array(np.array(k, np.float32), "k")],
        )

    same = verify(model(3.0), model(3.0), **FAST)
    assert same.passed and same.inputs[0].dtype == "bfloat16"
    out = same.runs[0].outputs[0]
    assert out.dtype == "bfloat16" and out.max_abs == 0.0 and out.rtol == 8e-2
    off = verify(model(3.0), model(3.5), **FAST)
    assert not off and off.runs[0].outputs[0].max_rel == pytest.approx(1 / 6, rel=0.05)


def test_every_input_dtype_is_generated_and_compared():
    dtypes = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.bool_, np.int8, np.uint8, np.int16,
              np.uint16, np.int32, np.uint32, np.int64, np.uint64]  # fmt: skip
    ins, outs, nodes = [], [], []
    for i, dt in enumerate(dtypes):
        et = _onnx_type(np.dtype(dt))
        ins.append(helper.make_tensor_value_info(f"i{i}", et, ["N", 5]))
        outs.append(helper.make_tensor_value_info(f"o{i}", et, None))
        nodes.append(helper.make_node("Identity", [f"i{i}"], [f"o{i}"]))
    m = _model(nodes, ins, outs)
    result = verify(m, m, input_ranges={"i1": (-3, -2), "i6": (250, 256)}, seeds=(4,), **FAST)
    assert result.passed, result.summary
    assert [i.dtype for i in result.inputs] == [np.dtype(d).name for d in dtypes]
    assert [o.dtype for o in result.runs[0].outputs] == [np.dtype(d).name for d in dtypes]
    assert all(o.max_abs == 0.0 and o.shape == (1, 5) for o in result.runs[0].outputs)
    feeds = plan_feeds(model_inputs(m), input_ranges={"i1": (-3, -2), "i6": (250, 256)}).feeds(4)
    assert feeds["i1"].min() >= -3 and feeds["i1"].max() < -2  # a float range: uniform [lo, hi)
    assert feeds["i6"].dtype == np.uint8 and feeds["i6"].min() >= 250
    ints = [feeds[f"i{k}"] for k in (5, 7, 8, 9, 10, 11, 12)]  # the default integer range [0, 8)
    assert all(a.min() >= 0 and a.max() < 8 for a in ints)
    with pytest.raises(BadInputError, match=r"must be integers within uint8"):
        plan_feeds(model_inputs(m), input_ranges={"i6": (0, 300)})
