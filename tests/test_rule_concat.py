"""concat: BN after a Concat of linear producers is split by channel range and folded into each producer
(directly or through layout ops; shared producers cloned); structure, numbers, and each refusal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, make_model, ops, tensor
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold


def _bn_inits(rng: np.random.Generator, c: int) -> list[onnx.TensorProto]:
    return [tensor("gamma", rng.uniform(0.5, 1.5, c).astype(np.float32)),
            tensor("beta", rng.normal(0, 0.5, c).astype(np.float32)),
            tensor("mean", rng.normal(0, 0.5, c).astype(np.float32)),
            tensor("var", rng.uniform(0.5, 2.0, c).astype(np.float32))]


def _mixed(rng: np.random.Generator, cin: int, parts: list[tuple[int, int, int]], *, axis: int = 1,
           extra: list[onnx.NodeProto] | None = None, outputs: tuple[str, ...] = ("z",)) -> onnx.ModelProto:
    """x -> Conv_i (out channels, kernel, group) -> Concat -> BN -> z."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for i, (cout, k, group) in enumerate(parts):
        inits.append(tensor(f"w{i}", rng.standard_normal((cout, cin // group, k, k)).astype(np.float32)))
        inits.append(tensor(f"b{i}", rng.standard_normal(cout).astype(np.float32)))
        nodes.append(helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"t{i}"], name=f"conv{i}",
                                      pads=[k // 2] * 4, group=group))
    total = sum(p[0] for p in parts)
    nodes.append(helper.make_node("Concat", [f"t{i}" for i in range(len(parts))], ["cat"], name="cat", axis=axis))
    nodes.append(helper.make_node("BatchNormalization", ["cat", "gamma", "beta", "mean", "var"], ["z"], name="bn"))
    nodes.extend(extra or [])
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 5, 5])],
                      [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                      [*inits, *_bn_inits(rng, total)])


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def _skip(model: onnx.ModelProto) -> str:
    result = bnfold.fold(model, check=False)
    assert result.folded == () and len(result.skipped) == 1
    return result.skipped[0].reason


@given(
    parts=st.lists(st.tuples(st.integers(1, 4), st.sampled_from([1, 3]), st.sampled_from([1, 2])), min_size=1,
                   max_size=4),
    negative_axis=st.booleans(), seed=st.integers(0, 2**16),
)
def test_folds_into_every_producer(parts: list[tuple[int, int, int]], negative_axis: bool, seed: int) -> None:
    parts = [(cout * group, k, group) for cout, k, group in parts]  # cout divisible by group
    model = _mixed(np.random.default_rng(seed), 4, parts, axis=-3 if negative_axis else 1)
    result = bnfold.fold(model)
    assert "BatchNormalization" not in ops(result.model)
    assert ops(result.model) == ["Conv"] * len(parts) + ["Concat"]
    assert [(f.rule, f.producer_op, f.output) for f in result.folded] == [("concat", "Conv", "z")]
    assert_same_outputs(model, result.model, _feeds(model))


def test_shared_producer_is_cloned() -> None:
    extra = [helper.make_node("Relu", ["t0"], ["r"], name="other_user")]
    model = _mixed(np.random.default_rng(2), 4, [(2, 3, 1), (3, 1, 1)], extra=extra, outputs=("z", "r"))
    result = bnfold.fold(model)
    assert ops(result.model).count("Conv") == 3  # conv0 kept for the Relu, a folded clone beside it
    assert "BatchNormalization" not in ops(result.model)
    assert_same_outputs(model, result.model, _feeds(model))


def test_through_layout_ops_and_gemm() -> None:
    """Gemm -> Unsqueeze and MatMul -> Unsqueeze joined along the channel axis."""
    rng = np.random.default_rng(3)
    inits = [tensor("B", rng.standard_normal((6, 3)).astype(np.float32)),
             tensor("W", rng.standard_normal((6, 2)).astype(np.float32)),
             tensor("axes", np.array([2], np.int64)), *_bn_inits(rng, 5)]
    nodes = [helper.make_node("Gemm", ["x", "B"], ["g"], name="fc"),
             helper.make_node("Unsqueeze", ["g", "axes"], ["g3"], name="unsq0"),
             helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"], name="unsq1"),
             helper.make_node("Concat", ["g3", "m3"], ["cat"], name="cat", axis=1),
             helper.make_node("BatchNormalization", ["cat", "gamma", "beta", "mean", "var"], ["z"], name="bn")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert "BatchNormalization" not in ops(result.model)
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((2, 6)).astype(np.float32)})


def test_torch_mixnet_block_both_exporters() -> None:
    torch = pytest.importorskip("torch")
    from nets import export_dynamo, export_keep_bn, randomize_bn

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(8, 4, 3, padding=1, bias=False)
            self.b = torch.nn.Conv2d(8, 4, 5, padding=2, bias=False)
            self.bn = torch.nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bn(torch.cat([self.a(x), self.b(x)], 1))  # the residual Add reads x too

    torch.manual_seed(0)
    module = randomize_bn(Mixed())
    for model in (export_keep_bn(module, (1, 8, 6, 6)), export_dynamo(module, (1, 8, 6, 6))):
        result = bnfold.fold(model)
        assert "BatchNormalization" not in ops(result.model)
        assert [f.rule for f in result.folded] == ["concat"]
        x = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
        assert_same_outputs(model, result.model, {model.graph.input[0].name: x})


# -- refusals ------------------------------------------------------------------------------------------


def test_refuses_input_that_is_not_a_linear_producer() -> None:
    extra_relu = helper.make_node("Relu", ["t1"], ["t1r"], name="act")
    model = _mixed(np.random.default_rng(4), 4, [(2, 3, 1), (3, 1, 1)])
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    cat.input[1] = "t1r"
    model.graph.node.insert(2, extra_relu)
    reason = _skip(model)
    assert "Concat input 1 't1r' comes from Relu 'act', not a linear producer" in reason


def test_refuses_shared_producer_when_cloning_is_off() -> None:
    extra = [helper.make_node("Relu", ["t1"], ["r"], name="other_user")]
    model = _mixed(np.random.default_rng(5), 4, [(2, 3, 1), (3, 1, 1)], extra=extra, outputs=("z", "r"))
    result = bnfold.fold(model, clone=False, check=False)
    assert result.folded == ()
    reason = result.skipped[0].reason
    assert "Concat input 1 't1' cannot take its part" in reason and "also feeds Relu 'other_user'" in reason
    assert "cloning it is turned off" in reason


def test_refuses_concat_on_another_axis() -> None:
    model = _mixed(np.random.default_rng(6), 4, [(3, 3, 1), (3, 1, 1)], axis=2)
    model.graph.node[-1].input[0] = "cat"
    reason = _skip(model)
    assert "it joins along axis 2, not the normalization's channel axis 1" in reason


def test_refuses_concat_output_read_elsewhere() -> None:
    extra = [helper.make_node("Relu", ["cat"], ["r"], name="side")]
    model = _mixed(np.random.default_rng(7), 4, [(2, 3, 1), (3, 1, 1)], extra=extra, outputs=("z", "r"))
    assert "its output 'cat' also feeds Relu 'side'" in _skip(model)


def test_refuses_input_of_unknown_channel_count() -> None:
    model = _mixed(np.random.default_rng(8), 4, [(2, 3, 1), (3, 1, 1)])
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    cat.input.append("side")
    model.graph.input.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, "C", 5, 5]))
    reason = _skip(model)
    assert "the channel count of its input 2 'side' is not known" in reason


