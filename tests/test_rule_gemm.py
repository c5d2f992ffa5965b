"""Gemm -> BatchNormalization: folds proven on a runtime over generated shapes, alpha / beta / transA /
transB, every C shape, dtypes and opsets, and one test per refusal."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, ops, tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx_builders import BF16, FP16, FP32, FP64, assert_fold_matches, bn, build, opsets_for

import bnfold
from bnfold.folding.math import bn_affine
from bnfold.folding.rules import gemm
from bnfold.folding.rules.base import FoldContext, FoldOptions, Norm, Skip
from bnfold.ir.names import NameAllocator
from bnfold.ir.view import GraphView

# Gemm-6 (opset 6, with BatchNormalization-6), -7 (7, 8), -9 (9, 10), -11 (11, 12), -13 (13+) and
# BatchNormalization-7, -9, -14, -15; 26 is the newest opset onnxruntime 1.31 loads.
OPSETS = [6, 7, 9, 11, 13, 14, 15, 21, 26]
C_SHAPES = ["none", "scalar", "[1]", "[N]", "[1,N]", "[M,1]", "[M,N]"]


@dataclass
class Case:
    m: int
    k: int
    n: int
    trans_a: int
    trans_b: int
    alpha: float | None
    beta: float | None
    c_shape: str
    dtype: np.dtype
    opset: int
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    dtype = draw(st.sampled_from([FP32, FP32, FP16, FP64, BF16]))
    opset = draw(st.sampled_from(opsets_for(dtype, OPSETS, bf16_from=13)))
    c_shapes = C_SHAPES if opset >= 11 else C_SHAPES[1:]  # C is optional from Gemm-11 on
    return Case(
        m=draw(st.integers(1, 4)), k=draw(st.integers(1, 5)), n=draw(st.integers(1, 5)),
        trans_a=draw(st.integers(0, 1)), trans_b=draw(st.integers(0, 1)),
        alpha=draw(st.sampled_from([None, 1.0, 0.5, -2.0, 0.0])),
        beta=draw(st.sampled_from([None, 1.0, 0.0, 0.25, -3.0, 1e-30])),
        c_shape=draw(st.sampled_from(c_shapes)), dtype=dtype, opset=opset, seed=draw(st.integers(0, 2**16)),
    )


def c_dims(case: Case) -> tuple[int, ...] | None:
    m, n = case.m, case.n
    return {"none": None, "scalar": (), "[1]": (1,), "[N]": (n,), "[1,N]": (1, n), "[M,1]": (m, 1),
            "[M,N]": (m, n)}[case.c_shape]


def build_case(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(case.seed)
    dt = case.dtype
    a_shape = (case.k, case.m) if case.trans_a else (case.m, case.k)
    b_shape = (case.n, case.k) if case.trans_b else (case.k, case.n)
    inits = [tensor("B", rng.standard_normal(b_shape).astype(dt))]
    inputs = ["a", "B"]
    dims = c_dims(case)
    if dims is not None:
        inits.append(tensor("C", np.asarray(rng.standard_normal(dims)).astype(dt)))
        inputs.append("C")
    attrs: dict[str, object] = {"transA": case.trans_a, "transB": case.trans_b}
    if case.alpha is not None:
        attrs["alpha"] = case.alpha
    if case.beta is not None:
        attrs["beta"] = case.beta
    if case.opset < 7:
        attrs["broadcast"] = 1
    bn_node, bn_inits = bn(rng, "t", "y", case.n, dt, case.opset)
    nodes = [helper.make_node("Gemm", inputs, ["t"], name="gemm", **attrs), bn_node]
    model = build(nodes, {"a": (dt, a_shape)}, {"y": (dt, (case.m, case.n))}, inits + bn_inits, case.opset)
    return model, {"a": rng.standard_normal(a_shape).astype(dt)}


@settings(max_examples=40, deadline=None)
@given(cases())
def test_gemm_bn_folds_and_matches(case: Case) -> None:
    model, feeds = build_case(case)
    result = assert_fold_matches(model, feeds, folded_by="gemm")
    assert ops(result.model) == ["Gemm"]
    node = result.model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    before = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert "beta" not in attrs  # beta folded into C: 1, the default
    assert attrs == {k: v for k, v in before.items() if k != "beta"}
    init = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert "B" not in init and init[node.input[1]].shape == tuple(model.graph.initializer[0].dims)
    dims = c_dims(case)
    expect_c = (case.n,) if dims is None else np.broadcast_shapes(dims, (case.n,))
    assert init[node.input[2]].shape == expect_c
    assert all(v.dtype == case.dtype for v in init.values())


def _simple(**changes: object) -> Case:
    return replace(Case(3, 4, 5, 0, 1, 0.5, 0.25, "[N]", FP32, 13, 3), **changes)


def test_folded_tensors_follow_the_formula() -> None:
    """B' scales B's columns (rows with transB=1); C' = beta*scale*C + shift with beta -> 1."""
    case = _simple(dtype=FP64)
    model, _ = build_case(case)
    src = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    aff = bn_affine(src["bn_gamma"], src["bn_beta"], src["bn_mean"], src["bn_var"], 1e-5)
    result = bnfold.fold(model)
    node = result.model.graph.node[0]
    got = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(got[node.input[1]], src["B"] * aff.scale[:, None])
    np.testing.assert_array_equal(got[node.input[2]], 0.25 * src["C"] * aff.scale + aff.shift)


