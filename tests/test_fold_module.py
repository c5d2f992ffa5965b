"""fold_module: an eager nn.Module in, a folded copy out -- and the cases where torch's own utilities
(``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``, ``torch.fx.experimental.optimization.fuse``)
are wrong or refuse, each first shown to be so, then done right (or refused with a reason) by bnfold.

Outputs are compared with the eager module run in float64, by :func:`bnfold.check.compare.compare_arrays`
with the default float32 tolerances.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval  # noqa: E402

import bnfold  # noqa: E402
from bnfold.check.compare import Tolerances, compare_arrays  # noqa: E402

pytestmark = [pytest.mark.torch]

nets = pytest.importorskip("nets")


def fx_fuse(module: nn.Module) -> nn.Module:
    """torch.fx.experimental.optimization.fuse (its import builds TorchScript classes: torch's own warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    return fuse(module)


def run(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(x).float().numpy()


def reference64(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double()).float().numpy()


def matches(module: nn.Module, folded: nn.Module, x: torch.Tensor) -> bool:
    check = compare_arrays("output", reference64(module, x), run(folded, x), Tolerances())
    return check.passed


def bn_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2_block", "decoder_convtranspose", "mlp_bn1d",
                                  "conv1d_net", "conv3d_net"])
def test_folds_every_batch_norm_and_matches(name: str) -> None:
    module, shape = nets.NETS[name]()
    module.train()  # the input's mode and state are left alone
    state = {k: v.clone() for k, v in module.state_dict().items()}
    n_bn = bn_count(module)
    x = nets.example_input(shape, seed=3)
    result = bnfold.fold_module_result(module, x)
    assert (result.bn_before, result.bn_after, len(result.folded), result.skipped) == (n_bn, 0, n_bn, [])
    assert result.comparison is not None and result.comparison.passed
    folded = result.module
    assert type(folded) is type(module) and not folded.training and bn_count(folded) == 0
    assert module.training and bn_count(module) == n_bn
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    assert matches(module.eval(), folded, x)
    assert matches(module, bnfold.fold_module(module, x), nets.example_input(shape, seed=4))
    report = result.to_report()
    assert (report["input"]["format"], report["input"]["batch_norms"], report["output"]["batch_norms"]) == (
        "nn_module", n_bn, 0)
    assert report["verification"]["passed"] and report["exit_code"] == 0


class _Declared(nn.Module):
    """BatchNorm declared before the conv it follows: module order says nothing; the graph does."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.conv = nn.Conv2d(3, 4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))


def test_pairs_come_from_the_graph_not_the_module_order() -> None:
    module = nets.randomize_bn(_Declared(), seed=1)
    x = nets.example_input((2, 3, 6, 6))
    folded = bnfold.fold_module(module)  # convolutions need no example inputs
    assert isinstance(folded.bn, nn.Identity) and folded.conv.bias is not None
    assert matches(module, folded, x)


# ------------------------------------------------------------------ where torch's utilities fail


def test_grouped_conv_transpose() -> None:
    """fuse_conv_bn_eval(transpose=True) raises on groups > 1; fx's fuse does not know ConvTranspose."""
    module = nets.randomize_bn(nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1, dilation=2, bias=False),
        nn.BatchNorm2d(6)), seed=2)
    x = nets.example_input((2, 4, 5, 5))
    with pytest.raises(RuntimeError, match="must match the size"):
        fuse_conv_bn_eval(module[0], module[1], transpose=True)
    assert bn_count(fx_fuse(module)) == 1  # left as it was
    folded = bnfold.fold_module(module)
    assert bn_count(folded) == 0 and matches(module, folded, x)


def test_conv_transpose_3d_and_1d_grouped() -> None:
    module = nets.randomize_bn(nn.Sequential(
        nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), nn.BatchNorm3d(6), nn.Flatten(2),
        nn.ConvTranspose1d(6, 9, 3, groups=3, output_padding=1, stride=2), nn.BatchNorm1d(9)), seed=5)
    x = nets.example_input((2, 4, 2, 3, 3))
    folded = bnfold.fold_module(module, x)
    assert bn_count(folded) == 0 and matches(module, folded, x)