def test_refuses_graph_input_with_a_non_identity_part() -> None:
    model = _mixed(np.random.default_rng(9), 4, [(2, 3, 1)])
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    cat.input.append("x")  # x has 4 channels; the BN now needs 6
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    rng = np.random.default_rng(10)
    del model.graph.initializer[-4:]
    model.graph.initializer.extend(_bn_inits(rng, 6))
    assert bn.input[1] == "gamma"
    reason = _skip(model)
    assert "Concat input 1 'x' is a graph input, not a linear producer" in reason


def test_refusal_names_the_value_reader_not_a_castlike() -> None:
    """A producer output read by a CastLike (for its element type only) and by a residual Add: the
    refusal names the Add, what actually needs the unnormalized values."""
    zero = helper.make_node("Constant", [], ["zero"], name="zero", value=helper.make_tensor("", TensorProto.FLOAT,
                                                                                            [], [0.0]))
    extra = [zero, helper.make_node("CastLike", ["zero", "t1"], ["zl"], name="castlike"),
             helper.make_node("Add", ["t1", "zl"], ["res"], name="residual")]
    model = _mixed(np.random.default_rng(11), 4, [(2, 3, 1), (3, 1, 1)], extra=extra, outputs=("z", "res"))
    result = bnfold.fold(model, clone=False, check=False)
    reason = result.skipped[0].reason
    assert "also feeds Add 'residual' and 1 more" in reason and "CastLike" not in reason