def test_legacy_gemm1_at_opset5_folds_exactly() -> None:
    """Gemm-1 and BatchNormalization-1 (no runtime loads them): checked with numpy."""
    case = _simple(opset=6, c_shape="[M,N]")
    model, feeds = build_case(case)
    model.opset_import[0].version = 5
    model.graph.node[1].attribute.append(helper.make_attribute("consumed_inputs", [0, 0, 0, 1, 1]))
    result = bnfold.fold(model)
    assert ops(result.model) == ["Gemm"]
    node = result.model.graph.node[0]
    got = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in result.model.graph.initializer}
    src = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    a = feeds["a"].astype(np.float64)
    t = 0.5 * a @ src["B"].T + 0.25 * src["C"]
    aff = bn_affine(src["bn_gamma"], src["bn_beta"], src["bn_mean"], src["bn_var"], 1e-5)
    y = t * aff.scale + aff.shift
    y_folded = 0.5 * a @ got[node.input[1]].T + got[node.input[2]]
    np.testing.assert_allclose(y_folded, y, rtol=1e-5, atol=1e-5)


def test_clone_when_output_has_another_consumer() -> None:
    model, feeds = build_case(_simple())
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [3, 5]))
    result = bnfold.fold(model)
    assert sorted(ops(result.model)) == ["Gemm", "Gemm", "Relu"]
    original = next(n for n in result.model.graph.node if n.name == "gemm")
    assert list(original.input) == ["a", "B", "C"] and list(original.output) == ["t"]
    assert_same_outputs(model, result.model, feeds)


def test_shared_weight_gets_private_copy() -> None:
    model, feeds = build_case(_simple())
    model.graph.node.append(helper.make_node("Gemm", ["a", "B"], ["other"], name="gemm2", transB=1))
    model.graph.output.append(helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, [3, 5]))
    result = bnfold.fold(model)
    assert "BatchNormalization" not in ops(result.model)
    assert next(n for n in result.model.graph.node if n.name == "gemm2").input[1] == "B"
    kept = next(t for t in result.model.graph.initializer if t.name == "B")
    assert kept.SerializeToString() == next(t for t in model.graph.initializer if t.name == "B").SerializeToString()
    assert_same_outputs(model, result.model, feeds)


def test_constant_node_weights_fold() -> None:
    model, feeds = build_case(_simple(c_shape="[M,1]"))
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model, feeds)


def test_rerun_is_byte_identical_and_idempotent() -> None:
    model, _ = build_case(_simple(c_shape="none"))
    first = bnfold.fold(model).model.SerializeToString()
    assert bnfold.fold(model).model.SerializeToString() == first
    again = bnfold.fold(first)
    assert again.folded == () and again.skipped == () and again.model.SerializeToString() == first


def test_ir3_initializers_as_inputs_refused_unless_flag() -> None:
    model, feeds = build_case(_simple(opset=7))
    b = next(t for t in model.graph.initializer if t.name == "B")
    model.graph.input.append(helper.make_tensor_value_info("B", b.data_type, list(b.dims)))
    reason = _only_skip(model)
    assert "B of Gemm 'gemm' 'B' is an initializer that is also listed as a graph input" in reason
    result = bnfold.fold(model, initializers_as_constants=True)
    assert ops(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model, feeds)


# ---- refusals: one test each, asserting the reason -------------------------------------------------

