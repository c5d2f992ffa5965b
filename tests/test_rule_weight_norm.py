"""const_weights: weight normalization (both torch APIs, both exporters) and other weights computed from
constants become plain initializers, reported as their own folds, and the BN after them folds as usual.
Numbers are checked against onnxruntime on the unfolded model."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, make_model, ops, tensor
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold
from bnfold.ir import evaluate as const_eval

torch = pytest.importorskip("torch")
nn = torch.nn
from nets import export_dynamo, randomize_bn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")

WN: dict[str, Callable[[nn.Module], nn.Module]] = {
    "parametrizations": torch.nn.utils.parametrizations.weight_norm,
    "legacy_api": torch.nn.utils.weight_norm,
}


def export_legacy(module: nn.Module, shape: tuple[int, ...], *, fold_constants: bool = False) -> onnx.ModelProto:
    """The legacy exporter keeping BN; without its own constant folding it writes ``g * v / ||v||``."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), buf, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=fold_constants,
                          input_names=["input"], output_names=["output"])
    return onnx.load_from_string(buf.getvalue())


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build())


def _check(model: onnx.ModelProto, weights: int, bns_folded: int) -> bnfold.FoldResult:
    assert "ReduceL2" in ops(model)
    result = bnfold.fold(model)
    assert "ReduceL2" not in ops(result.model) and "Div" not in ops(result.model)
    assert "BatchNormalization" not in ops(result.model)
    records = [f for f in result.folded if f.rule == "const_weights"]
    assert len(records) == weights
    assert {f.norm_op for f in records} == {"weight normalization"}
    assert sum(f.norm_op == "BatchNormalization" for f in result.folded) == bns_folded
    assert result.bn_after == 0
    assert_same_outputs(model, result.model, _feeds(model))
    return result


@pytest.mark.parametrize("api", sorted(WN))
@pytest.mark.parametrize("layer", ["conv1d", "conv2d", "convtranspose1d", "linear"])
def test_weight_norm_then_bn_legacy_exporter(api: str, layer: str) -> None:
    wn = WN[api]
    layers: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
        "conv1d": (lambda: nn.Sequential(wn(nn.Conv1d(3, 6, 3)), nn.BatchNorm1d(6)), (2, 3, 16)),
        "conv2d": (lambda: nn.Sequential(wn(nn.Conv2d(3, 6, 3, bias=False)), nn.BatchNorm2d(6)), (1, 3, 8, 8)),
        "convtranspose1d": (lambda: nn.Sequential(wn(nn.ConvTranspose1d(4, 6, 4, stride=2)), nn.BatchNorm1d(6)),
                            (1, 4, 10)),
        "linear": (lambda: nn.Sequential(wn(nn.Linear(5, 7)), nn.BatchNorm1d(7)), (3, 5)),
    }
    build, shape = layers[layer]
    _check(export_legacy(_seeded(build), shape), weights=1, bns_folded=1)


@pytest.mark.parametrize("api", sorted(WN))
def test_weight_norm_then_bn_dynamo_exporter(api: str) -> None:
    wn = WN[api]
    module = _seeded(lambda: nn.Sequential(wn(nn.Conv1d(3, 6, 3)), nn.BatchNorm1d(6), nn.ReLU(),
                                           wn(nn.Linear(14, 4))))
    _check(export_dynamo(module, (2, 3, 16)), weights=2, bns_folded=1)


