"""BatchNormalization reached from a linear producer through Identity / Reshape / Flatten / Squeeze /
Unsqueeze / Transpose: folds where the channel axis provably maps to the producer's output channels
(proven on onnxruntime), a reason otherwise."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_same_outputs, make_model, ops, tensor, with_output_shapes
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
KINDS = (
    "conv_identity", "conv_identity_reshape", "conv_reshape_flat", "conv_reshape_minus1_first",
    "conv_transpose_hw", "conv_flatten_1x1", "conv_squeeze_1x1", "convtranspose_identity",
    "gemm_unsqueeze", "gemm_unsqueeze_last", "gemm_reshape", "matmul_transpose", "matmul2_identity",
)


def bn_inits(c: int, dt: np.dtype, rng: np.random.Generator, prefix: str = "bn") -> list[onnx.TensorProto]:
    return [
        tensor(f"{prefix}_g", rng.uniform(0.5, 1.5, c).astype(dt)),
        tensor(f"{prefix}_b", rng.standard_normal(c).astype(dt)),
        tensor(f"{prefix}_m", rng.standard_normal(c).astype(dt)),
        tensor(f"{prefix}_v", rng.uniform(0.5, 2.0, c).astype(dt)),
    ]


def bn_node(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *(f"{prefix}_{s}" for s in "gbmv")], [y], name=prefix)


def axes_node(op: str, x: str, y: str, axes: list[int], opset: int, inits: list[onnx.TensorProto],
              name: str) -> onnx.NodeProto:
    """Squeeze / Unsqueeze with axes as an attribute (opset < 13) or as a constant input."""
    if opset < 13:
        return helper.make_node(op, [x], [y], axes=axes, name=name)
    inits.append(tensor(f"{name}_axes", np.array(axes, np.int64)))
    return helper.make_node(op, [x, f"{name}_axes"], [y], name=name)


def build(kind: str, c: int, batch: int, symbolic: bool, opset: int, dt: np.dtype,
          seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    """``producer -> layout ops -> BN``; returns the model, feeds and the layout op types."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = [*bn_inits(c, dt, rng)]
    nodes: list[onnx.NodeProto] = []
    n: int | str = "N" if symbolic else batch
    if kind.startswith("conv") and not kind.startswith("convtranspose"):
        one = kind.endswith("1x1")
        x_shape = [batch, 2, 3, 3] if one else [batch, 2, 5, 4]
        inits.append(tensor("W", rng.standard_normal((c, 2, 3, 3)).astype(dt)))
        nodes.append(helper.make_node("Conv", ["x", "W"], ["t"], name="producer",
                                      pads=[0] * 4 if one else [1, 1, 1, 1]))
    elif kind.startswith("convtranspose"):
        x_shape = [batch, 3, 3, 3]
        inits.append(tensor("W", rng.standard_normal((3, c, 2, 2)).astype(dt)))
        nodes.append(helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="producer", strides=[2, 2]))
    elif kind.startswith("gemm"):
        x_shape = [batch, 3]
        inits.append(tensor("W", rng.standard_normal((c, 3)).astype(dt)))
        inits.append(tensor("B", rng.standard_normal(c).astype(dt)))
        nodes.append(helper.make_node("Gemm", ["x", "W", "B"], ["t"], name="producer", transB=1, beta=0.5))
    else:
        x_shape = [batch, 6, 3] if kind == "matmul_transpose" else [batch, 3]
        inits.append(tensor("W", rng.standard_normal((3, c)).astype(dt)))
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["t"], name="producer"))

    def reshape(target: list[int], x: str, y: str) -> None:
        name = f"shape_{len(nodes)}"
        inits.append(tensor(name, np.array(target, np.int64)))
        nodes.append(helper.make_node("Reshape", [x, name], [y], name=f"reshape_{len(nodes)}"))

    if kind in ("conv_identity", "convtranspose_identity", "matmul2_identity"):
        nodes.append(helper.make_node("Identity", ["t"], ["u"], name="identity"))
    elif kind == "conv_identity_reshape":
        nodes.append(helper.make_node("Identity", ["t"], ["i"], name="identity"))
        reshape([0, c, -1], "i", "u")
    elif kind == "conv_reshape_flat":
        reshape([0 if symbolic else batch, c, 20], "t", "u")
    elif kind == "conv_reshape_minus1_first":
        reshape([0, -1, 5, 4, 1], "t", "u")
    elif kind == "conv_transpose_hw":
        nodes.append(helper.make_node("Transpose", ["t"], ["u"], perm=[0, 1, 3, 2], name="transpose"))
    elif kind == "conv_flatten_1x1":
        nodes.append(helper.make_node("Flatten", ["t"], ["u"], axis=1, name="flatten"))
    elif kind == "conv_squeeze_1x1":
        nodes.append(axes_node("Squeeze", "t", "u", [2, 3], opset, inits, "squeeze"))
    elif kind == "gemm_unsqueeze":
        nodes.append(axes_node("Unsqueeze", "t", "u", [2, 3], opset, inits, "unsqueeze"))
    elif kind == "gemm_unsqueeze_last":
        nodes.append(axes_node("Unsqueeze", "t", "u", [-1], opset, inits, "unsqueeze"))
    elif kind == "gemm_reshape":
        reshape([0, -1, 1, 1], "t", "u")
    elif kind == "matmul_transpose":
        nodes.append(helper.make_node("Transpose", ["t"], ["u"], perm=[0, 2, 1], name="transpose"))
    nodes.append(bn_node("u", "y"))
    et = NP_TO_ONNX[dt]
    declared = [n, *x_shape[1:]]
    model = make_model(nodes, [helper.make_tensor_value_info("x", et, declared)],
                       [helper.make_tensor_value_info("y", et, None)], inits, opset=opset,
                       ir_version=10 if opset >= 21 else 8)
    feeds = {"x": rng.standard_normal(x_shape).astype(dt)}
    return model, feeds, [nd.op_type for nd in nodes[1:-1]]


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    c=st.integers(1, 5),
    batch=st.integers(1, 3),
    symbolic=st.booleans(),
    opset=st.sampled_from([11, 13, 15, 17, 21, 24]),
    dt=st.sampled_from([np.dtype(np.float32), np.dtype(np.float16)]),
    seed=st.integers(0, 2**16),
)
def test_bn_through_layout_ops_folds_and_matches(
    kind: str, c: int, batch: int, symbolic: bool, opset: int, dt: np.dtype, seed: int
) -> None:
    model, feeds, layout_ops = build(kind, c, batch, symbolic, opset, dt, seed)
    result = bnfold.fold(model)
    assert result.skipped == (), result.skipped
    assert [(p.rule, p.output) for p in result.folded] == [("layout", "y")]
    out_ops = ops(result.model)
    assert "BatchNormalization" not in out_ops
    assert [o for o in out_ops if o in ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                                        "Transpose")] == layout_ops
    assert out_ops[-1] == layout_ops[-1]  # the last layout op now writes the BN's output
    assert {o.name for o in result.model.graph.output} == {"y"}
    assert_same_outputs(model, result.model, feeds)