class _TokenLinear(nn.Module):
    """Linear on [N, T, C] feeding BatchNorm1d(T): the BatchNorm normalizes tokens, not features."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def test_linear_on_a_3d_input() -> None:
    module = nets.randomize_bn(_TokenLinear(), seed=3)
    x = nets.example_input((2, 4, 4))
    wrong = fuse_linear_bn_eval(module.lin, module.bn)
    assert not matches(module, nn.Sequential(wrong), x)  # torch folds it, into the wrong axis
    assert not matches(module, fx_fuse(module), x)
    result = bnfold.fold_module_result(module, x)
    assert result.folded == [] and "whose channel axis is 2" in result.skipped[0].reason
    assert result.comparison is not None and result.comparison.passed
    blind = bnfold.fold_module_result(module)  # no example inputs: the rank is unknown, so no fold
    assert blind.folded == [] and "rank of the output of Linear lin is unknown" in blind.skipped[0].reason


def test_batch_norm_without_running_statistics() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(AssertionError, match="must not be None"):
        fuse_conv_bn_eval(module[0], module[1])
    result = bnfold.fold_module_result(module)
    assert result.folded == [] and "no running statistics" in result.skipped[0].reason
    x = nets.example_input((2, 3, 4, 4))
    np.testing.assert_array_equal(run(result.module, x), run(module, x))


class _Reused(nn.Module):
    """One conv called twice, a BatchNorm after one call only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.conv(x)))


class _SharedBn(nn.Module):
    """One BatchNorm after two convs (``half``: the second call follows a ReLU instead)."""

    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.half = half
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        second = torch.relu(self.b(x)) if self.half else self.b(x)
        return self.bn(self.a(x)) + self.bn(second)


def test_module_reused_twice() -> None:
    """fx's fuse folds the BatchNorm into the conv's weights, which its other call also uses."""
    module = nets.randomize_bn(_Reused(), seed=4)
    x = nets.example_input((2, 3, 4, 4))
    assert not matches(module, fx_fuse(copy.deepcopy(module)), x)
    result = bnfold.fold_module_result(module, x)
    assert result.folded == [] and "Conv2d conv is called 2 times" in result.skipped[0].reason
    assert result.comparison is not None and result.comparison.passed


def test_batch_norm_called_twice() -> None:
    """Two calls, each after a conv of its own: both fold. One after a ReLU: the BatchNorm stays, for both."""
    module = nets.randomize_bn(_SharedBn(), seed=4)
    x = nets.example_input((2, 3, 4, 4))
    result = bnfold.fold_module_result(module, x)
    assert (result.bn_before, result.bn_after, len(result.folded)) == (2, 0, 2)
    assert matches(module, result.module, x)
    half = nets.randomize_bn(_SharedBn(half=True), seed=4)
    result = bnfold.fold_module_result(half, x)
    assert result.folded == [] and len(result.skipped) == 2 and result.bn_after == 2
    assert any("not every call can be folded" in s.reason for s in result.skipped)
    assert result.comparison is not None and result.comparison.passed


def test_shared_weight_is_refused() -> None:
    module = nets.randomize_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)), seed=6)
    module[2].weight = module[0].weight  # tied
    result = bnfold.fold_module_result(module)
    assert result.folded == [] and "shared with another module" in result.skipped[0].reason


class _Branchy(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)) if x.shape[1] == 3 else x
        return self.head(y.mean((2, 3)))


def test_untraceable_forward_is_read_through_torch_export() -> None:
    module = nets.randomize_bn(_Branchy(), seed=7)
    x = nets.example_input((2, 3, 6, 6))
    with pytest.raises(bnfold.BadInputError, match="give example_inputs"):
        bnfold.fold_module(module)
    result = bnfold.fold_module_result(module, x)
    assert (result.bn_before, result.bn_after, len(result.folded)) == (2, 0, 2)
    assert result.comparison is not None and result.comparison.passed
    assert matches(module, result.module, nets.example_input((3, 3, 6, 6), seed=1))