def _only_skip(model: onnx.ModelProto, **kw: object) -> str:
    result = bnfold.fold(model, clone=False, **kw)  # type: ignore[arg-type]
    assert result.folded == ()
    assert "BatchNormalization" in ops(result.model)
    assert len(result.skipped) == 1
    return result.skipped[0].reason


def _replace_init(model: onnx.ModelProto, name: str, value: np.ndarray | None) -> onnx.TensorProto:
    old = next(t for t in model.graph.initializer if t.name == name)
    keep = [t for t in model.graph.initializer if t.name != name]
    if value is not None:
        keep.append(tensor(name, value))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return old


def test_refuses_b_graph_input() -> None:
    model, _ = build_case(_simple())
    b = _replace_init(model, "B", None)
    model.graph.input.append(helper.make_tensor_value_info("B", onnx.TensorProto.FLOAT, list(b.dims)))
    assert "B of Gemm 'gemm' 'B' is a graph input, not a constant" in _only_skip(model)


def test_refuses_c_computed_at_run_time() -> None:
    model, _ = build_case(_simple())
    _replace_init(model, "C", None)
    model.graph.input.append(helper.make_tensor_value_info("c_in", onnx.TensorProto.FLOAT, [5]))
    model.graph.node.insert(0, helper.make_node("Relu", ["c_in"], ["C"], name="relu"))
    assert "C of Gemm 'gemm' 'C' is computed at run time by Relu 'relu'" in _only_skip(model)


def test_refuses_output_with_another_consumer() -> None:
    model, _ = build_case(_simple())
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [3, 5]))
    reason = _only_skip(model)
    assert "output 't' of Gemm 'gemm' also feeds Relu 'other'" in reason and "cloning it is turned off" in reason


def test_refuses_output_that_is_graph_output() -> None:
    model, _ = build_case(_simple())
    model.graph.output.append(helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [3, 5]))
    assert "output 't' of Gemm 'gemm' is also a graph output" in _only_skip(model)


def test_refuses_column_count_mismatch() -> None:
    """transB ignored would read N from the wrong axis of B."""
    model, _ = build_case(_simple(k=4, n=5))
    model.graph.node[0].attribute[1].CopyFrom(helper.make_attribute("transB", 0))
    reason = _only_skip(model, check=False)
    assert "Gemm 'gemm' has 4 output columns but the normalization has 5 channels" in reason


def test_refuses_c_not_broadcastable() -> None:
    model, _ = build_case(_simple())
    _replace_init(model, "C", np.ones((2, 3, 5), np.float32))
    reason = _only_skip(model, check=False)
    assert "C 'C' of Gemm 'gemm' has shape [2, 3, 5], not broadcastable to [M, 5]" in reason


def test_refuses_c_with_nan() -> None:
    model, _ = build_case(_simple(beta=0.0))
    _replace_init(model, "C", np.array([1, np.inf, 0, 0, 0], np.float32))
    assert "C 'C' of Gemm 'gemm' contains NaN or inf" in _only_skip(model)


def test_refuses_integer_b() -> None:
    model, _ = build_case(_simple())
    _replace_init(model, "B", np.ones((5, 4), np.int32))
    reason = _only_skip(model, check=False)
    assert "B 'B' of Gemm 'gemm' has element type INT32, not a floating-point type" in reason


def test_refuses_fp16_overflow() -> None:
    model, _ = build_case(_simple(dtype=FP16, opset=15))
    _replace_init(model, "bn_var", np.full(5, 1e-9, np.float32))
    _replace_init(model, "bn_gamma", np.full(5, 5000.0, np.float32))
    assert "folded B of Gemm 'gemm' overflows float16" in _only_skip(model)


@pytest.mark.parametrize("axis", [0, 2, -2])
def test_refuses_channel_axis_other_than_columns(axis: int) -> None:
    """A normalization of Gemm's rows (axis 0) cannot go into B's columns."""
    model, _ = build_case(_simple())
    view = GraphView(model.graph)
    ctx = FoldContext(view, NameAllocator(model), FoldOptions())
    aff = bn_affine(np.ones(5), np.zeros(5), np.zeros(5), np.ones(5), 1e-5)
    norm = Norm(nodes=(1,), input="t", output="y", affine=aff, channel_axis=axis, op_type="Mul")
    outcome = gemm.match(ctx, norm)
    assert isinstance(outcome, Skip)
    assert f"channel axis {axis} is not the column axis (1) of the rank-2 output of Gemm 'gemm'" in outcome.reason
