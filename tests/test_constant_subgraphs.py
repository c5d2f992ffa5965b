"""Parameters computed by small constant subgraphs (dynamo's zero bias, paddle-style reshaped statistics)
are constants: evaluated at fold time, folded, and the subgraph removed once nothing else reads it.
What depends on a run-time value (a dynamic input shape, a random op) or would be too large is not."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, make_model, ops, tensor
from onnx import TensorProto, helper

import bnfold
from bnfold.ir import evaluate as const_eval
from bnfold.ir.view import GraphView

C = 4


def _bn_params(rng: np.random.Generator, prefix: str = "") -> list[onnx.TensorProto]:
    return [
        tensor(f"{prefix}gamma", rng.uniform(0.5, 1.5, C).astype(np.float32)),
        tensor(f"{prefix}beta", rng.normal(0, 0.5, C).astype(np.float32)),
        tensor(f"{prefix}mean", rng.normal(0, 0.5, C).astype(np.float32)),
        tensor(f"{prefix}var", rng.uniform(0.5, 2.0, C).astype(np.float32)),
    ]


def _bn(x: str, out: str, prefix: str = "", **attrs: int) -> onnx.NodeProto:
    names = [f"{prefix}{n}" for n in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [out], name=f"{prefix}bn", epsilon=1e-5, **attrs)


def _dynamo_bias(w: str, like: str, out: str, zero: str = "zero", p: str = "") -> list[onnx.NodeProto]:
    """The torch dynamo exporter's zero bias for a bias-free Conv (optimize=False)."""
    return [
        helper.make_node("Shape", [w], [f"{p}w_shape"], name=f"{p}shape", start=0, end=1),
        helper.make_node("Constant", [], [f"{p}one"], name=f"{p}one", value_ints=[1]),
        helper.make_node("Expand", [f"{p}w_shape", f"{p}one"], [f"{p}bias_shape"], name=f"{p}expand_shape"),
        helper.make_node("CastLike", [zero, like], [f"{p}zero_like"], name=f"{p}castlike"),
        helper.make_node("Expand", [f"{p}zero_like", f"{p}bias_shape"], [out], name=f"{p}expand_bias"),
    ]


def _zero() -> onnx.NodeProto:
    return helper.make_node("Constant", [], ["zero"], name="zero",
                            value=helper.make_tensor("", TensorProto.INT64, [], [0]))


