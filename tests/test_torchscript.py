"""TorchScript in, TorchScript out (bnfold.torch): real architectures fold, inputs, errors, command line.

Every fold is checked three ways: the BatchNorm count, the typed comparison the library returns, and an
independent run of the written archive through plain ``torch.jit.load`` against the eager module in
float64.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold.check import Tolerances  # noqa: E402
from bnfold.errors import BadInputError, MissingDependencyError, VerificationFailedError  # noqa: E402
from bnfold.torch import (  # noqa: E402
    fold_torchscript,
    is_torchscript,
    parse_shapes,
    torchscript_to_onnx,
)

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit.* and the legacy exporter
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

nets = pytest.importorskip("nets")
from conftest import assert_arrays_close  # noqa: E402
from ts_helpers import archive, kinds, randomize, reference64, to_script  # noqa: E402

FOLDABLE = {
    # net: producer ops expected in the folded scripted graph
    "resnet_basic": "aten::conv2d",
    "mlp_bn1d": "aten::linear",
    "token_mlp_bn1d": "aten::linear",  # Linear on [N, T, C] -> transpose(1, 2) -> BatchNorm1d
    "decoder_convtranspose": "aten::conv_transpose2d",  # grouped, bias-free, dilated
    "conv1d_net": "aten::conv1d",
    "conv3d_net": "aten::conv3d",
}


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_folds_every_bn_and_round_trips(name: str, how: str, tmp_path: Path) -> None:
    module, shape = nets.NETS[name]()
    n_bn = nets.count_bn_modules(module)
    src = tmp_path / "model.pt"
    src.write_bytes(archive(to_script(module, shape, how)))
    dst = tmp_path / "folded.pt"

    result = fold_torchscript(src, dst, shapes=[shape])

    assert (result.bn_before, result.bn_after, len(result.folded), result.skipped) == (n_bn, 0, n_bn, [])
    traced_op = "aten::linear" if FOLDABLE[name] == "aten::linear" else "aten::_convolution"
    expected_op = FOLDABLE[name] if how == "script" else traced_op
    assert {(p.producer_op, p.norm_op) for p in result.folded} == {(expected_op, "aten::batch_norm")}
    assert result.comparison is not None and result.comparison.passed
    worst = result.comparison.worst
    assert worst is not None and worst.max_abs is not None and worst.max_abs < 2e-6
    assert result.comparison.providers == ("torch-cpu",)

    # the written file: plain torch.jit.load, no BatchNorm, same function as the eager module (float64)
    assert result.path == str(dst) and dst.read_bytes() == result.archive
    loaded = torch.jit.load(str(dst))
    assert not any("batch_norm" in k for k in kinds(loaded))
    x = nets.example_input(shape, seed=7)
    with torch.no_grad():
        got = loaded(x).double()
    ref = reference64(module, x)
    assert (got - ref).abs().max().item() < 2e-6 * max(1.0, ref.abs().max().item())


def test_grouped_conv_transpose_weights_are_exact() -> None:
    """ConvTranspose weight [C_in, C_out/g, k, k]: the folded weight is the float64 product rounded once."""
    deconv = nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3)
    bn = nn.BatchNorm2d(9)
    module = randomize(nn.Sequential(deconv, bn))
    result = fold_torchscript(archive(torch.jit.script(module)), shapes=[(2, 6, 5, 5)])
    assert result.bn_after == 0 and result.folded[0].rule == "conv_transpose"

    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + float(np.float32(bn.eps)))
    c_in, per_group = deconv.weight.shape[:2]
    w = deconv.weight.double().reshape(3, c_in // 3, per_group, 3, 3)
    expected_w = (w * scale.reshape(3, 1, per_group, 1, 1)).reshape(c_in, per_group, 3, 3).float()
    expected_b = ((deconv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()).float()
    consts = [n.output().toIValue() for n in result.module.graph.nodes() if n.kind() == "prim::Constant"]
    tensors = [t for t in consts if isinstance(t, torch.Tensor)]
    assert any(t.shape == expected_w.shape and torch.equal(t, expected_w) for t in tensors)
    assert any(t.shape == expected_b.shape and torch.equal(t, expected_b) for t in tensors)


def test_conv_bn_bn_chain_and_exported_method() -> None:
    """Conv -> BN -> BN folds to a fixed point; an @torch.jit.export method is kept and folded too."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn1 = nn.BatchNorm2d(8)
            self.bn2 = nn.BatchNorm2d(8, affine=False)  # weight and bias None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn2(self.bn1(self.conv(x)))

        @torch.jit.export
        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn1(self.conv(x)) * 2.0

    module = randomize(Net())
    result = fold_torchscript(archive(torch.jit.script(module)), shapes=[(2, 3, 9, 9)])
    assert (result.bn_before, result.bn_after, len(result.folded)) == (3, 0, 3)
    assert sorted(p.graph for p in result.folded) == ["", "", "features"]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert_arrays_close([module.features(x).numpy(), module(x).numpy()],
                            [result.module.features(x).numpy(), result.module(x).numpy()])


