"""torch.export programs fold what the ONNX export of the same module folds (issue 17, parity).

Each pattern is built in code, exported with ``torch.export`` (and, for the program path, also as
``run_decompositions()`` spells it) and to ONNX with :func:`bnfold.torch.fold_torch` (dynamo exporter): the
rules of the folds agree. Each folded program is reloaded from its bytes with plain ``torch.export.load``
and compared with the eager module in float64 by :func:`bnfold.check.compare.compare_arrays`. Each new
refusal is asserted by its reason.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils.parametrizations import weight_norm  # noqa: E402

from bnfold.check.compare import Tolerances, compare_arrays  # noqa: E402
from bnfold.torch import fold_exported_program, fold_torch  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    # torch's own, from the test's exports: its pytree deprecation, and the legacy weight_norm's re-assigned weight
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The tensor attribute self.*was assigned during export:UserWarning"),
]

nets = pytest.importorskip("nets")


class BnLinear(nn.Module):
    """Pooled features -> BatchNorm1d -> Linear head (BNNeck)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 5, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class BnConv(nn.Module):
    def __init__(self, padding: int = 0) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class BnConvBn(nn.Module):
    """BN -> unpadded Conv -> BN: one folds forward, the other backward, into the same weight (two rounds)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0, self.conv, self.bn1 = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(self.bn0(x)))


class MixConv(nn.Module):
    """MixNet-style: two kernel sizes, concatenated, then BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


class WeightNormed(nn.Module):
    def __init__(self, legacy: bool = False, bn: bool = True) -> None:
        super().__init__()
        norm = torch.nn.utils.weight_norm if legacy else weight_norm
        self.conv = norm(nn.Conv2d(4, 6, 3, padding=1))
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class WeightNormedLinear(nn.Module):
    """The older weight_norm API on a Linear (decomposed: a permute of the computed weight feeds addmm)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.utils.weight_norm(nn.Linear(6, 4))
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class TokensFlat(nn.Module):
    """LeViT: Linear on [N, T, C] tokens, BatchNorm1d on flatten(0, 1), reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class TokensTransposed(nn.Module):
    """Linear on [N, T, C] tokens, transposed to [N, C, T] for a BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, int]]] = {
    "bn_linear": (BnLinear, (3, 8), {"bn_gemm": 1}),
    "bn_linear_nobias": (lambda: BnLinear(bias=False), (3, 8), {"bn_gemm": 1}),
    "bn_conv": (BnConv, (2, 4, 7, 7), {"bn_conv": 1}),
    "bn_conv_bn": (BnConvBn, (2, 4, 5, 5), {"bn_conv": 1, "conv": 1}),
    "concat": (MixConv, (2, 4, 6, 6), {"concat": 1}),
    "weight_norm": (WeightNormed, (2, 4, 6, 6), {"const_weights": 1, "conv": 1}),
    "weight_norm_legacy": (lambda: WeightNormed(legacy=True), (2, 4, 6, 6), {"const_weights": 1, "conv": 1}),
    "weight_norm_linear": (WeightNormedLinear, (3, 6), {"const_weights": 1, "linear": 1}),
    "weight_norm_alone": (lambda: WeightNormed(bn=False), (2, 4, 6, 6), {"const_weights": 1}),
    "tokens_flat": (TokensFlat, (2, 5, 4), {"layout": 1}),
    "tokens_transposed": (TokensTransposed, (2, 5, 4), {"layout": 1}),
}


def _build(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy weight_norm's deprecation
        module = make()
    return nets.randomize_bn(module, seed=seed).eval()


def _export(module: nn.Module, x: torch.Tensor, decompose: bool = False) -> torch.export.ExportedProgram:
    with torch.no_grad():
        program = torch.export.export(module, (x,))
    return program.run_decompositions() if decompose else program


_SAME_RULE = {"gemm": "linear", "matmul": "linear"}
"""The ONNX rules for a BatchNorm after a Linear (as Gemm or MatMul) are the torch formats' ``linear``."""


def _rules(folded: object) -> Counter[str]:
    return Counter(_SAME_RULE.get(p.rule, p.rule) for p in folded)  # type: ignore[attr-defined]


def _assert_matches_float64(make: Callable[[], nn.Module], archive: bytes, x: torch.Tensor) -> None:
    reloaded = torch.export.load(io.BytesIO(archive)).module()
    with torch.no_grad():  # a second copy built the same way (a legacy weight-normed module cannot be deep-copied)
        want = _build(make).double()(x.double()).float().numpy()
        got = reloaded(x).numpy()
    check = compare_arrays("output", want, got, Tolerances())
    assert check.passed, check


