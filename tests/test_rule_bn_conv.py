"""BatchNormalization -> Conv: the normalization folded into the FOLLOWING Conv(s), on their input side.
Exact only where the Conv pads nothing (or the shift is zero); every Conv consumer accepts or none."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from conftest import assert_same_outputs, make_model, ops, tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold
from bnfold.folding.math import bn_affine
from bnfold.folding.math import fold_into_conv_input as fold_into_input

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


@dataclass
class ConvSpec:
    groups: int
    out_per_group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    padding: str  # "absent", "zeros", "VALID", "SAME_UPPER", "SAME_LOWER" (the SAME ones with kernel 1)
    bias: bool


@st.composite
def conv_specs(draw: st.DrawFn, rank: int, channels: int) -> ConvSpec:
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 6) if channels % g == 0]))
    padding = draw(st.sampled_from(["absent", "zeros", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    kernel = tuple(1 if padding.startswith("SAME") else draw(st.integers(1, 3)) for _ in range(rank))
    return ConvSpec(
        groups=groups,
        out_per_group=draw(st.integers(1, 3)),
        kernel=kernel,
        strides=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        dilations=tuple(1 if padding.startswith("SAME") else draw(st.integers(1, 2)) for _ in range(rank)),
        padding=padding,  # onnxruntime has no dilated SAME-padded Conv
        bias=draw(st.booleans()),
    )


@st.composite
def cases(draw: st.DrawFn) -> dict[str, object]:
    rank = draw(st.sampled_from([1, 2, 3]))
    channels = draw(st.sampled_from([1, 2, 3, 4, 6]))
    return {
        "rank": rank,
        "channels": channels,
        "convs": draw(st.lists(conv_specs(rank, channels), min_size=1, max_size=3)),
        "dtype": draw(st.sampled_from([np.dtype(np.float32), np.dtype(np.float16)])),
        "opset": draw(st.sampled_from([9, 14, 15, 22, 24])),  # BN-9, BN-14, BN-15; Conv-1, Conv-11, Conv-22
        "seed": draw(st.integers(0, 2**16)),
    }


def bn_inits(c: int, dt: np.dtype, rng: np.random.Generator, prefix: str = "bn",
             zero_shift: bool = False) -> list[onnx.TensorProto]:
    beta = np.zeros(c) if zero_shift else rng.standard_normal(c)
    mean = np.zeros(c) if zero_shift else rng.standard_normal(c)
    return [
        tensor(f"{prefix}_g", rng.uniform(0.5, 1.5, c).astype(dt)),
        tensor(f"{prefix}_b", beta.astype(dt)),
        tensor(f"{prefix}_m", mean.astype(dt)),
        tensor(f"{prefix}_v", rng.uniform(0.5, 2.0, c).astype(dt)),
    ]


def bn_node(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *(f"{prefix}_{s}" for s in "gbmv")], [y], name=prefix)


def conv_node(spec: ConvSpec, i: int, x: str, inits: list[onnx.TensorProto], channels: int, dt: np.dtype,
              rng: np.random.Generator) -> onnx.NodeProto:
    w = rng.standard_normal((spec.groups * spec.out_per_group, channels // spec.groups, *spec.kernel))
    inits.append(tensor(f"W{i}", w.astype(dt)))
    inputs = [x, f"W{i}"]
    if spec.bias:
        inits.append(tensor(f"B{i}", rng.standard_normal(w.shape[0]).astype(dt)))
        inputs.append(f"B{i}")
    attrs: dict[str, object] = {"group": spec.groups, "strides": list(spec.strides),
                                "dilations": list(spec.dilations)}
    if spec.padding == "zeros":
        attrs["pads"] = [0] * (2 * len(spec.kernel))
    elif spec.padding != "absent":
        attrs["auto_pad"] = spec.padding
    return helper.make_node("Conv", inputs, [f"z{i}"], name=f"conv{i}", **attrs)


def build(case: dict[str, object]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(case["seed"])  # type: ignore[arg-type]
    dt: np.dtype = case["dtype"]  # type: ignore[assignment]
    c: int = case["channels"]  # type: ignore[assignment]
    rank: int = case["rank"]  # type: ignore[assignment]
    inits = bn_inits(c, dt, rng)
    nodes = [bn_node("x", "y")]
    for i, spec in enumerate(case["convs"]):  # type: ignore[attr-defined]
        nodes.append(conv_node(spec, i, "y", inits, c, dt, rng))
    et = NP_TO_ONNX[dt]
    x_shape = [2, c, *([7] * rank if rank < 3 else [5] * rank)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", et, x_shape)],
                       [helper.make_tensor_value_info(f"z{i}", et, None) for i in range(len(nodes) - 1)],
                       inits, opset=case["opset"], ir_version=10 if case["opset"] >= 21 else 8)  # type: ignore[arg-type, operator]
    return model, {"x": rng.standard_normal(x_shape).astype(dt)}


@settings(max_examples=40, deadline=None)
@given(cases())
def test_bn_folds_into_following_convs_and_matches(case: dict[str, object]) -> None:
    model, feeds = build(case)
    result = bnfold.fold(model)
    assert result.skipped == (), result.skipped
    assert [(p.rule, p.norm_op, p.output) for p in result.folded] == [("bn_conv", "BatchNormalization", "z0")]
    assert ops(result.model) == ["Conv"] * (len(model.graph.node) - 1)
    assert all(n.input[0] == "x" for n in result.model.graph.node)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, result.model, feeds)


def test_fold_into_input_formula_grouped() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 2, 3))  # 6 outputs, 3 groups of 2 input channels
    bias = rng.standard_normal(6)
    affine = bn_affine(rng.uniform(0.5, 1.5, 6), rng.standard_normal(6), rng.standard_normal(6),
                       rng.uniform(0.5, 2, 6), 1e-5)
    w_new, b_new = fold_into_input(w, bias, affine, 3)
    for m in range(6):
        g = m // 2
        for j in range(2):
            c = g * 2 + j
            np.testing.assert_allclose(w_new[m, j], w[m, j] * affine.scale[c])
        expect = bias[m] + sum(w[m, j].sum() * affine.shift[g * 2 + j] for j in range(2))
        np.testing.assert_allclose(b_new[m], expect)


def test_padding_is_exact_when_the_shift_is_zero() -> None:
    rng = np.random.default_rng(1)
    inits = bn_inits(3, np.dtype(np.float32), rng, zero_shift=True)
    inits.append(tensor("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)))
    nodes = [bn_node("x", "y"), helper.make_node("Conv", ["y", "W"], ["z"], pads=[1, 1, 1, 1], name="conv")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)})


def test_same_padding_that_provably_pads_nothing_folds() -> None:
    rng = np.random.default_rng(2)
    inits = [*bn_inits(2, np.dtype(np.float32), rng), tensor("W", rng.standard_normal((3, 2, 2, 2)).astype(np.float32))]
    nodes = [bn_node("x", "y"),
             helper.make_node("Conv", ["y", "W"], ["z"], auto_pad="SAME_UPPER", strides=[2, 2], name="conv")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 8])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((2, 2, 6, 8)).astype(np.float32)})


# ---- refusals: one test each ------------------------------------------------------------------------

def _bn_convs(pads: list[list[int] | None], x_shape: list[int | str] | None = None,
              **conv_attrs: object) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = bn_inits(2, np.dtype(np.float32), rng)
    nodes = [bn_node("x", "y")]
    for i, p in enumerate(pads):
        inits.append(tensor(f"W{i}", rng.standard_normal((2, 2, 3, 3)).astype(np.float32)))
        attrs = dict(conv_attrs)
        if p is not None:
            attrs["pads"] = p
        nodes.append(helper.make_node("Conv", ["y", f"W{i}"], [f"z{i}"], name=f"conv{i}", **attrs))
    shape = x_shape if x_shape is not None else [1, 2, 6, 6]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(f"z{i}", TensorProto.FLOAT, None)
                               for i in range(len(pads))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _single_skip(model: onnx.ModelProto, **kw: object) -> str:
    result = bnfold.fold(model, check=False, **kw)  # type: ignore[arg-type]
    assert result.folded == ()
    assert "BatchNormalization" in ops(result.model)
    [skip] = result.skipped
    assert skip.output == "y"
    return skip.reason


def test_refuses_padded_conv() -> None:
    reason = _single_skip(_bn_convs([[1, 1, 1, 1]]))
    assert "cannot fold into Conv 'conv0': it pads its input (pads=[1, 1, 1, 1])" in reason
    assert "shift is not zero" in reason


def test_refuses_when_one_of_several_convs_refuses() -> None:
    model = _bn_convs([None, [0, 0, 0, 0], [0, 1, 0, 0]])
    reason = _single_skip(model)
    assert "Conv 'conv2'" in reason and "pads=[0, 1, 0, 0]" in reason


def test_refuses_same_padding_on_unknown_size() -> None:
    reason = _single_skip(_bn_convs([None], x_shape=[1, 2, "H", "W"], auto_pad="SAME_UPPER"))
    assert "auto_pad=SAME_UPPER on an input of unknown size may pad" in reason


def test_refuses_same_padding_that_pads() -> None:
    reason = _single_skip(_bn_convs([None], auto_pad="SAME_LOWER"))
    assert "auto_pad=SAME_LOWER pads [2, 2]" in reason


def test_refuses_bn_output_with_a_non_conv_consumer() -> None:
    model = _bn_convs([None])
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    reason = _single_skip(model)
    assert "'y' also feeds Relu 'relu', which is not a Conv" in reason


def test_refuses_bn_output_that_is_a_graph_output() -> None:
    model = _bn_convs([None])
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    reason = _single_skip(model)
    assert "'y' is also a graph output" in reason


def test_refuses_non_constant_conv_weight() -> None:
    model = _bn_convs([None])
    model.graph.input.append(helper.make_tensor_value_info("W0", TensorProto.FLOAT, [2, 2, 3, 3]))
    del model.graph.initializer[-1]
    reason = _single_skip(model)
    assert "cannot fold into Conv 'conv0': weight 'W0' is a graph input" in reason


def test_refuses_conv_reading_bn_output_as_weight() -> None:
    model = _bn_convs([None])
    model.graph.node[1].input[:] = ["x", "y"]
    reason = _single_skip(model)
    assert "it reads 'y' as a weight or bias" in reason


def test_refuses_fp16_overflow() -> None:
    rng = np.random.default_rng(4)
    inits = [tensor("bn_g", np.full(2, 200.0, np.float16)), tensor("bn_b", np.zeros(2, np.float16)),
             tensor("bn_m", np.zeros(2, np.float16)), tensor("bn_v", np.full(2, 1e-3, np.float16)),
             tensor("W", rng.uniform(100, 200, (2, 2, 1, 1)).astype(np.float16))]
    nodes = [bn_node("x", "y"), helper.make_node("Conv", ["y", "W"], ["z"], name="conv")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2, 2, 2])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT16, None)], inits)
    result = bnfold.fold(model)
    [skip] = result.skipped
    assert "overflows float16" in skip.reason


# ---- chains and interplay with the backward folds ---------------------------------------------------

def test_bn_bn_conv_folds_in_two_rounds() -> None:
    rng = np.random.default_rng(5)
    inits = [*bn_inits(3, np.dtype(np.float32), rng, "bn1"), *bn_inits(3, np.dtype(np.float32), rng, "bn2"),
             tensor("W", rng.standard_normal((2, 3, 1, 1)).astype(np.float32))]
    nodes = [bn_node("x", "a", "bn1"), bn_node("a", "y", "bn2"),
             helper.make_node("Conv", ["y", "W"], ["z"], name="conv")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"] and len(result.folded) == 2
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)})


def test_forward_fold_when_backward_fold_is_refused() -> None:
    rng = np.random.default_rng(6)
    inits = [tensor("W1", rng.standard_normal((3, 2, 3, 3)).astype(np.float32)),
             *bn_inits(3, np.dtype(np.float32), rng),
             tensor("W2", rng.standard_normal((4, 3, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["t"], name="conv1", pads=[1, 1, 1, 1]), bn_node("t", "y"),
             helper.make_node("Conv", ["y", "W2"], ["z"], name="conv2")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("t", TensorProto.FLOAT, None)], inits)
    feeds = {"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)}
    result = bnfold.fold(model, clone=False)  # t is a graph output: backward refused, forward taken
    assert ops(result.model) == ["Conv", "Conv"]
    assert [p.rule for p in result.folded] == ["bn_conv"]
    assert_same_outputs(model, result.model, feeds)
    backward = bnfold.fold(model)  # with cloning the backward fold wins (it is tried first)
    assert [p.rule for p in backward.folded] == ["conv"]
    assert_same_outputs(model, backward.model, feeds)


def test_decomposed_scale_folds_forward_into_padded_conv() -> None:
    """A Mul has no shift, so even a padded Conv after it absorbs it exactly; here the Conv before it
    cannot (its weight may be overridden: an initializer listed as a graph input)."""
    rng = np.random.default_rng(7)
    inits = [tensor("W1", rng.standard_normal((3, 2, 1, 1)).astype(np.float32)),
             tensor("s", rng.uniform(0.5, 2, (3, 1, 1)).astype(np.float32)),
             tensor("W2", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["t"], name="conv1"),
             helper.make_node("Mul", ["t", "s"], ["y"], name="mul"),
             helper.make_node("Conv", ["y", "W2"], ["z"], name="conv2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
                               helper.make_tensor_value_info("W1", TensorProto.FLOAT, [3, 2, 1, 1])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv", "Conv"] and [p.rule for p in result.folded] == ["bn_conv"]
    assert result.model.graph.node[1].input[0] == "t"
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)})
