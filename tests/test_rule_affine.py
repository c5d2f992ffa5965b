"""Decomposed normalizations (Mul / Add / Sub / Div by constants) after a linear producer: folds proven
on onnxruntime over generated producers, chains and constant shapes; the broadcast-axis anchor (a ``[C]``
constant on an NCHW tensor with W == C is NOT per-channel); chains across rounds and rule options.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from affine_cases import conv_then
from conftest import assert_same_outputs, make_model, ops, tensor, with_output_shapes
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
}


PRODUCERS = ("conv1d", "conv2d", "conv3d", "conv_transpose", "gemm", "gemm_transb", "matmul2", "matmul3")


STEPS = ("Mul", "Add", "SubR", "SubL", "Div")  # SubR: t - c, SubL: c - t


@dataclass
class Producer:
    nodes: list[onnx.NodeProto]
    inits: list[onnx.TensorProto]
    x_shape: list[int]
    rank: int
    channel_axis: int
    op: str


def make_producer(kind: str, c: int, dt: np.dtype, rng: np.random.Generator) -> Producer:
    if kind.startswith("conv") and kind != "conv_transpose":
        rank = {"conv1d": 3, "conv2d": 4, "conv3d": 5}[kind]
        spatial = [4] * (rank - 2)
        w = rng.standard_normal((c, 2, *([2] * (rank - 2)))).astype(dt)
        node = helper.make_node("Conv", ["x", "W"], ["t"], name="producer", pads=[1] * (2 * (rank - 2)))
        return Producer([node], [tensor("W", w)], [2, 2, *spatial], rank, 1, "Conv")
    if kind == "conv_transpose":
        w = rng.standard_normal((4, c // 1, 2, 2)).astype(dt)
        node = helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="producer", strides=[2, 2])
        return Producer([node], [tensor("W", w)], [2, 4, 3, 3], 4, 1, "ConvTranspose")
    if kind.startswith("gemm"):
        trans = kind == "gemm_transb"
        w = rng.standard_normal((c, 3) if trans else (3, c)).astype(dt)
        node = helper.make_node("Gemm", ["x", "W"], ["t"], name="producer", transB=int(trans), alpha=0.5)
        return Producer([node], [tensor("W", w)], [5, 3], 2, 1, "Gemm")
    rank = 2 if kind == "matmul2" else 3
    w = rng.standard_normal((3, c)).astype(dt)
    node = helper.make_node("MatMul", ["x", "W"], ["t"], name="producer")
    return Producer([node], [tensor("W", w)], [2, 5, 3][-rank:], rank, rank - 1, "MatMul")


def dtypes_for(kind: str) -> list[np.dtype]:
    """onnxruntime's CPU provider has no float64 Conv / ConvTranspose kernels."""
    base = [np.dtype(np.float32), np.dtype(np.float16)]
    return base if kind.startswith("conv") else [*base, np.dtype(np.float64)]