@pytest.mark.parametrize("name", sorted(CASES))
def test_program_folds_as_the_onnx_export(name: str) -> None:
    make, shape, expected = CASES[name]
    module = _build(make)
    x = nets.example_input(shape, seed=1)
    n_bn = nets.count_bn_modules(module)

    onnx_fold = fold_torch(module, (x,), exporter="dynamo", seeds=(0,))
    assert onnx_fold.exporter == "dynamo"
    assert _rules(onnx_fold.folded) == expected, onnx_fold.skipped

    for decompose in (False, True):
        result = fold_exported_program(_export(module, x, decompose), seeds=(0, 1))
        assert _rules(result.folded) == expected, (decompose, result.skipped)
        assert result.bn_before == n_bn and result.bn_after == 0 and result.skipped == []
        assert result.comparison is not None and result.comparison.passed
        _assert_matches_float64(make, result.archive, x)


def test_weight_norm_leaves_no_run_time_weight() -> None:
    module = _build(WeightNormed)
    result = fold_exported_program(_export(module, nets.example_input((2, 4, 6, 6))), seeds=(0,))
    ops = {str(n.target) for n in result.program.graph.nodes if n.op == "call_function"}
    assert not any("weight_norm" in op for op in ops), ops
    record = result.folded[0]
    assert (record.rule, record.norm_op, record.producer_op) == ("const_weights", "weight normalization",
                                                                  "aten::conv2d")
    assert "conv.weight" in result.program.state_dict
    assert not any("original" in k for k in result.program.state_dict)


def _reason(module: nn.Module, shape: tuple[int, ...]) -> str:
    result = fold_exported_program(_export(module, nets.example_input(shape)), seeds=(0,))
    assert result.comparison is not None and result.comparison.passed
    assert len(result.skipped) == 1 and result.bn_after == 1, result.skipped
    return result.skipped[0].reason


def test_refused_padded_conv_forward() -> None:
    reason = _reason(_build(lambda: BnConv(padding=1)), (2, 4, 7, 7))
    assert "its input comes from a program input" in reason
    assert "it cannot fold into the following aten::conv2d %conv2d: it pads its input (padding=[1, 1])" in reason


def test_refused_linear_forward_on_tokens() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(5), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(x))

    reason = _reason(_build(Tokens), (2, 5, 4))
    assert "aten::linear %linear: that op contracts the last axis, and the BatchNorm input's rank is 3, not 2" in reason


class _CatOf(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(8 if mode != "dim2" else 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        if self.mode == "input":
            return self.bn(torch.cat([a, x], 1))
        if self.mode == "shared":
            return self.bn(torch.cat([a, torch.relu(x)], 1)) + torch.cat([a, a], 1)
        return self.bn(torch.cat([a, a], 2))


def test_refused_concat_of_a_program_input() -> None:
    reason = _reason(_build(lambda: _CatOf("input")), (2, 4, 5, 5))
    assert "it follows aten::cat %cat, and cat input 1 %x cannot take its part: its input comes from a program " \
           "input" in reason


def test_refused_concat_producer_read_elsewhere() -> None:
    reason = _reason(_build(lambda: _CatOf("shared")), (2, 4, 5, 5))
    assert "cat input 0 %conv2d cannot take its part: output %conv2d of aten::conv2d also feeds cat_1" in reason


def test_refused_concat_along_another_axis() -> None:
    reason = _reason(_build(lambda: _CatOf("dim2")), (2, 4, 5, 5))
    assert "it follows aten::cat %cat, which joins along dim 2, not the BatchNorm's channel axis 1" in reason


def test_refused_layout_of_a_conv() -> None:
    class ConvFlat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x).transpose(1, 2).flatten(0, 1))

    reason = _reason(_build(ConvFlat), (2, 4, 5))
    assert "it follows aten::flatten %flatten of %transpose (aten::transpose), not of a Linear, addmm or mm" in reason


def test_refused_layout_when_the_linear_is_read_elsewhere() -> None:
    class Both(TokensFlat):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return self.bn(y.flatten(0, 1)).reshape_as(y) + y

    reason = _reason(_build(Both), (2, 5, 4))
    assert "it follows aten::flatten %flatten, and %linear also feeds add" in reason


def test_refused_layout_wrong_axis() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x).permute(0, 1, 2))

    reason = _reason(_build(Seq), (2, 5, 4))
    assert "which brings axis 1 of %linear to the BatchNorm's axis 1, not its last axis" in reason


def test_forward_fold_float64_math() -> None:
    module = _build(BnLinear)
    x = nets.example_input((4, 8), seed=3)
    result = fold_exported_program(_export(module, x), seeds=(0,))
    state = result.program.state_dict
    bn = module.bn
    scale = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).detach().numpy()
    shift = bn.bias.double().detach().numpy() - bn.running_mean.double().numpy() * scale
    w = module.fc.weight.double().detach().numpy()
    bias = module.fc.bias.double().detach().numpy()
    np.testing.assert_allclose(state["fc.weight"].detach().numpy(), w * scale, rtol=1e-6)
    np.testing.assert_allclose(state["fc.bias"].detach().numpy(), bias + w @ shift, rtol=1e-6)