def test_conv_identity_identity_bn() -> None:
    model, feeds, _ = build("conv_identity", 3, 2, True, 17, np.dtype(np.float32), 1)
    model.graph.node[1].output[0] = "i"
    model.graph.node.insert(2, helper.make_node("Identity", ["i"], ["u"], name="identity2"))
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv", "Identity", "Identity"]
    assert_same_outputs(model, result.model, feeds)


# ---- refusals: one test each ------------------------------------------------------------------------

def _single_skip(model: onnx.ModelProto, **kw: object) -> str:
    result = bnfold.fold(model, **kw)  # type: ignore[arg-type]
    assert result.folded == ()
    assert "BatchNormalization" in ops(result.model)
    [skip] = result.skipped
    assert skip.output == "y" and skip.op_type == "BatchNormalization"
    return skip.reason


def _conv_layout_bn(layout: list[onnx.NodeProto], c_bn: int, extra: list[onnx.TensorProto] = (),  # type: ignore[assignment]
                    x_shape: list[int | str] | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)),
             *bn_inits(c_bn, np.dtype(np.float32), rng), *extra]
    nodes = [helper.make_node("Conv", ["x", "W"], ["t"], name="conv", pads=[1, 1, 1, 1]), *layout,
             bn_node(layout[-1].output[0], "y")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model


def test_refuses_transpose_that_moves_channels_off_axis_1() -> None:
    model = _conv_layout_bn([helper.make_node("Transpose", ["t"], ["u"], perm=[0, 2, 3, 1], name="nhwc")], 5,
                            x_shape=[1, 2, 4, 5])
    reason = _single_skip(model, check=False)
    assert "via Transpose" in reason and "maps to axis 2 of 't', not to the output channel axis 1" in reason


def test_refuses_flatten_that_merges_spatial_axes_into_channels() -> None:
    model = _conv_layout_bn([helper.make_node("Flatten", ["t"], ["u"], name="flatten")], 4 * 3 * 3,
                            x_shape=[1, 2, 3, 3])
    reason = _single_skip(model, check=False)
    assert "Flatten 'flatten' merges axes [1, 2, 3]" in reason


def test_refuses_reshape_with_run_time_shape() -> None:
    nodes = [helper.make_node("Shape", ["t"], ["s"], name="shape"),
             helper.make_node("Reshape", ["t", "s"], ["u"], name="reshape")]
    model = _conv_layout_bn(nodes, 4, x_shape=[1, 2, 3, 3])
    reason = _single_skip(model, check=False)
    assert "Reshape 'reshape' takes its target shape from a tensor computed at run time" in reason


def test_refuses_reshape_that_mixes_channels() -> None:
    shape = tensor("target", np.array([0, 4 * 3, 3], np.int64))
    model = _conv_layout_bn([helper.make_node("Reshape", ["t", "target"], ["u"], name="reshape")], 12, [shape],
                            x_shape=[1, 2, 3, 3])
    reason = _single_skip(model, check=False)
    assert "output axis 1 is not provably one input axis" in reason


def test_refuses_reshape_whose_batch_is_not_provably_the_same() -> None:
    shape = tensor("target", np.array([2, 4, -1], np.int64))  # literal batch 2, input batch symbolic
    model = _conv_layout_bn([helper.make_node("Reshape", ["t", "target"], ["u"], name="reshape")], 4, [shape],
                            x_shape=["N", 2, 3, 3])
    reason = _single_skip(model, check=False)
    assert "is not provably one input axis" in reason


def test_reshape_of_conv_output_folds_though_the_conv_input_has_no_shape() -> None:
    """The Conv's weight proves its output's rank and channels ([?, 4, ?, ?]): no concrete dims needed."""
    shape = tensor("target", np.array([0, 4, -1], np.int64))
    model = _conv_layout_bn([helper.make_node("Reshape", ["t", "target"], ["u"], name="reshape")], 4, [shape],
                            x_shape=None)
    result = bnfold.fold(model, check=False)
    assert [p.output for p in result.folded] == ["y"] and not result.skipped
    assert bnfold.verify(model, result.model, shapes={"x": (1, 2, 5, 5)}, threads=1).passed


def test_refuses_reshape_of_tensor_with_unknown_shape() -> None:
    """A MatMul's output rank follows its activation's, which nothing declares here: the refusal says so."""
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.standard_normal((3, 4)).astype(np.float32)),
             tensor("target", np.array([0, 4, -1], np.int64)), *bn_inits(4, np.dtype(np.float32), rng)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"], name="mm"),
             helper.make_node("Reshape", ["t", "target"], ["u"], name="reshape"), bn_node("u", "y")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    reason = _single_skip(model, check=False)
    assert "the shape of 't', the input of Reshape 'reshape', is unknown; it depends on graph input 'x', whose " \
        "shape the model does not declare" in reason


