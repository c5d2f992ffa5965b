"""TorchScript refusals for values that are not constants or whose rank is unknown (bnfold/torch/jit_fold.py,
bnfold/torch/producers.py): each module below feeds one BatchNorm or producer argument from the input,
or hides the BatchNorm in a branch the shape probe never runs; the reason names what is not fixed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.torch import fold_torchscript  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit.*
]

nets = pytest.importorskip("nets")
from ts_helpers import archive  # noqa: E402


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 1, 1))
        self.b = nn.Parameter(torch.randn(4))
        self.bn = nn.BatchNorm2d(4)


class TrainingFlagInput(_ConvBn):
    def forward(self, x: torch.Tensor, flag: bool) -> torch.Tensor:
        bn = self.bn
        return F.batch_norm(F.conv2d(x, self.w, self.b), bn.running_mean, bn.running_var, bn.weight, bn.bias, flag)


class EpsInput(_ConvBn):
    def forward(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        bn = self.bn
        return F.batch_norm(F.conv2d(x, self.w, self.b), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            False, 0.1, eps)


class MeanComputed(_ConvBn):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        mean = bn.running_mean + x.mean() * 0.0  # depends on the input: not a constant
        return F.batch_norm(F.conv2d(x, self.w, self.b), mean, bn.running_var, bn.weight, bn.bias)


class WeightComputed(_ConvBn):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        gamma = bn.weight + x.mean() * 0.0
        return F.batch_norm(F.conv2d(x, self.w, self.b), bn.running_mean, bn.running_var, gamma, bn.bias)


class ConvWeightComputed(_ConvBn):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.w + x.mean() * 0.0, self.b))


class ConvBiasComputed(_ConvBn):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.w, self.b + x.mean() * 0.0))


class TransposedFlagInput(_ConvBn):
    def forward(self, x: torch.Tensor, t: bool) -> torch.Tensor:
        y = torch._convolution(x, self.w, self.b, [1, 1], [0, 0], [1, 1], t, [0, 0], 1, False, False, True, True)
        return self.bn(y)


class GroupsComputed(_ConvBn):  # groups matter for a transposed convolution only
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 1.0  # the input's first user is not the convolution (see the xfail below)
        return self.bn(F.conv_transpose2d(y, self.w, self.b, 1, 0, 0, x.size(1) // 3))


class TransposeInUnprobedBranch(_ConvBn):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 1e30):  # never taken on the probe's inputs: the BatchNorm input's rank is unknown
            return self.bn(F.conv2d(x, self.w, self.b).transpose(-1, 1).transpose(-1, 1))
        return x


class LinearInUnprobedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 1e30):
            return self.bn(self.fc(x))
        return x


CASES = [
    (TrainingFlagInput, None, "its training flag is computed at run time, not a constant"),
    (EpsInput, None, "its eps is not a constant"),
    (MeanComputed, None, "its running mean/variance are not constant tensors"),
    (WeightComputed, None, "its weight/bias are not constants"),
    (ConvWeightComputed, None, "the weight of aten::conv2d"),
    (ConvBiasComputed, None, "the bias of aten::conv2d"),
    (TransposedFlagInput, None, "has a non-constant `transposed` flag"),
    (GroupsComputed, [(2, 3, 4, 4)], "has a non-constant `groups`"),
    (TransposeInUnprobedBranch, [(2, 3, 4, 4)], "cannot map its channel axis through aten::transpose"),
    (LinearInUnprobedBranch, [(2, 3)], "so it is not proven that BatchNorm's axis 1 is its feature axis"),
]


@pytest.mark.parametrize(("cls", "shapes", "phrase"), CASES, ids=[c[0].__name__ for c in CASES])
def test_refuses_what_is_not_fixed(cls: type[nn.Module], shapes: list[tuple[int, ...]] | None, phrase: str) -> None:
    result = fold_torchscript(archive(torch.jit.script(cls().eval())), verify=False, shapes=shapes)
    assert not result.folded
    assert len(result.skipped) == 1, result.skipped
    assert phrase in result.skipped[0].reason, result.skipped[0].reason


class ExtraOutputUsed(_ConvBn):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        out, mean, _ = torch.native_batch_norm(F.conv2d(x, self.w, self.b), bn.weight, bn.bias, bn.running_mean,
                                               bn.running_var, False, 0.1, 1e-5)
        return out + mean.sum()


def test_refuses_bn_whose_extra_output_is_used() -> None:
    result = fold_torchscript(archive(torch.jit.script(ExtraOutputUsed().eval())), verify=False)
    assert len(result.skipped) == 1 and "its extra output %" in result.skipped[0].reason


class GroupsComputedOnTheInput(GroupsComputed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv_transpose2d(x, self.w, self.b, 1, 0, 0, x.size(1) // 3))


def test_refuses_non_constant_groups_of_the_first_layer() -> None:
    data = archive(torch.jit.script(GroupsComputedOnTheInput().eval()))
    result = fold_torchscript(data, verify=False, shapes=[(2, 3, 4, 4)])
    assert "has a non-constant `groups`" in result.skipped[0].reason