class _ResBlock(nn.Module):
    """A HiFi-GAN-style residual block: 3 dilated pairs of weight-normed Conv1d, no BN at all."""

    def __init__(self, wn: Callable[[nn.Module], nn.Module], c: int = 4) -> None:
        super().__init__()
        self.c1 = nn.ModuleList(wn(nn.Conv1d(c, c, 3, dilation=d, padding=d)) for d in (1, 3, 5))
        self.c2 = nn.ModuleList(wn(nn.Conv1d(c, c, 3, padding=1)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for a, b in zip(self.c1, self.c2, strict=True):
            x = x + b(nn.functional.leaky_relu(a(nn.functional.leaky_relu(x, 0.1)), 0.1))
        return x


@pytest.mark.parametrize("api", sorted(WN))
def test_weight_norm_without_bn_collapses_to_initializers(api: str) -> None:
    """Every weight-normed layer loses its run-time weight computation even when no BN follows."""
    model = export_legacy(_seeded(lambda: _ResBlock(WN[api])), (1, 4, 32))
    before = ops(model)
    assert before.count("ReduceL2") == 6
    result = _check(model, weights=6, bns_folded=0)
    assert ops(result.model).count("Conv") == 6
    assert result.nodes_after <= result.nodes_before - 18  # ReduceL2, Div, Mul (and Identity) per conv


def test_exporter_constant_folding_leaves_nothing_to_report() -> None:
    """With the legacy exporter's own constant folding the weight is already plain: one BN fold only."""
    module = _seeded(lambda: nn.Sequential(WN["parametrizations"](nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    model = export_legacy(module, (1, 3, 8, 8), fold_constants=True)
    result = bnfold.fold(model)
    assert [f.rule for f in result.folded] == ["conv"]
    assert_same_outputs(model, result.model, _feeds(model))


def test_skip_const_weights_keeps_subgraph_and_still_folds_bn() -> None:
    """--skip const_weights: the weight stays computed, yet the BN rule reads it as the constant it is."""
    module = _seeded(lambda: nn.Sequential(WN["parametrizations"](nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    model = export_legacy(module, (1, 3, 8, 8))
    result = bnfold.fold(model, skip=["const_weights"])
    assert [f.rule for f in result.folded] == ["conv"]
    assert "BatchNormalization" not in ops(result.model)
    assert_same_outputs(model, result.model, _feeds(model))


# -- hand-built graphs: the conditions and each refusal ----------------------------------------------


def _wn_graph(v_source: str = "v", extra_nodes: tuple[onnx.NodeProto, ...] = (), weight_output: bool = False,
              extra_inputs: tuple[onnx.ValueInfoProto, ...] = ()) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [tensor("v", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             tensor("g", rng.uniform(0.5, 2, (4, 1, 1, 1)).astype(np.float32)),
             tensor("axes", np.array([1, 2, 3], np.int64))]
    nodes = [*extra_nodes,
             helper.make_node("ReduceL2", [v_source, "axes"], ["n"], name="norm", keepdims=1),
             helper.make_node("Div", [v_source, "n"], ["d"], name="div"),
             helper.make_node("Mul", ["g", "d"], ["w"], name="mul"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if weight_output:
        outputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]), *extra_inputs],
                      outputs, inits, opset=18)


def test_hand_built_weight_norm_record_and_numbers() -> None:
    model = _wn_graph()
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert [(f.rule, f.producer_op, f.output, f.norm_op) for f in result.folded] == [
        ("const_weights", "Conv", "y", "weight normalization")]
    assert {t.name for t in result.model.graph.initializer} == {"w"}
    assert_same_outputs(model, result.model, _feeds(model))


def test_other_arithmetic_is_a_constant_subgraph() -> None:
    rng = np.random.default_rng(4)
    inits = [tensor("w0", rng.standard_normal((4, 3, 1, 1)).astype(np.float32)),
             tensor("mask", (rng.uniform(size=(4, 3, 1, 1)) > 0.5).astype(np.float32))]
    nodes = [helper.make_node("Mul", ["w0", "mask"], ["w"], name="mask_mul"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert [f.norm_op for f in result.folded] == ["constant subgraph"]
    assert ops(result.model) == ["Conv"]
    assert_same_outputs(model, result.model, _feeds(model))


def test_pure_data_movement_is_left_as_written() -> None:
    """A Reshape'd weight costs nothing at run time: not materialized, nothing reported."""
    rng = np.random.default_rng(5)
    inits = [tensor("w0", rng.standard_normal((4, 3)).astype(np.float32)),
             tensor("shape", np.array([4, 3, 1, 1], np.int64))]
    nodes = [helper.make_node("Reshape", ["w0", "shape"], ["w"], name="reshape"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert result.folded == () and ops(result.model) == ["Reshape", "Conv"]


def test_refuses_weight_from_graph_input() -> None:
    """``v`` fed at run time: nothing is a constant, nothing changes."""
    model = _wn_graph(v_source="vin", extra_inputs=(helper.make_tensor_value_info("vin", TensorProto.FLOAT,
                                                                                  [4, 3, 3, 3]),))
    result = bnfold.fold(model)
    assert result.folded == () and "ReduceL2" in ops(result.model)


def test_refuses_random_op() -> None:
    """A random op is never evaluated: a weight that depends on one stays computed."""
    noise = helper.make_node("RandomNormal", [], ["noise"], name="noise", shape=[4, 3, 3, 3], dtype=1)
    add = helper.make_node("Add", ["v", "noise"], ["vn"], name="add_noise")
    result = bnfold.fold(_wn_graph(v_source="vn", extra_nodes=(noise, add)), check=False)
    assert result.folded == () and "ReduceL2" in ops(result.model)


def test_refuses_weight_that_is_a_graph_output() -> None:
    model = _wn_graph(weight_output=True)
    result = bnfold.fold(model)
    assert result.folded == () and "Mul" in ops(result.model)


def test_refuses_beyond_size_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(const_eval, "MAX_RESULT_BYTES", 64)
    result = bnfold.fold(_wn_graph())
    assert result.folded == () and "ReduceL2" in ops(result.model)


def test_bn_after_refused_weight_names_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(const_eval, "MAX_RESULT_BYTES", 64)
    model = _wn_graph()
    rng = np.random.default_rng(6)
    for name, value in (("gamma", rng.uniform(0.5, 1.5, 4)), ("beta", rng.normal(size=4)),
                        ("mean", rng.normal(size=4)), ("var", rng.uniform(0.5, 2, 4))):
        model.graph.initializer.append(tensor(name, value.astype(np.float32)))
    model.graph.node.append(helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"],
                                             name="bn"))
    model.graph.output[0].name = "z"
    result = bnfold.fold(model, check=False)
    assert len(result.skipped) == 1
    assert "more than the 64 bnfold evaluates at fold time" in result.skipped[0].reason


# -- BN parameters computed from constants (the dynamo exporter's affine=False BN) ------------------------


def test_dynamo_affine_false_bn_folds() -> None:
    """``BatchNorm2d(affine=False)``: dynamo writes the scale as ``Expand(CastLike(1.0), Shape(conv)[1:2])``."""
    module = _seeded(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    model = export_dynamo(module, (1, 3, 8, 8))
    assert "Expand" in ops(model)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert [f.rule for f in result.folded] == ["conv"]
    assert_same_outputs(model, result.model, _feeds(model))


def _expand_scale_model(batch: int | str, channel_dims: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits = [tensor("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32)),
             tensor("one", np.array([1.0], np.float32)),
             tensor("beta", rng.normal(size=4).astype(np.float32)),
             tensor("mean", rng.normal(size=4).astype(np.float32)),
             tensor("var", rng.uniform(0.5, 2, 4).astype(np.float32))]
    shape = helper.make_node("Shape", ["t"], ["c"], name="shape", start=1, end=2) if channel_dims else \
        helper.make_node("Shape", ["t"], ["c"], name="shape", start=0, end=1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), shape,
             helper.make_node("Expand", ["one", "c"], ["gamma"], name="expand"),
             helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, opset=18)


def test_expand_scale_with_dynamic_batch_folds() -> None:
    """Only the channel count is read, and the weight fixes it: a symbolic batch does not matter."""
    model = _expand_scale_model("N")
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 4)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x})


def test_expand_scale_reading_a_dynamic_dimension_is_refused() -> None:
    model = _expand_scale_model("N", channel_dims=False)
    result = bnfold.fold(model, check=False)
    assert result.folded == ()
    assert "BatchNormalization scale 'gamma' is computed at run time by Expand 'expand'" in result.skipped[0].reason


@given(spatial=st.integers(1, 2), cout=st.integers(1, 5), cin=st.integers(1, 3), opset=st.sampled_from([13, 17, 18]),
       dim=st.sampled_from([0, None]), with_bn=st.booleans(), seed=st.integers(0, 2**16))
def test_hand_built_weight_norm_property(spatial: int, cout: int, cin: int, opset: int, dim: int | None,
                                         with_bn: bool, seed: int) -> None:
    """``g * v / ReduceL2(v)`` over the per-output-channel axes (dim=0) or all axes (dim=None), ReduceL2
    with ``axes`` as an attribute (opset < 18) or an input (18), with or without a BN after the Conv."""
    rng = np.random.default_rng(seed)
    k = (3,) * spatial
    v = rng.standard_normal((cout, cin, *k)).astype(np.float32)
    axes = list(range(1, 2 + spatial)) if dim == 0 else list(range(2 + spatial))
    g = rng.uniform(0.5, 2, (cout,) + (1,) * (1 + spatial) if dim == 0 else ()).astype(np.float32)
    inits = [tensor("v", v), tensor("g", g)]
    if opset >= 18:
        inits.append(tensor("axes", np.array(axes, np.int64)))
        norm = helper.make_node("ReduceL2", ["v", "axes"], ["n"], name="norm", keepdims=1)
    else:
        norm = helper.make_node("ReduceL2", ["v"], ["n"], name="norm", keepdims=1, axes=axes)
    nodes = [norm, helper.make_node("Div", ["v", "n"], ["d"], name="div"),
             helper.make_node("Mul", ["g", "d"], ["w"], name="mul"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    out = "y"
    if with_bn:
        for name, value in (("gamma", rng.uniform(0.5, 1.5, cout)), ("beta", rng.normal(size=cout)),
                            ("mean", rng.normal(size=cout)), ("var", rng.uniform(0.5, 2, cout))):
            inits.append(tensor(name, value.astype(np.float32)))
        nodes.append(helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"], name="bn"))
        out = "z"
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *(5,) * spatial])],
                       [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits, opset=opset)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv"]
    assert [f.rule for f in result.folded] == ["const_weights", *(["conv"] if with_bn else [])]
    assert_same_outputs(model, result.model, _feeds(model))
