"""torch.export programs (.pt2) in, folded .pt2 or ONNX out; fold_torch on the dynamo exporter.

Each fold is checked by the BatchNorm count, the typed comparison the library returns, and an independent
run of the written archive through plain ``torch.export.load`` against the eager module in float64, judged
by :func:`bnfold.check.compare.compare_arrays` with the default float32 tolerances.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold.check.compare import Tolerances, compare_arrays  # noqa: E402
from bnfold.errors import BadInputError  # noqa: E402
from bnfold.pipeline import VerifyOptions, fold_file  # noqa: E402
from bnfold.torch import (  # noqa: E402
    fold_exported_program,
    fold_torch,
    is_exported_program,
    is_torchscript,
)

pytestmark = [pytest.mark.torch]

nets = pytest.importorskip("nets")

def reference64(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double()).float().numpy()


def export(module: nn.Module, x: torch.Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    with torch.no_grad():
        return torch.export.export(module, (x,), dynamic_shapes=shapes)


def pt2(program: torch.export.ExportedProgram, path: Path) -> Path:
    torch.export.save(program, path)
    return path


def batched(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    return nets.example_input((n, *shape[1:]), seed=seed)


def assert_matches_float64(module: nn.Module, run: object, x: torch.Tensor) -> None:
    with torch.no_grad():
        got = run(x).numpy()  # type: ignore[operator]
    check = compare_arrays("output", reference64(module, x), got, Tolerances())
    assert check.passed, check.message


# ------------------------------------------------------------------------------- .pt2 in, .pt2 out


@pytest.mark.parametrize(
    ("name", "dynamic"),  # the decoder with a dynamic batch goes through the CLI below
    [("resnet_basic", True), ("mobilenetv2_block", True), ("decoder_convtranspose", False)],
)
def test_pt2_folds_every_batch_norm(name: str, dynamic: bool, tmp_path: Path) -> None:
    module, shape = nets.NETS[name]()
    n_bn = nets.count_bn_modules(module)
    x = batched(shape, 2, seed=0)
    src = pt2(export(module, x, dynamic), tmp_path / "m.pt2")
    result = fold_exported_program(src, tmp_path / "f.pt2", seeds=(0, 1))

    assert (result.bn_before, result.bn_after, len(result.folded), result.skipped) == (n_bn, 0, n_bn, [])
    assert result.comparison is not None and result.comparison.passed
    assert result.nodes_after == result.nodes_before - n_bn
    loaded = torch.export.load(tmp_path / "f.pt2")  # what a user does
    assert not [k for k in loaded.state_dict if "running_" in k or "num_batches" in k]
    assert [s.kind for s in loaded.graph_signature.input_specs][-1].name == "USER_INPUT"
    assert_matches_float64(module, loaded.module(), batched(shape, 2, seed=7))
    if dynamic:
        assert any("dynamic dimensions varied" in n for n in result.notes)  # seed 1 ran at batch 3
        assert len(loaded.range_constraints) == 1  # the batch Dim survives
        assert_matches_float64(module, loaded.module(), batched(shape, 5, seed=8))
    else:
        assert not loaded.range_constraints
        with pytest.raises(Exception):  # noqa: B017 - torch's guard error type is not public
            loaded.module()(batched(shape, 5, seed=8))


def test_decomposed_program_folds_convolution_addmm_and_mm() -> None:
    """run_decompositions(): convolution, _native_batch_norm_legit_no_training, addmm and mm (no bias)."""
    module = nets.randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 8),
                      nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6)), seed=4)
    x = nets.example_input((3, 3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own, from run_decompositions
        program = export(module, x, dynamic=True).run_decompositions()
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.convolution.default", "aten.addmm.default", "aten.mm.default",
            "aten._native_batch_norm_legit_no_training.default"} <= ops
    result = fold_exported_program(program, seeds=(0,))
    assert (result.bn_after, [p.producer_op for p in result.folded]) == (0, ["aten::convolution", "aten::addmm",
                                                                             "aten::mm"])
    assert_matches_float64(module, result.program.module(), nets.example_input((4, 3, 6, 6), seed=2))
    assert "aten.addmm.default" in {str(n.target) for n in result.program.graph.nodes}  # mm got the bias


def test_training_mode_is_refused_with_a_reason() -> None:
    module, shape = nets.NETS["decoder_convtranspose"]()
    program = export(copy.deepcopy(module).train(), batched(shape, 2, 0), dynamic=False)
    result = fold_exported_program(program, verify=False)
    assert result.folded == [] and result.bn_after == result.bn_before == len(result.skipped) == 3
    assert all("training mode" in s.reason for s in result.skipped)


class _Shapes(nn.Module):
    """BN on the input; a Linear on [N, T, C] before a BatchNorm1d (normalizes T); a conv read twice
    (padded, so the BatchNorm1d before it does not fold forward into it either)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 4)
        self.bn_seq = nn.BatchNorm1d(4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.bn_conv = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_seq(self.lin(self.bn_in(x)))
        c = self.conv(y)
        return self.bn_conv(c) + c


def test_refusals_name_the_reason() -> None:
    module = nets.randomize_bn(_Shapes(), seed=2)
    program = export(module, nets.example_input((2, 4, 4)), dynamic=False)
    result = fold_exported_program(program, seeds=(0,))
    reasons = {s.output: s.reason for s in result.skipped}
    assert len(reasons) == 3 and result.folded == []
    assert "its input comes from a program input" in reasons["batch_norm"]
    assert "it normalizes axis 1 of %linear, whose channel axis is 2" in reasons["batch_norm_1"]
    assert "output %conv1d of aten::conv1d also feeds add" in reasons["batch_norm_2"]
    assert result.comparison is not None and result.comparison.passed


def test_the_program_given_is_not_modified() -> None:
    module, shape = nets.NETS["decoder_convtranspose"]()
    program = export(module, batched(shape, 2, 0), dynamic=False)
    before = {k: v.clone() for k, v in program.state_dict.items()}
    fold_exported_program(program, verify=False)
    assert program.state_dict.keys() == before.keys()
    assert all(torch.equal(program.state_dict[k], v) for k, v in before.items())


def test_archive_sniffing(tmp_path: Path) -> None:
    module, shape = nets.NETS["decoder_convtranspose"]()
    src = pt2(export(module, batched(shape, 2, 0), dynamic=False), tmp_path / "model.bin")
    assert is_exported_program(src) and is_exported_program(src.read_bytes()) and not is_torchscript(src)
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    assert not is_exported_program(buf.getvalue()) and not is_exported_program(b"not a zip")
    with pytest.raises(BadInputError, match=r"not a torch\.export archive"):
        fold_exported_program(buf.getvalue())


def test_cli_pipeline_pt2_and_onnx(tmp_path: Path) -> None:
    module, shape = nets.NETS["decoder_convtranspose"]()
    n_bn = nets.count_bn_modules(module)
    src = pt2(export(module, batched(shape, 2, 0), dynamic=True), tmp_path / "m.pt2")

    from bnfold.cli.app import main  # bnfold m.pt2 -o f.pt2, as a user types it

    with pytest.raises(SystemExit) as info:
        main([str(src), "-o", str(tmp_path / "f.pt2"), "--seeds", "0,1", "--report", str(tmp_path / "r.json"),
              "--quiet"])
    assert info.value.code in (0, None)
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["input"]["format"], report["input"]["batch_norms"], report["output"]["batch_norms"]) == (
        "exported_program", n_bn, 0)
    assert report["output"]["written"] and report["verification"]["passed"] and report["exit_code"] == 0
    assert_matches_float64(module, torch.export.load(tmp_path / "f.pt2").module(), batched(shape, 3, 1))

    run = fold_file(src, tmp_path / "f.onnx", verify_options=VerifyOptions(seeds=(0,)))
    assert run.input_format == "exported_program" and run.written and run.exit_code == 0
    assert run.torch is not None and run.torch.exporter == "dynamo"  # type: ignore[union-attr]
    assert run.to_report()["export"] == {"exporter": "dynamo", "note": None}
    assert (run.fold.bn_before, run.fold.bn_after) == (n_bn, 0)
    written = onnx.load(str(tmp_path / "f.onnx"))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the dynamic batch is kept
    x = batched(shape, 3, seed=4)
    (got,) = nets.run_onnxruntime(written, {written.graph.input[0].name: x.numpy()})
    check = compare_arrays("output", reference64(module, x), got, Tolerances())
    assert check.passed, check.message


