"""Conv -> BatchNormalization test graphs: the hypothesis strategy, the builder, and the refusal helpers."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from conftest import make_model, ops, tensor
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
}


@dataclass
class ConvCase:
    rank: int
    groups: int
    in_per_group: int
    out_per_group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None
    auto_pad: str | None
    bias: bool
    dtype: np.dtype
    bn_opset: int
    epsilon: float | None
    spatial_size: tuple[int, ...]
    seed: int


@st.composite
def conv_cases(draw: st.DrawFn) -> ConvCase:
    rank = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans())
    in_per_group = 1 if depthwise else draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    auto_pad = draw(st.sampled_from([None, None, "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = None if auto_pad else tuple(draw(st.integers(0, 2)) for _ in range(2 * rank))
    size = 7 if rank < 3 else 5
    spatial = tuple(draw(st.integers(size - 2, size)) for _ in range(rank))
    return ConvCase(
        rank=rank, groups=groups, in_per_group=in_per_group, out_per_group=out_per_group, kernel=kernel,
        strides=strides, dilations=dilations, pads=pads, auto_pad=auto_pad, bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)])),
        bn_opset=draw(st.sampled_from([7, 9, 14, 15])),
        epsilon=draw(st.sampled_from([None, 1e-5, 1e-3, 0.1])),
        spatial_size=spatial, seed=draw(st.integers(0, 2**16)),
    )


def build_conv_bn(case: ConvCase) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(case.seed)
    dt = case.dtype
    c_in = case.groups * case.in_per_group
    c_out = case.groups * case.out_per_group
    w = rng.standard_normal((c_out, case.in_per_group, *case.kernel)).astype(dt)
    inits = [tensor("W", w)]
    conv_inputs = ["x", "W"]
    if case.bias:
        inits.append(tensor("B", rng.standard_normal(c_out).astype(dt)))
        conv_inputs.append("B")
    attrs: dict[str, object] = {"group": case.groups, "strides": list(case.strides),
                                "dilations": list(case.dilations), "kernel_shape": list(case.kernel)}
    if case.auto_pad:
        attrs["auto_pad"] = case.auto_pad
    else:
        attrs["pads"] = list(case.pads or ())
    stat_dt = np.float32 if (case.bn_opset >= 15 and dt == np.float16) else dt
    inits += [
        tensor("gamma", rng.uniform(0.5, 1.5, c_out).astype(stat_dt)),
        tensor("beta", rng.standard_normal(c_out).astype(stat_dt)),
        tensor("mean", rng.standard_normal(c_out).astype(stat_dt)),
        tensor("var", rng.uniform(0.2, 2.0, c_out).astype(stat_dt)),
    ]
    bn_attrs = {} if case.epsilon is None else {"epsilon": case.epsilon}
    nodes = [
        helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv", **attrs),
        helper.make_node("BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"], ["y"],
                         name="bn", **bn_attrs),
    ]
    et = NP_TO_ONNX[dt]
    x_shape = [2, c_in, *case.spatial_size]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", et, x_shape)],
        [helper.make_tensor_value_info("y", et, None)],
        inits,
        opset=max(case.bn_opset, 11),
    )
    if case.bn_opset < 9:  # opset 7 keeps Conv-1 and BN-7
        model.opset_import[0].version = case.bn_opset
    x = rng.standard_normal(x_shape).astype(dt)
    return model, {"x": x}


def _output_shape_known(model: onnx.ModelProto) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


def _simple(**changes: object) -> ConvCase:
    case = ConvCase(2, 1, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), None, True, np.dtype(np.float32), 15,
                    None, (5, 5), 11)
    for k, v in changes.items():
        setattr(case, k, v)
    return case


def _only_skip(model: onnx.ModelProto, **kw: object) -> str:
    result = bnfold.fold(model, **kw)  # type: ignore[arg-type]
    assert result.folded == ()
    assert "BatchNormalization" in ops(result.model)
    assert len(result.skipped) == 1
    return result.skipped[0].reason
