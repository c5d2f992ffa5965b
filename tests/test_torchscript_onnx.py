"""TorchScript or a torch module in, ONNX out (bnfold.torch): the export keeps inference BatchNorms, the fold
removes them and the written model matches the eager module in float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from bnfold.torch import (  # noqa: E402
    count_batch_norms,
    fold_torch,
    fold_torchscript_to_onnx,
    torchscript_to_onnx,
)

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit.* and the legacy exporter
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

nets = pytest.importorskip("nets")
from ts_helpers import archive, reference64, to_script  # noqa: E402


def test_torchscript_to_onnx_keeps_inference_bn() -> None:
    module, shape = nets.NETS["decoder_convtranspose"]()
    model = torchscript_to_onnx(archive(torch.jit.script(module)), [shape])
    bns = nets.bn_nodes(model)
    assert len(bns) == 3
    for node in bns:
        assert len(node.output) == 1
        assert all(a.name != "training_mode" or a.i == 0 for a in node.attribute)
    assert [i.name for i in model.graph.input] == ["input"]


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_to_folded_onnx(how: str, tmp_path: Path) -> None:
    module, shape = nets.NETS["resnet_basic"]()
    dst = tmp_path / "out.onnx"
    result = fold_torchscript_to_onnx(archive(to_script(module, shape, how)), dst, shapes=[shape])
    assert (result.fold.bn_before, result.fold.bn_after, len(result.folded)) == (6, 0, 6)
    assert result.comparison is not None and result.comparison.passed
    written = onnx.load(str(dst))
    assert not nets.bn_nodes(written)
    x = nets.example_input(shape, seed=5)
    (got,) = nets.run_onnxruntime(written, {"input": x.numpy()})
    ref = reference64(module, x).numpy()
    assert np.abs(got - ref).max() < 2e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", ["conv1d_net", "mlp_bn1d", "decoder_convtranspose"])
def test_fold_torch_one_call(name: str, tmp_path: Path) -> None:
    """nn.Module -> ONNX (BatchNormalization kept) -> Conv / Gemm+MatMul / grouped ConvTranspose folds."""
    module, shape = nets.NETS[name]()
    n_bn = nets.count_bn_modules(module)
    x = nets.example_input(shape)
    result = fold_torch(module, x, tmp_path / "m.onnx")
    assert isinstance(result.model, onnx.ModelProto) and result.path == str(tmp_path / "m.onnx")
    assert (result.fold.bn_before, result.fold.bn_after, len(result.folded)) == (n_bn, 0, n_bn)
    assert result.comparison is not None and result.comparison.passed
    assert len(nets.bn_nodes(result.exported)) == n_bn and not nets.bn_nodes(result.model)
    written = onnx.load(str(tmp_path / "m.onnx"))
    (got,) = nets.run_onnxruntime(written, {"input": x.numpy()})
    ref = reference64(module, x).numpy()
    assert np.abs(got - ref).max() < 2e-6 * max(1.0, np.abs(ref).max())


def test_fold_torch_takes_a_script_module() -> None:
    module, shape = nets.NETS["resnet_basic"]()
    scripted = torch.jit.script(module)
    assert count_batch_norms(scripted) == 6
    assert fold_torch(scripted, nets.example_input(shape), verify=False).fold.bn_after == 0