# --------------------------------------------------------------------------- fold_torch on dynamo


@pytest.mark.parametrize("name", ["mobilenetv2_block"])  # the decoder: the CLI test; more: test_torchscript
def test_fold_torch_dynamo_keeps_and_folds_every_batch_norm(name: str) -> None:
    module, shape = nets.NETS[name]()
    n_bn = nets.count_bn_modules(module)
    x = batched(shape, 2, seed=0)
    dims = ({0: torch.export.Dim("batch", min=1, max=64)},)
    result = fold_torch(module, x, exporter="dynamo", dynamic_shapes=dims, seeds=(0,))
    assert result.exporter == "dynamo" and result.exporter_note is None
    assert len(nets.bn_nodes(result.exported)) == n_bn  # optimize=False kept every BatchNormalization
    bn_folds = [p for p in result.folded if p.norm_op == "BatchNormalization"]  # besides computed constants
    assert (result.fold.bn_before, result.fold.bn_after, len(bn_folds)) == (n_bn, 0, n_bn)
    assert result.comparison is not None and result.comparison.passed
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic_shapes passed through
    x5 = batched(shape, 5, seed=3)
    (got,) = nets.run_onnxruntime(result.model, {result.model.graph.input[0].name: x5.numpy()})
    check = compare_arrays("output", reference64(module, x5), got, Tolerances())
    assert check.passed, check.message


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export refuses it, the legacy tracer follows one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if float(y.sum()) > -1e30:
            return y
        return -y


def test_fold_torch_falls_back_to_the_legacy_exporter() -> None:
    module = nets.randomize_bn(_DataDependent(), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the tracer's own note on float(tensor)
        result = fold_torch(module, nets.example_input((1, 3, 8, 8)))
    assert result.exporter == "legacy" and result.exporter_note and "dynamo" in result.exporter_note
    assert (result.fold.bn_before, result.fold.bn_after) == (1, 0)
    assert result.comparison is not None and result.comparison.passed


class _Reuse(nn.Module):
    """One conv called twice (its weight read by two ops); a BatchNorm without running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.no_stats = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.no_stats(self.conv(self.bn(self.conv(x))))


def test_shared_weight_and_missing_statistics_are_refused() -> None:
    module = nets.randomize_bn(_Reuse(), seed=3)
    result = fold_exported_program(export(module, nets.example_input((2, 3, 4, 4)), dynamic=False), seeds=(0,))
    reasons = {s.output: s.reason for s in result.skipped}
    assert result.folded == [] and result.bn_after == 2
    assert "the weight p_conv_weight of %conv2d is shared with another op" in reasons["batch_norm"]
    assert "no running statistics" in reasons["batch_norm_1"]