def test_refuses_squeeze_without_axes_on_unknown_dims() -> None:
    model = _conv_layout_bn([helper.make_node("Squeeze", ["t"], ["u"], name="squeeze")], 4,
                            x_shape=["N", 2, "H", 1])
    reason = _single_skip(model, check=False)
    assert "removes every size-1 axis" in reason


def test_one_channel_bn_on_an_inserted_axis_is_uniform_and_folds() -> None:
    """A BN over an axis that Unsqueeze inserted has one channel: the same map on every element, which
    moves through any layout op, so it folds into all of the Gemm's columns."""
    rng = np.random.default_rng(1)
    inits = [tensor("W", rng.standard_normal((3, 4)).astype(np.float32)), tensor("axes", np.array([1], np.int64)),
             *bn_inits(1, np.dtype(np.float32), rng)]
    nodes = [helper.make_node("Gemm", ["x", "W"], ["t"], name="gemm"),
             helper.make_node("Unsqueeze", ["t", "axes"], ["u"], name="unsqueeze"), bn_node("u", "y")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Gemm", "Unsqueeze"]
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((2, 3)).astype(np.float32)})


def test_refuses_shared_intermediate_without_cloning() -> None:
    model, feeds, _ = build("conv_identity_reshape", 3, 2, False, 17, np.dtype(np.float32), 2)
    model.graph.output.append(helper.make_tensor_value_info("i", TensorProto.FLOAT, None))
    with_output_shapes(model)
    reason = _single_skip(model, clone=False)
    assert "'i' (on the way from Conv 'producer') is a graph output; cloning it is turned off" in reason
    cloned = bnfold.fold(model)  # with cloning: Conv and Identity cloned, the Reshape rewritten
    assert ops(cloned.model).count("Conv") == 2 and ops(cloned.model).count("Identity") == 2
    assert "BatchNormalization" not in ops(cloned.model)
    assert_same_outputs(model, cloned.model, feeds)


