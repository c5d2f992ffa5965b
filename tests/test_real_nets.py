"""Real architectures built in code, exported through torch.onnx with BatchNormalization kept, folded:
every BN left is explained, the outputs match the torch module and the original on onnxruntime."""

from __future__ import annotations

import pytest
from conftest import assert_arrays_close, assert_same_outputs, ops

import bnfold

torch = pytest.importorskip("torch")
nets = pytest.importorskip("nets")

# nets whose every BatchNormalization follows a Conv / ConvTranspose / Gemm / MatMul it owns
FULLY_FOLDABLE = [
    "resnet_basic", "resnet_bottleneck", "mobilenetv2_block", "efficientnet_mbconv", "regnet_block",
    "mlp_bn1d", "token_mlp_bn1d", "decoder_convtranspose", "conv1d_net", "conv3d_net",
]


@pytest.mark.parametrize("name", sorted(nets.NETS))
@pytest.mark.parametrize("opset", [11, 17])
def test_exported_net_folds_and_matches(name: str, opset: int) -> None:
    module, shape = nets.NETS[name]()
    model = nets.export_keep_bn(module, shape, opset=opset)
    assert nets.bn_nodes(model), "the export must keep BatchNormalization"
    result = bnfold.fold(model)
    left = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
    assert len(left) == result.bn_after
    assert {s.output for s in result.skipped if s.op_type == "BatchNormalization"} == {n.output[0] for n in left}
    assert all(s.reason for s in result.skipped)
    if name in FULLY_FOLDABLE:
        assert left == [], [s.reason for s in result.skipped]
    x = nets.example_input(shape).numpy()
    feeds = {model.graph.input[0].name: x}
    assert_same_outputs(model, result.model, feeds)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    got = nets.run_onnxruntime(result.model, feeds)[0]
    assert_arrays_close([expected], [got])


def test_shipped_resnet_mini_folds_completely() -> None:
    result = bnfold.fold("models/resnet_mini.onnx")
    assert "BatchNormalization" not in ops(result.model)
    assert result.bn_before == 12 and len(result.folded) == 12
    assert result.nodes_before - result.nodes_after == 12


@pytest.mark.parametrize("name", ["resnet_basic", "mlp_bn1d", "decoder_convtranspose"])
def test_opset7_export_lists_initializers_as_inputs_and_folds_by_default(name: str) -> None:
    """torch writes IR 3 with every initializer listed as a graph input below opset 9: IR < 4 requires the
    listing, so those initializers are constants without a flag."""
    module, shape = nets.NETS[name]()
    model = nets.export_keep_bn(module, shape, opset=7)
    assert model.ir_version == 3
    default = bnfold.fold(model)
    assert default.bn_after == 0 and default.notes and default.notes[-1].startswith("IR version 3: initializers")
    result = bnfold.fold(model, initializers_as_constants=True)
    assert result.bn_after == 0
    x = nets.example_input(shape).numpy()
    assert_same_outputs(model, result.model, {model.graph.input[0].name: x})
    assert bnfold.verify(model, result.model, fold_outputs=result.folded)
