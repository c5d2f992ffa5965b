"""ConvTranspose -> BatchNormalization: folds proven on a runtime over generated shapes, groups, strides,
pads, output_padding / output_shape, dtypes and opsets, and one test per refusal."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from conftest import ops, tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx_builders import BF16, FP16, FP32, FP64, assert_fold_matches, bn, build, opsets_for

import bnfold
from bnfold.folding.math import bn_affine, round_to

# ConvTranspose-1 (opsets 1-10), -11 (11-21), -22 (22+) x BatchNormalization-6, -7, -9, -14, -15;
# 26 is the newest opset onnxruntime 1.31 loads.
OPSETS = [6, 7, 9, 11, 14, 15, 21, 22, 26]


@dataclass
class Case:
    rank: int
    group: int
    in_per_group: int
    out_per_group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    output_padding: tuple[int, ...]
    mode: str  # "pads", "output_shape", "SAME_UPPER", "SAME_LOWER", "VALID"
    pads: tuple[int, ...]
    shrink: tuple[int, ...]  # output_shape = natural size - shrink
    spatial: tuple[int, ...]
    bias: bool
    dtype: np.dtype
    opset: int
    epsilon: float | None
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rank = draw(st.sampled_from([1, 2, 3]))
    ints = lambda lo, hi: tuple(draw(st.integers(lo, hi)) for _ in range(rank))  # noqa: E731
    kernel, strides, dilations = ints(1, 3), ints(1, 3), ints(1, 2)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    output_padding = tuple(draw(st.integers(0, s - 1)) for s in strides)
    spatial = ints(1, 4 if rank < 3 else 3)
    natural = [s * (i - 1) + p + e for s, i, p, e in zip(strides, spatial, output_padding, effective, strict=True)]
    begin = [draw(st.integers(0, min(e - 1, n - 1))) for e, n in zip(effective, natural, strict=True)]
    end = [draw(st.integers(0, min(e - 1, n - 1 - b))) for e, n, b in zip(effective, natural, begin, strict=True)]
    shrink = tuple(draw(st.integers(0, min(e - 1, n - 1))) for e, n in zip(effective, natural, strict=True))
    pads = (*begin, *end)
    dtype = draw(st.sampled_from([FP32, FP32, FP16, FP64, BF16]))
    opset = draw(st.sampled_from(opsets_for(dtype, OPSETS, bf16_from=22, ort_fp64=False)))
    # onnx's reference ConvTranspose (fp64, bf16, opset 6: onnxruntime lacks them) slices a grouped weight
    # on axis 0, the very mistake this rule avoids: groups are proven on onnxruntime (fp32, fp16) only
    on_ort = dtype in (FP32, FP16) and opset > 6
    return Case(
        rank=rank, group=draw(st.sampled_from([1, 1, 2, 3])) if on_ort else 1, in_per_group=draw(st.integers(1, 3)),
        out_per_group=draw(st.integers(1, 3)), kernel=kernel, strides=strides, dilations=dilations,
        output_padding=output_padding,
        mode=draw(st.sampled_from(["pads", "pads", "output_shape", "SAME_UPPER", "SAME_LOWER", "VALID"]))
        if on_ort else "pads",  # the reference evaluator ignores output_shape without auto_pad
        pads=pads, shrink=shrink, spatial=spatial, bias=draw(st.booleans()), dtype=dtype, opset=opset,
        epsilon=draw(st.sampled_from([None, 1e-5, 1e-3, 0.1])), seed=draw(st.integers(0, 2**16)),
    )


def build_case(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(case.seed)
    dt = case.dtype
    c_in, c_out = case.group * case.in_per_group, case.group * case.out_per_group
    inits = [tensor("W", rng.standard_normal((c_in, case.out_per_group, *case.kernel)).astype(dt))]
    inputs = ["x", "W"]
    if case.bias:
        inits.append(tensor("B", rng.standard_normal(c_out).astype(dt)))
        inputs.append("B")
    attrs: dict[str, object] = {
        "group": case.group, "kernel_shape": list(case.kernel), "strides": list(case.strides),
        "dilations": list(case.dilations), "output_padding": list(case.output_padding),
    }
    if case.mode == "pads":
        attrs["pads"] = list(case.pads)
    elif case.mode == "output_shape":
        natural = [
            s * (i - 1) + p + (k - 1) * d + 1
            for s, i, p, k, d in zip(case.strides, case.spatial, case.output_padding, case.kernel,
                                     case.dilations, strict=True)
        ]
        attrs["output_shape"] = [n - c for n, c in zip(natural, case.shrink, strict=True)]
    else:
        attrs["auto_pad"] = case.mode
    bn_node, bn_inits = bn(rng, "t", "y", c_out, dt, case.opset, epsilon=case.epsilon)
    nodes = [helper.make_node("ConvTranspose", inputs, ["t"], name="deconv", **attrs), bn_node]
    x_shape = [2, c_in, *case.spatial]
    y_shape = ["n", "c", *(f"d{i}" for i in range(case.rank))]  # shape inference lacks BN-6
    model = build(nodes, {"x": (dt, x_shape)}, {"y": (dt, y_shape)}, inits + bn_inits, case.opset)
    return model, {"x": rng.standard_normal(x_shape).astype(dt)}


@settings(max_examples=40, deadline=None)
@given(cases())
def test_conv_transpose_bn_folds_and_matches(case: Case) -> None:
    model, feeds = build_case(case)
    result = assert_fold_matches(model, feeds, folded_by="conv_transpose")
    assert ops(result.model) == ["ConvTranspose"]
    node = result.model.graph.node[0]
    assert node.output[0] == "y" and len(node.input) == 3
    assert {a.name: a for a in node.attribute} == {a.name: a for a in model.graph.node[0].attribute}
    for t in result.model.graph.initializer:
        assert numpy_helper.to_array(t).dtype == case.dtype


def _simple(**changes: object) -> Case:
    case = Case(2, 3, 2, 2, (3, 3), (2, 2), (1, 1), (1, 1), "pads", (1, 1, 1, 1), (0, 0), (3, 3), True, FP32,
                15, None, 5)
    return replace(case, **changes)


def test_grouped_weight_scaled_on_axis1_per_group() -> None:
    """Output channel g*(C_out/g)+j is column j of group g's rows: check the folded tensor exactly."""
    model, _ = build_case(_simple(bias=False))
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    result = bnfold.fold(model)
    node = result.model.graph.node[0]
    folded = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    aff = bn_affine(init["bn_gamma"], init["bn_beta"], init["bn_mean"], init["bn_var"], 1e-5)
    w = init["W"]  # [C_in=6, C_out/g=2, 3, 3], group 3: out channel = 2*g + j
    expect = np.empty_like(w)
    for row in range(6):
        g = row // 2
        for j in range(2):
            expect[row, j] = w[row, j] * aff.scale[2 * g + j]
    np.testing.assert_array_equal(folded[node.input[1]], round_to(expect, FP32, "w"))
    np.testing.assert_array_equal(folded[node.input[2]], round_to(aff.shift, FP32, "b"))