def test_bn_input_shared_clones_the_whole_chain() -> None:
    model, feeds, _ = build("conv_identity_reshape", 3, 2, True, 17, np.dtype(np.float32), 5)
    model.graph.node.append(helper.make_node("Relu", ["u"], ["r"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    with_output_shapes(model)
    result = bnfold.fold(model)
    assert sorted(ops(result.model)) == sorted(["Conv", "Conv", "Identity", "Identity", "Reshape", "Reshape",
                                                "Relu"])
    originals = {n.name: n.SerializeToString() for n in model.graph.node}
    for name in ("producer", "identity", "other"):
        kept = next(n for n in result.model.graph.node if n.name == name)
        assert kept.SerializeToString() == originals[name]
    assert_same_outputs(model, result.model, feeds)


def test_producer_output_shared_is_cloned() -> None:
    model, feeds, _ = build("matmul_transpose", 4, 2, True, 17, np.dtype(np.float32), 3)
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    with_output_shapes(model)
    result = bnfold.fold(model)
    assert "BatchNormalization" not in ops(result.model) and ops(result.model).count("MatMul") == 2
    assert_same_outputs(model, result.model, feeds)
    reason = _single_skip(model, clone=False)
    assert "also feeds Relu 'other'" in reason


def test_only_layout_folds_through_layout_ops() -> None:
    model, feeds, _ = build("gemm_unsqueeze", 3, 2, True, 17, np.dtype(np.float32), 4)
    result = bnfold.fold(model, only=["layout"])
    assert ops(result.model) == ["Gemm", "Unsqueeze"]
    assert_same_outputs(model, result.model, feeds)
    assert bnfold.fold(model, skip=["layout"]).folded == ()


# ---- the shapes the proofs rest on agree with onnx shape inference ---------------------------------

SHAPE_CASES = [
    ("Conv", [1, 2, 7, 6], {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}, [(3, 2, 3, 2)]),
    ("Conv", [1, 2, 7, 6], {"auto_pad": "SAME_LOWER", "strides": [2, 3]}, [(3, 2, 3, 3)]),
    ("Conv", [1, 2, 7], {"auto_pad": "VALID", "strides": [2]}, [(4, 1, 3)]),
    ("MaxPool", [1, 2, 7, 6], {"kernel_shape": [3, 2], "strides": [2, 2]}, []),
    ("GlobalAveragePool", [1, 2, 7, 6], {}, []),
    ("Gemm", [4, 3], {"transA": 1, "transB": 1}, [(5, 4)]),
    ("MatMul", [2, 1, 4, 3], {}, [(5, 3, 6)]),
    ("MatMul", [3], {}, [(2, 3, 6)]),
    ("Transpose", [2, 3, 4], {}, []),
    ("Transpose", [2, 3, 4], {"perm": [1, 2, 0]}, []),
    ("Flatten", [2, 3, 4, 5], {"axis": -2}, []),
    ("Reshape", [2, 3, 4, 5], {}, [np.array([0, -1, 5], np.int64)]),
    ("Squeeze", [2, 1, 4, 1], {}, [np.array([-1], np.int64)]),
    ("Squeeze", [2, 1, 4, 1], {}, []),
    ("Unsqueeze", [2, 4], {}, [np.array([0, -1], np.int64)]),
    ("Add", [2, 1, 4], {}, [(3, 1)]),
]


def test_shape_propagation_matches_onnx_shape_inference() -> None:
    from bnfold.ir.shapes import shape_of
    from bnfold.ir.view import GraphView

    for op, x_shape, attrs, extra in SHAPE_CASES:
        inits = [tensor(f"in{i}", e if isinstance(e, np.ndarray) else np.ones(e, np.float32))
                 for i, e in enumerate(extra)]
        node = helper.make_node(op, ["x", *(t.name for t in inits)], ["y"], **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        want = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
        got = shape_of(GraphView(model.graph), "y")
        assert got is not None, op
        assert [d.value for d in got] == want, (op, attrs)