def test_shared_conv_weight_two_bns_and_deterministic_output() -> None:
    """One Conv module called twice, each call followed by its own BatchNorm: two folds, two new weights,
    the shared original untouched; folding twice gives the same bytes."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn_a = nn.BatchNorm2d(4)
            self.bn_b = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.bn_a(self.conv(x)), self.bn_b(self.conv(y))

    module = randomize(Net())
    data = archive(torch.jit.script(module))
    result = fold_torchscript(data, shapes=[(1, 3, 6, 6), (2, 3, 5, 5)])
    assert (result.bn_after, len(result.folded)) == (0, 2)
    assert [o.name for o in result.comparison.runs[0].outputs] == ["output[0]", "output[1]"]
    assert result.comparison.passed and result.comparison.worst.max_abs < 1e-6
    assert fold_torchscript(data, shapes=[(1, 3, 6, 6), (2, 3, 5, 5)]).archive == result.archive


def test_bn_inside_control_flow_folds() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor, flag: bool) -> torch.Tensor:
            if flag:
                return self.bn(self.conv(x))
            return x

    module = randomize(Net())
    result = fold_torchscript(archive(torch.jit.script(module)), verify=False)
    assert result.bn_after == 0 and [p.graph for p in result.folded] == ["/block"]
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert_arrays_close([module(x, True).numpy()], [result.module(x, True).numpy()])


def test_shapes_inferred_named_and_wrong() -> None:
    module, _ = nets.NETS["resnet_basic"]()
    data = archive(torch.jit.script(module))
    inferred = fold_torchscript(data)
    assert inferred.inputs.source == "inferred" and tuple(inferred.inputs.tensors[0].shape) == (2, 3, 32, 32)
    assert inferred.comparison.passed
    named = fold_torchscript(data, shapes={"input": (1, 3, 8, 8)})
    assert tuple(named.inputs.tensors[0].shape) == (1, 3, 8, 8)
    with pytest.raises(BadInputError, match="takes 1 input"):
        fold_torchscript(data, shapes=[(1, 3, 8, 8), (1, 3, 8, 8)])
    with pytest.raises(BadInputError, match="fails on given input shapes"):
        fold_torchscript(data, shapes=[(1, 5, 8, 8)])


def test_uninferable_shapes_need_shape_option() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x * 2.0))

    data = archive(torch.jit.script(randomize(Net())))
    with pytest.raises(BadInputError, match="--shape"):
        fold_torchscript(data)
    assert fold_torchscript(data, verify=False).bn_after == 0  # convolutions fold without a probe


def test_parse_shapes() -> None:
    assert parse_shapes(["1,3,224,224"]) == [(1, 3, 224, 224)]
    assert parse_shapes(["1x3x8x8", "2,4"]) == [(1, 3, 8, 8), (2, 4)]
    assert parse_shapes(["x=1,3,8,8", "y=2"]) == {"x": (1, 3, 8, 8), "y": (2,)}
    with pytest.raises(ValueError, match="none of them"):
        parse_shapes(["x=1,3", "1,3"])
    with pytest.raises(ValueError, match="DIMS"):
        parse_shapes(["a,b"])


def test_failed_verification_writes_nothing(tmp_path: Path) -> None:
    data = archive(torch.jit.script(nets.NETS["resnet_basic"]()[0]))
    dst = tmp_path / "out.pt"
    with pytest.raises(VerificationFailedError, match="nothing written") as info:
        fold_torchscript(data, dst, tolerances=Tolerances(rtol=0.0, atol=0.0))
    assert not dst.exists() and info.value.result.bn_after == 0  # type: ignore[attr-defined]
    forced = fold_torchscript(data, dst, tolerances=Tolerances(rtol=0.0, atol=0.0), force=True)
    assert dst.exists() and not forced.comparison.passed


def test_detects_torchscript_by_content(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    odd = tmp_path / "weights.bin"
    odd.write_bytes(archive(torch.jit.script(module)))
    pickle = tmp_path / "state.pt"
    torch.save(module.state_dict(), pickle)
    other = tmp_path / "m.onnx"
    other.write_bytes(b"\x08\x07" + b"x" * 32)
    assert is_torchscript(odd) and is_torchscript(odd.read_bytes())
    assert not is_torchscript(pickle) and not is_torchscript(other) and not is_torchscript(tmp_path / "none")
    assert fold_torchscript(odd, verify=False).bn_after == 0
    with pytest.raises(BadInputError, match=r"torch.save\(\) pickle"):
        fold_torchscript(pickle)
    with pytest.raises(BadInputError, match="not a zip file"):
        fold_torchscript(other)


def test_without_torch_a_clear_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code = "import sys, bnfold, bnfold.torch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'bnfold\[torch\]'"):
        fold_torchscript(tmp_path / "model.pt")
    with pytest.raises(MissingDependencyError):
        torchscript_to_onnx(tmp_path / "model.pt", [(1, 3, 8, 8)])


def _cli(args: list[str]) -> int:
    from bnfold.cli.app import main

    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def test_cli_dispatches_on_content_and_output_suffix(tmp_path: Path) -> None:
    import json

    module = nets.NETS["decoder_convtranspose"]()[0]
    src = tmp_path / "decoder.model"  # no telling suffix: recognised by content
    src.write_bytes(archive(torch.jit.script(module)))
    report = tmp_path / "r.json"
    assert _cli([str(src), "-o", str(tmp_path / "out.pt"), "--shape", "1,16,6,6", "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert (data["input"]["format"], data["input"]["batch_norms"], data["output"]["batch_norms"]) == (
        "torchscript",
        3,
        0,
    )
    assert data["verification"]["passed"] and data["verification"]["providers"] == ["torch-cpu"]
    assert torch.jit.load(str(tmp_path / "out.pt")) is not None

    assert _cli([str(src), "-o", str(tmp_path / "out.onnx"), "--shape", "input=1,16,6,6", "-q"]) == 0
    assert not nets.bn_nodes(onnx.load(str(tmp_path / "out.onnx")))
    strict = ["--shape", "1,16,6,6", "--atol", "0", "--rtol", "0", "-q"]
    assert _cli([str(src), "-o", str(tmp_path / "strict.pt"), *strict]) == 4  # check failed
    assert not (tmp_path / "strict.pt").exists()
    assert _cli([str(src), "-o", str(tmp_path / "strict.pt"), *strict, "--force"]) == 4
    assert (tmp_path / "strict.pt").exists()
    assert _cli([str(src), "-o", str(tmp_path / "x.pt"), "--shape", "nope=1,2"]) == 3  # bad input
    assert _cli([str(src), "-o", str(tmp_path / "x.pt"), "--shape", "a,b"]) == 2  # usage