@st.composite
def chains(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(st.sampled_from(PRODUCERS))
    length = draw(st.integers(1, 3))
    steps = [
        (draw(st.sampled_from(STEPS)), draw(st.sampled_from(["scalar", "one", "channel", "channel_lead1"])),
         draw(st.booleans()))
        for _ in range(length)
    ]
    return {
        "kind": kind,
        "c": draw(st.integers(1, 5)),
        "steps": steps,
        "dtype": draw(st.sampled_from(dtypes_for(kind))),
        "opset": draw(st.sampled_from([11, 13, 14, 17, 21])),
        "seed": draw(st.integers(0, 2**16)),
    }


def const_shape(form: str, prod: Producer, c: int) -> tuple[int, ...]:
    if form == "scalar":
        return ()
    if form == "one":
        return (1,)
    tail = (c,) + (1,) * (prod.rank - 1 - prod.channel_axis)
    return (1, *tail) if form == "channel_lead1" and len(tail) < prod.rank else tail


def build_chain(case: dict[str, object]) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    rng = np.random.default_rng(case["seed"])  # type: ignore[arg-type]
    dt: np.dtype = case["dtype"]  # type: ignore[assignment]
    c: int = case["c"]  # type: ignore[assignment]
    prod = make_producer(case["kind"], c, dt, rng)  # type: ignore[arg-type]
    nodes, inits = list(prod.nodes), list(prod.inits)
    cur = "t"
    chain_ops = []
    for i, (step, form, first) in enumerate(case["steps"]):  # type: ignore[attr-defined]
        shape = const_shape(form, prod, c)
        mags = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
        value = (mags if step in ("Mul", "Div") else rng.standard_normal(shape)).astype(dt)
        name, out = f"k{i}", f"s{i}"
        inits.append(tensor(name, np.asarray(value, dtype=dt)))
        op = "Sub" if step.startswith("Sub") else step
        const_first = step == "SubL" or (step in ("Mul", "Add") and first)
        inputs = [name, cur] if const_first else [cur, name]
        nodes.append(helper.make_node(op, inputs, [out], name=f"step{i}"))
        chain_ops.append(op)
        cur = out
    nodes[-1].output[0] = "y"
    et = NP_TO_ONNX[dt]
    opset: int = case["opset"]  # type: ignore[assignment]
    model = make_model(nodes, [helper.make_tensor_value_info("x", et, prod.x_shape)],
                       [helper.make_tensor_value_info("y", et, None)], inits, opset=opset,
                       ir_version=10 if opset >= 21 else 8)
    feeds = {"x": rng.standard_normal(prod.x_shape).astype(dt)}
    return model, feeds, chain_ops


@settings(max_examples=40, deadline=None)
@given(chains())
def test_chain_folds_into_producer_and_matches(case: dict[str, object]) -> None:
    model, feeds, chain_ops = build_chain(case)
    kind = str(case["kind"])
    result = bnfold.fold(model)
    steps = [s for s, _, _ in case["steps"]]  # type: ignore[attr-defined]
    if kind.startswith("matmul") and len(steps) == 1 and steps[0] in ("Add", "SubR"):
        # a lone constant Add/Sub after a bare MatMul is its bias: the folded form already, left alone
        assert result.folded == () and result.skipped == ()
        assert ops(result.model) == ops(model)
        return
    assert len(result.folded) == 1, result.skipped
    pair = result.folded[0]
    assert pair.output == "y" and pair.norm_op == "+".join(chain_ops)
    out_ops = ops(result.model)
    if kind.startswith("matmul"):
        assert not {"Mul", "Sub", "Div"} & set(out_ops) and out_ops.count("Add") <= 1
        assert len(out_ops) <= 2
    else:
        assert out_ops == [ops(model)[0]]
    assert result.skipped == ()
    assert_same_outputs(model, result.model, feeds)


def test_c_vector_on_nchw_with_w_equal_c_is_not_per_channel() -> None:
    const = np.array([0.5, 2.0, -1.0, 3.0], np.float32)  # [C] with W == C == 4: broadcasts along W
    for op in ("Mul", "Add"):
        model, feeds = conv_then(op, const)
        result = bnfold.fold(model)
        assert result.folded == ()
        assert ops(result.model) == ["Conv", op]
        [skip] = result.skipped
        assert skip.output == "y" and "axis 3" in skip.reason and "LAST" in skip.reason
        assert_same_outputs(model, result.model, feeds)


def test_c11_constant_on_nchw_is_per_channel() -> None:
    model, feeds = conv_then("Mul", np.array([0.5, 2.0, -1.0, 3.0], np.float32).reshape(4, 1, 1))
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, feeds)


def test_scalar_and_all_ones_shapes_are_per_channel() -> None:
    for const in (np.array(1.5, np.float32), np.full((1, 1, 1, 1), -0.25, np.float32)):
        model, feeds = conv_then("Mul", const)
        result = bnfold.fold(model)
        assert ops(result.model) == ["Conv"]
        assert_same_outputs(model, result.model, feeds)