def _feeds(model: onnx.ModelProto, batch: int = 1) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    shape = [d.dim_value or batch for d in vi.type.tensor_type.shape.dim]
    return {vi.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _single_skip(model: onnx.ModelProto) -> str:
    result = bnfold.fold(model, check=False)
    assert not result.folded and len(result.skipped) == 1
    return result.skipped[0].reason


@pytest.mark.parametrize("like", ["x", "r"])
def test_dynamo_zero_bias_folds_and_its_subgraph_is_removed(rng: np.random.Generator, like: str) -> None:
    """``like`` is CastLike's type source: the graph input, or a Relu output with no value_info (its type
    is followed back to the input). A batch of 'N' does not matter: Shape reads the weight."""
    w = tensor("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32))
    nodes = [
        _zero(),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        *_dynamo_bias("W", like, "bias"),
        helper.make_node("Conv", ["r", "W", "bias"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        _bn("y", "out"),
        helper.make_node("Shape", ["W"], ["dead_before"], name="dead_shape"),  # unused before bnfold ran
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w, *_bn_params(rng)])
    found = GraphView(model.graph, opset=17).constant("bias")
    assert found.value is not None and found.value.dtype == np.float32 and found.value.tolist() == [0.0] * C
    assert found.origin == "computed from constants by Expand 'expand_bias'"
    result = bnfold.fold(model)
    assert len(result.folded) == 1 and not result.skipped
    out = result.model
    assert ops(out) == ["Relu", "Conv", "Shape"]  # the bias subgraph is gone, the dead-before Shape is not
    assert out.graph.node[2].name == "dead_shape" and "W" in {t.name for t in out.graph.initializer}
    assert out.graph.node[1].input[2] in {t.name for t in out.graph.initializer}
    assert_same_outputs(model, out, _feeds(model, batch=2))


def test_shared_subgraph_nodes_stay_while_an_unfolded_path_reads_them(rng: np.random.Generator) -> None:
    ws = [tensor(f"W{i}", rng.standard_normal((C, 3, 1, 1)).astype(np.float32)) for i in range(2)]
    nodes = [_zero()]
    for i in range(2):
        nodes += _dynamo_bias(f"W{i}", "x", f"bias{i}", p=f"c{i}_")
        nodes.append(helper.make_node("Conv", ["x", f"W{i}", f"bias{i}"], [f"y{i}"], name=f"conv{i}"))
    nodes += [_bn("y0", "out0", "a_"), helper.make_node("Relu", ["y1"], ["out1"], name="relu")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                       [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("out0", "out1")],
                       [*ws, *_bn_params(rng, "a_")])
    result = bnfold.fold(model)
    assert len(result.folded) == 1
    out = result.model
    names = [n.name for n in out.graph.node]
    assert "zero" in names and "c1_expand_bias" in names  # conv1's bias path still reads the shared zero
    assert not any(n.startswith("c0_") for n in names)
    assert_same_outputs(model, out, _feeds(model))


def test_paddle_style_statistics_through_reshape_unsqueeze_cast(rng: np.random.Generator) -> None:
    """BN statistics stored in other shapes or dtypes and converted by small subgraphs."""
    g, b, m, v = (p for p in _bn_params(rng))
    stored = [
        tensor("g_2d", onnx.numpy_helper.to_array(g).reshape(1, C)),
        tensor("b_f64", onnx.numpy_helper.to_array(b).astype(np.float64)),
        tensor("m_half", (onnx.numpy_helper.to_array(m) / 2).reshape(C, 1)),
        tensor("v_scalar_dims", onnx.numpy_helper.to_array(v)),
        tensor("flat", np.array([C], np.int64)),
        tensor("axes", np.array([1], np.int64)),
        tensor("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Reshape", ["g_2d", "flat"], ["gamma"], name="reshape_gamma"),
        helper.make_node("Cast", ["b_f64"], ["beta"], name="cast_beta", to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["two"], name="two", value_float=2.0),
        helper.make_node("Mul", ["m_half", "two"], ["m_col"], name="mul_mean"),
        helper.make_node("Squeeze", ["m_col", "axes"], ["mean"], name="squeeze_mean"),
        helper.make_node("Unsqueeze", ["v_scalar_dims", "axes"], ["v_col"], name="unsqueeze_var"),
        helper.make_node("Flatten", ["v_col"], ["v_row"], name="flatten_var", axis=0),
        helper.make_node("Reshape", ["v_row", "flat"], ["var"], name="reshape_var"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        _bn("y", "out"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], stored)
    result = bnfold.fold(model)
    assert len(result.folded) == 1 and ops(result.model) == ["Conv"]
    assert {t.name for t in result.model.graph.initializer} == {"W_bnfold", "y_bnfold_bias"}
    assert_same_outputs(model, result.model, _feeds(model))


def _bias_from_input_shape(dims: list[int | str]) -> onnx.ModelProto:
    """A Conv bias computed from ``Shape(x)``: constant only when every dimension of ``x`` is fixed."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape_x"),
        helper.make_node("Slice", ["x_shape", "zero1", "one1"], ["batch"], name="slice_batch"),
        helper.make_node("Cast", ["batch"], ["batch_f"], name="cast_batch", to=TensorProto.FLOAT),
        helper.make_node("Expand", ["batch_f", "c1"], ["bias"], name="expand_bias"),
        helper.make_node("Conv", ["x", "W", "bias"], ["y"], name="conv"),
        _bn("y", "out"),
    ]
    inits = [tensor("zero1", np.array([0], np.int64)), tensor("one1", np.array([1], np.int64)),
             tensor("c1", np.array([C], np.int64)),
             tensor("W", rng.standard_normal((C, 3, 1, 1)).astype(np.float32)), *_bn_params(rng)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)


def test_shape_of_a_dynamic_graph_input_is_not_a_constant() -> None:
    model = _bias_from_input_shape(["N", 3, 4, 4])
    assert _single_skip(model) == (
        "bias of Conv 'conv' 'bias' is computed at run time by Expand 'expand_bias' (the shape of graph input "
        "'x' is not fixed: dimension 0 is 'N')"
    )
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()  # neither a number nor a name
    assert "is not fixed: dimension 0 is unknown)" in _single_skip(model)


def test_shape_of_a_fully_static_graph_input_is_a_constant() -> None:
    model = _bias_from_input_shape([2, 3, 4, 4])
    assert GraphView(model.graph, opset=17).constant("bias").value.tolist() == [2.0] * C  # type: ignore[union-attr]
    result = bnfold.fold(model)
    assert len(result.folded) == 1 and ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, _feeds(model))


def test_random_op_is_never_a_constant(rng: np.random.Generator) -> None:
    nodes = [
        helper.make_node("RandomNormal", [], ["noise"], name="rand", shape=[C], seed=1.0),
        helper.make_node("Constant", [], ["z"], name="z", value_float=0.0),
        helper.make_node("Mul", ["noise", "z"], ["bias"], name="mul"),  # always zero, but not a constant
        helper.make_node("Conv", ["x", "W", "bias"], ["y"], name="conv"),
        _bn("y", "out"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                       [tensor("W", rng.standard_normal((C, 3, 1, 1)).astype(np.float32)), *_bn_params(rng)])
    assert _single_skip(model) == (
        "bias of Conv 'conv' 'bias' is computed at run time by Mul 'mul' (it depends on 'noise', which is "
        "computed at run time by RandomNormal 'rand')"
    )


def test_custom_domain_op_is_not_evaluated(rng: np.random.Generator) -> None:
    nodes = [
        helper.make_node("Identity", ["b0"], ["bias"], name="custom", domain="com.example"),
        helper.make_node("Conv", ["x", "W", "bias"], ["y"], name="conv"),
        _bn("y", "out"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, C, 4, 4])],
                              [tensor("b0", np.zeros(C, np.float32)),
                               tensor("W", rng.standard_normal((C, 3, 1, 1)).astype(np.float32)), *_bn_params(rng)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    assert _single_skip(model) == "bias of Conv 'conv' 'bias' is computed at run time by Identity 'custom'"


def _stat_graph(extra: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    g, b, m, _ = _bn_params(rng)
    nodes = [*extra, helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), _bn("y", "out")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                      [g, b, m, tensor("W", rng.standard_normal((C, 3, 1, 1)).astype(np.float32)), *inits])


def test_results_larger_than_the_cap_are_not_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = tensor("huge", np.array([1 << 16, 1 << 16], np.int64))  # 16 GiB of float32: never materialised
    view = GraphView(_stat_graph([helper.make_node("ConstantOfShape", ["huge"], ["big"], name="cos")],
                                 [huge]).graph, opset=17)
    assert view.constant("big").why_not == (
        f"is computed at run time by ConstantOfShape 'cos' (its value would take {4 << 32} bytes, more than "
        f"the {64 << 20} bnfold evaluates at fold time)"
    )
    model = _stat_graph([helper.make_node("Reshape", ["v_2d", "flat"], ["var"], name="reshape_var")],
                        [tensor("v_2d", np.ones((1, C), np.float32)), tensor("flat", np.array([C], np.int64))])
    monkeypatch.setattr(const_eval, "MAX_RESULT_BYTES", 4 * C - 1)
    assert "more than the 15 bnfold evaluates" in _single_skip(model)
    monkeypatch.setattr(const_eval, "MAX_RESULT_BYTES", 4 * C)
    assert ops(bnfold.fold(model).model) == ["Conv"]


def test_evaluation_errors_are_refusals_not_crashes() -> None:
    model = _stat_graph([helper.make_node("Reshape", ["v_2d", "bad"], ["var"], name="reshape_var")],
                        [tensor("v_2d", np.ones((1, C), np.float32)), tensor("bad", np.array([3], np.int64))])
    reason = _single_skip(model)
    assert reason.startswith("BatchNormalization variance 'var' is computed at run time by Reshape 'reshape_var' (")
    assert "failed" in reason or "inconsistent" in reason


def test_long_chain_and_unknown_opset() -> None:
    """A chain deeper than Python's recursion limit is walked iteratively; without an opset only Identity
    is followed, nothing is evaluated."""
    chain = [helper.make_node("Identity", [f"v{i}"], [f"v{i + 1}"], name=f"id{i}") for i in range(2000)]
    graph = _stat_graph([*chain, helper.make_node("Abs", ["v2000"], ["var"], name="abs")],
                        [tensor("v0", np.full(C, -2.0, np.float32))]).graph
    assert GraphView(graph, opset=17).constant("var").value.tolist() == [2.0] * C  # type: ignore[union-attr]
    assert GraphView(graph).constant("v2000").origin == "Identity of " * 2000 + "initializer"
    unknown = GraphView(graph).constant("var")
    assert unknown.value is None and "the model's opset is unknown" in unknown.why_not


# ------------------------------------------------------------------------------ real dynamo exports

DYNAMO_NETS = ("resnet_basic", "mobilenetv2_block", "efficientnet_mbconv")


@pytest.fixture(scope="module", params=DYNAMO_NETS)
def dynamo_export(request: pytest.FixtureRequest) -> Iterator[tuple[object, onnx.ModelProto, np.ndarray]]:
    pytest.importorskip("torch")
    import nets

    module, shape = nets.NETS[request.param]()
    model = nets.export_dynamo(module, shape)
    yield module, model, nets.example_input(shape).numpy()


@pytest.mark.torch
def test_dynamo_export_folds_every_bn(dynamo_export: tuple[object, onnx.ModelProto, np.ndarray]) -> None:
    _, model, x = dynamo_export
    before = ops(model)
    assert "BatchNormalization" in before and "Expand" in before  # the computed zero biases
    result = bnfold.fold(model)
    assert not result.skipped and result.bn_before == before.count("BatchNormalization")
    out = result.model
    after = ops(out)
    assert "BatchNormalization" not in after and "Expand" not in after and "Shape" not in after
    inits = {t.name for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type == "Conv":
            assert node.input[2] in inits  # every bias now a plain initializer
    reads = {n for node in out.graph.node for n in node.input} | {o.name for o in out.graph.output}
    assert all(o in reads for node in out.graph.node for o in node.output), "a dead node was left behind"
    assert_same_outputs(model, out, {model.graph.input[0].name: x})