# ---- refusals: one test each, asserting the reason -------------------------------------------------

def _only_skip(model: onnx.ModelProto, **kw: object) -> str:
    result = bnfold.fold(model, clone=False, **kw)  # type: ignore[arg-type]
    assert result.folded == ()
    assert "BatchNormalization" in ops(result.model)
    assert len(result.skipped) == 1
    return result.skipped[0].reason


def _drop_initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    t = next(t for t in model.graph.initializer if t.name == name)
    keep = [i for i in model.graph.initializer if i.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return t


def test_refuses_weight_graph_input() -> None:
    model, _ = build_case(_simple())
    w = _drop_initializer(model, "W")
    model.graph.input.append(helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, list(w.dims)))
    assert "weight of ConvTranspose 'deconv' 'W' is a graph input" in _only_skip(model)


def test_refuses_bias_computed_at_run_time() -> None:
    model, _ = build_case(_simple())
    b = _drop_initializer(model, "B")
    model.graph.input.append(helper.make_tensor_value_info("b_in", onnx.TensorProto.FLOAT, list(b.dims)))
    model.graph.node.insert(0, helper.make_node("Relu", ["b_in"], ["B"], name="relu"))
    assert "bias of ConvTranspose 'deconv' 'B' is computed at run time by Relu 'relu'" in _only_skip(model)


def test_refuses_output_with_another_consumer() -> None:
    model, _ = build_case(_simple())
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"]))
    assert "output 't' of ConvTranspose 'deconv' also feeds Relu 'other'" in _only_skip(model)


def test_refuses_output_that_is_graph_output() -> None:
    model, _ = build_case(_simple())
    model.graph.output.append(helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"]))
    assert "output 't' of ConvTranspose 'deconv' is also a graph output" in _only_skip(model)


def test_refuses_channel_count_mismatch() -> None:
    """A BN sized for W.shape[1] (2) instead of W.shape[1] * group (6): the ungrouped reading."""
    model, _ = build_case(_simple())
    for t in model.graph.initializer:
        if t.name.startswith("bn_"):
            t.CopyFrom(tensor(t.name, numpy_helper.to_array(t)[:2]))
    reason = _only_skip(model, check=False)
    assert "ConvTranspose 'deconv' has 6 output channels but the normalization has 2" in reason


def test_refuses_group_not_dividing_input_channels() -> None:
    model, _ = build_case(_simple())
    model.graph.node[0].attribute[0].CopyFrom(helper.make_attribute("group", 4))
    reason = _only_skip(model, check=False)
    assert "weight 'W' of ConvTranspose 'deconv' has 6 input channels, not a multiple of group=4" in reason


def test_refuses_fp16_overflow() -> None:
    model, _ = build_case(_simple(dtype=FP16))
    for t in model.graph.initializer:
        if t.name == "bn_var":
            t.CopyFrom(tensor(t.name, np.full(6, 1e-9, np.float32)))
        if t.name == "bn_gamma":
            t.CopyFrom(tensor(t.name, np.full(6, 5000.0, np.float32)))
    reason = _only_skip(model)
    assert "folded weight of ConvTranspose 'deconv' overflows float16" in reason
