"""instance_norm: InstanceNorm with running statistics, in the tiled form torch's exporters write
(Reshape -> BN with statistics tiled over the batch -> Reshape), folded into the preceding linear op."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, make_model, ops, tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold

torch = pytest.importorskip("torch")
nn = torch.nn
from nets import export_dynamo, export_keep_bn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def _with_stats(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return module.eval()


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _folds(model: onnx.ModelProto, rule: str = "instance_norm") -> bnfold.FoldResult:
    assert "BatchNormalization" in ops(model)
    result = bnfold.fold(model)
    assert "BatchNormalization" not in ops(result.model)
    assert [f.rule for f in result.folded] == [rule]
    assert_same_outputs(model, result.model, _feeds(model))
    return result


@settings(max_examples=8)
@given(batch=st.integers(2, 4), c=st.integers(1, 5), affine=st.booleans(), dims=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_torch_instance_norm_legacy_exporter(batch: int, c: int, affine: bool, dims: int, seed: int) -> None:
    conv: Callable[..., nn.Module] = nn.Conv1d if dims == 1 else nn.Conv2d
    norm: Callable[..., nn.Module] = nn.InstanceNorm1d if dims == 1 else nn.InstanceNorm2d
    torch.manual_seed(seed)
    module = _with_stats(nn.Sequential(conv(3, c, 3), norm(c, track_running_stats=True, affine=affine)), seed)
    shape = (batch, 3, 9) if dims == 1 else (batch, 3, 6, 6)
    result = _folds(export_keep_bn(module, shape))
    assert ops(result.model).count("Conv") == 1


def test_torch_instance_norm_dynamo_exporter() -> None:
    torch.manual_seed(1)
    module = _with_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True,
                                                                            affine=True)))
    result = _folds(export_dynamo(module, (2, 3, 6, 6)))
    assert ops(result.model).count("Conv") == 1  # the Shape reads of the Conv output became constants


def test_batch_one_is_the_layout_rule() -> None:
    """With batch 1 the Reshapes keep every axis: the plain layout fold applies."""
    torch.manual_seed(2)
    module = _with_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)))
    _folds(export_keep_bn(module, (1, 3, 6, 6)), rule="layout")


def test_without_running_stats_says_why() -> None:
    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)).eval()
    model = export_keep_bn(module, (2, 3, 6, 6))
    result = bnfold.fold(model)
    assert result.folded == ()
    assert any("computes its statistics from each input at run time" in s.reason for s in result.skipped)


# -- hand-built tiled form: conditions and refusals ------------------------------------------------------


def _tiled(scale_rows: np.ndarray, shift_rows: np.ndarray, *, producer: str = "Conv",
           extra: list[onnx.NodeProto] | None = None, outputs: tuple[str, ...] = ("z",)) -> onnx.ModelProto:
    """x [N, 3, 4, 4] -> Conv (C) -> Reshape [1, N*C, 4, 4] -> BN (per-row stats) -> Reshape back."""
    n, c = scale_rows.shape
    rng = np.random.default_rng(11)
    inits = [tensor("w", rng.standard_normal((c, 3, 1, 1)).astype(np.float32)),
             tensor("merged", np.array([1, n * c, 4, 4], np.int64)),
             tensor("back", np.array([n, c, 4, 4], np.int64)),
             tensor("gamma", scale_rows.reshape(-1).astype(np.float32)),
             tensor("beta", shift_rows.reshape(-1).astype(np.float32)),
             tensor("mean", np.zeros(n * c, np.float32)), tensor("var", np.ones(n * c, np.float32))]
    first = (helper.make_node("Conv", ["x", "w"], ["t"], name="conv") if producer == "Conv"
             else helper.make_node("Relu", ["x"], ["t"], name="act"))
    nodes = [first,
             helper.make_node("Reshape", ["t", "merged"], ["r"], name="merge"),
             helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
             helper.make_node("Reshape", ["y", "back"], ["z"], name="split"), *(extra or [])]
    cin = 3 if producer == "Conv" else c
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, cin, 4, 4])],
                      [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)


def test_hand_built_tiled_form_folds() -> None:
    row = np.array([0.5, 1.5, 2.0])
    model = _tiled(np.tile(row, (3, 1)), np.tile([0.1, -0.2, 0.3], (3, 1)))
    result = _folds(model)
    assert ops(result.model) == ["Conv", "Reshape", "Reshape"]


def test_refuses_statistics_that_differ_between_batch_elements() -> None:
    scale = np.array([[0.5, 1.5], [0.5, 1.25]])
    result = bnfold.fold(_tiled(scale, np.zeros_like(scale)), check=False)
    assert result.folded == ()
    assert "its statistics differ between batch elements" in result.skipped[0].reason


def test_refuses_merged_tensor_read_elsewhere() -> None:
    extra = [helper.make_node("Relu", ["r"], ["side"], name="side_act")]
    rows = np.tile([0.5, 1.5], (2, 1))
    result = bnfold.fold(_tiled(rows, rows, extra=extra, outputs=("z", "side")), check=False)
    assert result.folded == ()
    assert "'r' also feeds Relu 'side_act'" in result.skipped[0].reason


def test_bn_output_read_elsewhere_still_folds() -> None:
    """The BN's output keeps its name and value: a second reader of it is no obstacle."""
    extra = [helper.make_node("Relu", ["y"], ["side"], name="side_act")]
    rows = np.tile([0.5, 1.5], (2, 1))
    model = _tiled(rows, rows, extra=extra, outputs=("z", "side"))
    _folds(model)


def test_refuses_non_linear_producer() -> None:
    rows = np.tile([0.5, 1.5], (2, 1))
    result = bnfold.fold(_tiled(rows, rows, producer="Relu"), check=False)
    assert result.folded == ()
    assert "its input 't' comes from Relu 'act', not a linear producer" in result.skipped[0].reason
