"""TorchScript parity for the forward folds: BN -> Linear ([N, C] only) and BN -> unpadded convolution,
folded with the ONNX rules' math, verified by bnfold against the original archive; refusals say why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
from nets import randomize_bn  # noqa: E402

from bnfold.torch import fold_torchscript  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit.*
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class _Around(nn.Module):
    """BN0 -> Conv -> BN1: a forward and a backward fold into the same Conv, in two rounds."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(self.bn0(x)))


def _fold(tmp_path: Path, build: Callable[[], nn.Module], shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    module = randomize_bn(build())
    src = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(module), str(src))
    return fold_torchscript(src, tmp_path / "m.folded.pt", shapes=[shape], seeds=[0])  # verified


def test_bn_then_linear(tmp_path: Path) -> None:
    result = _fold(tmp_path, _Head, (4, 8))
    assert [(f.rule, f.producer_op) for f in result.folded] == [("bn_gemm", "aten::linear")]
    assert result.skipped == []


def test_bn_then_unpadded_conv(tmp_path: Path) -> None:
    result = _fold(tmp_path, lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 6, 3, groups=3)), (1, 3, 7, 7))
    assert [(f.rule, f.producer_op) for f in result.folded] == [("bn_conv", "aten::conv2d")]


def test_forward_and_backward_into_one_conv(tmp_path: Path) -> None:
    result = _fold(tmp_path, _Around, (2, 3, 5, 5))
    assert sorted(f.rule for f in result.folded) == ["bn_conv", "conv"]


def test_refuses_padded_conv(tmp_path: Path) -> None:
    result = _fold(tmp_path, lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), (1, 3, 6, 6))
    assert result.folded == []
    assert "pads its input (padding=[1, 1])" in result.skipped[0].reason


def test_refuses_linear_on_tokens(tmp_path: Path) -> None:
    result = _fold(tmp_path, lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Linear(8, 4)), (2, 3, 8))
    assert result.folded == []
    assert "the BatchNorm input's rank is 3, not 2" in result.skipped[0].reason


def test_relu_between_is_named(tmp_path: Path) -> None:
    result = _fold(tmp_path, lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1)), (1, 3, 6, 6))
    assert result.folded == []
    reason = result.skipped[0].reason
    assert "no forward fold either: its output goes to aten::relu" in reason


class _Tokens(nn.Module):
    """LeViT-style: Linear on [B, T, C] tokens, BatchNorm1d over ``flatten(0, 1)``, reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def test_linear_on_tokens_then_flatten_bn(tmp_path: Path) -> None:
    result = _fold(tmp_path, _Tokens, (2, 5, 6))
    assert [(f.rule, f.producer_op) for f in result.folded] == [("linear", "aten::linear")]


class _FlattenMixes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x).flatten(1, 2))


def test_refuses_flatten_that_merges_the_channels(tmp_path: Path) -> None:
    result = _fold(tmp_path, lambda: _FlattenMixes(), (2, 3, 1, 5))
    assert result.folded == []
    assert "merges its channel axis 1 with other axes" in result.skipped[0].reason


def test_scripted_parametrized_weight_norm_gets_a_one_line_cause(tmp_path: Path) -> None:
    """torch scripts a parametrized module but cannot run it: the message says why and what to do."""
    import bnfold.errors

    module = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3)), nn.BatchNorm1d(4)).eval()
    src = tmp_path / "wn.pt"
    torch.jit.save(torch.jit.script(module), str(src))
    with pytest.raises(bnfold.errors.BadInputError) as info:
        fold_torchscript(src, tmp_path / "wn.folded.pt", shapes=[(1, 3, 8)])
    message = str(info.value)
    assert "\n" not in message and "parametrizations" in message and "torch.jit.trace" in message


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # the test's own
@pytest.mark.parametrize("api", ["parametrizations", "legacy_api"])
def test_traced_weight_norm_folds(tmp_path: Path, api: str) -> None:
    wn = nn.utils.parametrizations.weight_norm if api == "parametrizations" else nn.utils.weight_norm
    torch.manual_seed(0)
    module = randomize_bn(nn.Sequential(wn(nn.Conv1d(3, 4, 3)), nn.BatchNorm1d(4)))
    src = tmp_path / "wn.pt"
    torch.jit.save(torch.jit.trace(module, torch.randn(1, 3, 16)), str(src))
    result = fold_torchscript(src, tmp_path / "wn.folded.pt", shapes=[(1, 3, 16)], seeds=[0])
    assert [f.rule for f in result.folded] == ["conv"] and result.skipped == []


class _Mixed(nn.Module):
    """MixNet-style: two convolutions joined by cat, then BN, then a residual Add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(6, 2, 3, padding=1, bias=False)
        self.b = nn.Conv2d(6, 4, 5, padding=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(torch.cat([self.a(x), self.b(x)], 1))


def test_bn_after_cat_folds_into_each_conv(tmp_path: Path) -> None:
    result = _fold(tmp_path, _Mixed, (1, 6, 5, 5))
    assert [(f.rule, f.producer_op) for f in result.folded] == [("concat", "aten::conv2d")]


class _MixedShared(_Mixed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return a.sum() + self.bn(torch.cat([a, self.b(x)], 1))


def test_bn_after_cat_names_the_blocking_input(tmp_path: Path) -> None:
    result = _fold(tmp_path, _MixedShared, (1, 6, 5, 5))
    assert result.folded == []
    assert "cat input 0" in result.skipped[0].reason and "also feeds aten::sum" in result.skipped[0].reason


def test_traced_instance_norm_with_running_stats_folds(tmp_path: Path) -> None:
    """``aten::instance_norm`` with running statistics in eval is the same per-channel map as a BatchNorm."""
    from test_rule_instance_norm import _with_stats

    torch.manual_seed(0)
    module = _with_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True,
                                                                             affine=True)))
    src = tmp_path / "in.pt"
    torch.jit.save(torch.jit.trace(module, torch.randn(2, 3, 8, 8)), str(src))
    result = fold_torchscript(src, tmp_path / "in.folded.pt", shapes=[(2, 3, 8, 8)], seeds=[0])
    assert [(f.rule, f.norm_op) for f in result.folded] == [("conv", "aten::instance_norm")]
    assert (result.bn_before, result.bn_after) == (1, 0)


def test_instance_norm_without_running_stats_is_reported(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)).eval()
    src = tmp_path / "in.pt"
    torch.jit.save(torch.jit.trace(module, torch.randn(2, 3, 8, 8)), str(src))
    result = fold_torchscript(src, tmp_path / "in.folded.pt", shapes=[(2, 3, 8, 8)], seeds=[0])
    assert result.folded == []
    assert "no running statistics (track_running_stats=False)" in result.skipped[0].reason