def _bn(prefix: str, c: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [
        tensor(f"{prefix}_g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        tensor(f"{prefix}_b", rng.standard_normal(c).astype(np.float32)),
        tensor(f"{prefix}_m", rng.standard_normal(c).astype(np.float32)),
        tensor(f"{prefix}_v", rng.uniform(0.5, 2.0, c).astype(np.float32)),
    ]


def _bn_node(x: str, y: str, prefix: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *(f"{prefix}_{s}" for s in "gbmv")], [y], name=prefix)


def test_conv_bn_mul_add_and_conv_bn_bn_fold_to_one_conv() -> None:
    rng = np.random.default_rng(6)
    c = 3
    inits = [tensor("W", rng.standard_normal((c, 2, 3, 3)).astype(np.float32)),
             tensor("s", rng.uniform(0.5, 2, (c, 1, 1)).astype(np.float32)),
             tensor("b", rng.standard_normal((1, c, 1, 1)).astype(np.float32)),
             *_bn("bn1", c, rng), *_bn("bn2", c, rng)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["t"], name="conv", pads=[1, 1, 1, 1]),
        _bn_node("t", "u", "bn1"),
        helper.make_node("Mul", ["u", "s"], ["v"], name="mul"),
        _bn_node("v", "w", "bn2"),
        helper.make_node("Add", ["w", "b"], ["y"], name="add"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 5, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert sorted(p.norm_op for p in result.folded) == ["Add", "BatchNormalization", "BatchNormalization", "Mul"]
    assert result.skipped == ()
    assert len(result.model.graph.initializer) == 2
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((2, 2, 5, 5)).astype(np.float32)})


def test_matmul_bias_mul_add_chain_folds() -> None:
    rng = np.random.default_rng(7)
    inits = [tensor("W", rng.standard_normal((3, 4)).astype(np.float32)),
             tensor("bias", rng.standard_normal(4).astype(np.float32)),
             tensor("s", rng.uniform(0.5, 2, 4).astype(np.float32)),
             tensor("sh", rng.standard_normal((1, 1, 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["bias", "t"], ["u"]),
             helper.make_node("Mul", ["u", "s"], ["v"]), helper.make_node("Sub", ["v", "sh"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["MatMul", "Add"]
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((2, 6, 3)).astype(np.float32)})


def test_chain_stops_at_a_graph_output_and_shared_producers_are_left_alone() -> None:
    model, feeds = conv_then("Mul", np.full((4, 1, 1), 2.0, np.float32))
    model.graph.node.append(helper.make_node("Add", ["y", "k"], ["z"], name="add"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    with_output_shapes(model)
    # y is a graph output: the chain is the Mul alone; then the Conv writes y, a graph output, so the
    # Add is arithmetic on a tensor that is used elsewhere: not a normalization, not cloned for, not reported
    for clone in (True, False):
        result = bnfold.fold(model, clone=clone)
        assert ops(result.model) == ["Conv", "Add"]
        assert [p.norm_op for p in result.folded] == ["Mul"] and result.skipped == ()
        assert_same_outputs(model, result.model, feeds)


def test_gelu_style_arithmetic_on_a_shared_tensor_is_left_alone() -> None:
    rng = np.random.default_rng(11)
    inits = [tensor("W", rng.standard_normal((3, 4)).astype(np.float32)),
             tensor("b", rng.standard_normal(4).astype(np.float32)),
             tensor("sqrt2", np.array(1.4142135, np.float32)), tensor("one", np.array(1.0, np.float32)),
             tensor("half", np.array(0.5, np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["t", "b"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert result.folded == () and result.skipped == ()
    assert ops(result.model) == ops(model)


def test_skip_and_only_select_the_affine_rule() -> None:
    model, feeds = conv_then("Mul", np.full((4, 1, 1), 2.0, np.float32))
    skipped = bnfold.fold(model, skip=["affine"])
    assert skipped.folded == () and skipped.skipped == ()
    only = bnfold.fold(model, only=["affine"])
    assert ops(only.model) == ["Conv"]
    assert_same_outputs(model, only.model, feeds)
    assert bnfold.fold(model, only=["conv"]).folded == ()
