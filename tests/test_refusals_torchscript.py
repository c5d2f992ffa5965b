"""TorchScript refusals (bnfold.torch): every refusal reason has its own module, checked by the reason it gives."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold.torch import (  # noqa: E402
    fold_torchscript,
)

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit.* and the legacy exporter
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

nets = pytest.importorskip("nets")
from conftest import assert_arrays_close  # noqa: E402
from ts_helpers import archive, randomize, to_script  # noqa: E402


class ConvBn(nn.Module):
    def __init__(self, bn: nn.Module, reuse: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bn
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)  # always foldable: shows the refusal is local
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y)
        if self.reuse:
            z = z + y
        return self.bn2(self.conv2(z))


def _refusal(module: nn.Module, how: str) -> tuple[object, nn.Module]:
    scripted = to_script(module, (2, 3, 6, 6), how)
    return fold_torchscript(archive(scripted), shapes=[(2, 3, 6, 6)]), module


@pytest.mark.parametrize("how", ["script", "trace"])
def test_refuses_bn_in_training_mode(how: str) -> None:
    module = randomize(ConvBn(nn.BatchNorm2d(4)))
    module.bn.train()
    result, _ = _refusal(module, how)
    assert (result.bn_before, result.bn_after, len(result.folded)) == (2, 1, 1)
    (skip,) = result.skipped
    assert "training mode" in skip.reason and skip.op_type == "aten::batch_norm"
    assert result.comparison.passed  # both use the batch statistics of the same input


@pytest.mark.parametrize("how", ["script", "trace"])
def test_refuses_bn_without_running_stats(how: str) -> None:
    result, _ = _refusal(randomize(ConvBn(nn.BatchNorm2d(4, track_running_stats=False))), how)
    assert (result.bn_after, len(result.folded)) == (1, 1)
    assert "track_running_stats=False" in result.skipped[0].reason
    assert result.comparison.passed


@pytest.mark.parametrize("how", ["script", "trace"])
def test_refuses_conv_whose_output_is_used_elsewhere(how: str) -> None:
    result, module = _refusal(randomize(ConvBn(nn.BatchNorm2d(4), reuse=True)), how)
    assert (result.bn_after, len(result.folded)) == (1, 1)
    assert "also feeds aten::add" in result.skipped[0].reason
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_arrays_close([module(x).numpy()], [result.module(x).numpy()])


def test_refuses_linear_on_3d_input() -> None:
    """BatchNorm1d on [N, C, L] normalizes axis 1, not a Linear's feature axis (torch.jit.freeze folds it
    anyway and is wrong by O(1) here)."""
    module = randomize(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
    result = fold_torchscript(archive(torch.jit.script(module)), shapes=[(4, 8, 8)])
    assert (result.bn_after, result.folded) == (1, [])
    assert "normalizes axis 1 of the output of aten::linear" in result.skipped[0].reason
    assert result.comparison.passed and result.comparison.worst.max_abs == 0.0


def test_refuses_fp16_overflow() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        module[0].weight.fill_(100.0)
        module[1].weight.fill_(1000.0)
        module[1].running_var.fill_(1e-3)
    module = module.half()
    result = fold_torchscript(archive(torch.jit.script(module)), shapes=[(1, 3, 2, 2)], verify=False)
    assert (result.bn_after, result.folded) == (1, [])
    assert "overflows float16" in result.skipped[0].reason


def test_module_saved_in_training_mode() -> None:
    module = nets.NETS["resnet_basic"]()[0].train()
    data = archive(torch.jit.script(module))
    result = fold_torchscript(data, shapes=[(1, 3, 16, 16)])
    assert (result.bn_before, result.bn_after, result.folded, result.archive) == (6, 6, [], data)
    assert all("saved in training mode" in s.reason and "--eval" in s.reason for s in result.skipped)
    folded = fold_torchscript(data, shapes=[(1, 3, 16, 16)], eval_mode=True)
    assert (folded.bn_after, len(folded.folded), folded.comparison.passed) == (0, 6, True)
