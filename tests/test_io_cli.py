"""Loading, atomic saving, external data, and the command line's contract (exit codes, report)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, make_model, ops, tensor
from onnx import TensorProto, helper

import bnfold
from bnfold.cli.app import main
from bnfold.errors import BadInputError, ExitCode, OutputError


def conv_bn_model(channels: int = 8, size: int = 16, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    inits = [
        tensor("W", rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)),
        tensor("gamma", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
        tensor("beta", rng.standard_normal(channels).astype(np.float32)),
        tensor("mean", rng.standard_normal(channels).astype(np.float32)),
        tensor("var", rng.uniform(0.5, 2, channels).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])],
        inits,
    )
    return model, {"x": rng.standard_normal((1, 3, size, size)).astype(np.float32)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_from_path_bytes_and_proto(tmp_path: Path) -> None:
    model, _ = conv_bn_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (path, str(path), path.read_bytes(), model):
        assert ops(bnfold.fold(source).model) == ["Conv"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"hello, this is text\n", "not an ONNX model"),
        (b"PK\x03\x04rest-of-zip", "zip archive"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not an ONNX model"),
    ],
)
def test_bad_files_are_one_line_bad_input(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        bnfold.fold(path)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        bnfold.fold(tmp_path / "nope.onnx")
    with pytest.raises(BadInputError, match="is a directory"):
        bnfold.fold(tmp_path)


def test_truncated_model(tmp_path: Path) -> None:
    model, _ = conv_bn_model()
    data = model.SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError):
        bnfold.fold(path)


def test_external_data_load_and_save_next_to_output(tmp_path: Path) -> None:
    model, feeds = conv_bn_model(channels=64)
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the proto it is given
    onnx.save(copy, src, save_as_external_data=True, location="m.weights", size_threshold=0)
    before = {p.name: sha(p) for p in src.parent.iterdir()}
    result = bnfold.fold(src)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    bnfold.save(result.model, out, external_data=True)
    written = onnx.load(out, load_external_data=False)
    locations = {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", *locations]
    assert len(locations) == 1 and re.fullmatch(r"folded\.onnx\.[0-9a-f]{8}\.data", locations.pop())
    assert {p.name: sha(p) for p in src.parent.iterdir()} == before
    reloaded = onnx.load(out)
    assert_same_outputs(model, reloaded, feeds)


def test_missing_external_data_is_bad_input(tmp_path: Path) -> None:
    model, _ = conv_bn_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src, save_as_external_data=True, location="m.weights", size_threshold=0)
    (tmp_path / "m.weights").unlink()
    with pytest.raises(BadInputError, match="external data"):
        bnfold.fold(src)


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = conv_bn_model()
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OutputError, match="No space left"):
        bnfold.save(model, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_output_dir_missing(tmp_path: Path) -> None:
    model, _ = conv_bn_model()
    with pytest.raises(OutputError, match="does not exist"):
        bnfold.save(model, tmp_path / "no" / "out.onnx")


# ---- command line -----------------------------------------------------------------------------------

def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_cli_folds_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, feeds = conv_bn_model()
    src, dst, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    digest = sha(src)
    code, out, _ = run_cli([str(src), "-o", str(dst), "--report", str(rep), "--no-verify"], capsys)
    assert code == ExitCode.OK
    assert "folded 1" in out
    assert sha(src) == digest
    report = json.loads(rep.read_text())
    assert report["schema"] == "bnfold.report/1"
    assert report["input"]["batch_norms"] == 1 and report["output"]["batch_norms"] == 0
    assert report["folded"][0]["output"] == "y"
    assert report["output"]["written"] is True
    assert_same_outputs(model, onnx.load(dst), feeds)


def test_cli_output_equal_to_input_is_safe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, feeds = conv_bn_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, _, _ = run_cli([str(src), "-o", str(src), "--no-verify"], capsys)
    assert code == 0
    assert_same_outputs(model, onnx.load(src), feeds)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_cli_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = conv_bn_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, out, _ = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--dry-run", "--no-verify"], capsys)
    assert code == 0 and "nothing written" in out
    assert not (tmp_path / "o.onnx").exists()


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    code, _, err = run_cli([str(bad), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == ExitCode.BAD_INPUT
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, _ = run_cli([str(bad), "--no-such-option"], capsys)
    assert code == ExitCode.USAGE
    model, _ = conv_bn_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "missing" / "o.onnx"), "--no-verify"], capsys)
    assert code == ExitCode.OUTPUT_ERROR and "does not exist" in err
    code, _, _ = run_cli([str(src), "--only", "nonsense"], capsys)
    assert code == ExitCode.USAGE


def test_cli_nothing_to_fold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, out, _ = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--no-verify"], capsys)
    assert code == 0 and "nothing to fold" in out


def test_cli_rules_lists_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    from bnfold.folding.rules import RULES

    code, out, _ = run_cli(["rules"], capsys)
    assert code == 0
    for module in RULES:
        assert module.NAME in out


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and bnfold.__version__ in proc.stdout


def test_cli_onnx_input_with_torchscript_output_is_usage_error(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = conv_bn_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.pt")], capsys)
    assert code == ExitCode.USAGE and "TorchScript output" in err
    assert not (tmp_path / "o.pt").exists()
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.pt2")], capsys)
    assert code == ExitCode.USAGE and "a torch.export output (.pt2) needs a torch.export input" in err
    assert not (tmp_path / "o.pt2").exists()


def test_fold_file_counts_referenced_data_and_reports_what_it_returns(tmp_path: Path) -> None:
    """The library behind `bnfold MODEL -o OUT`: a typed run whose to_report() is the JSON written; the
    input size counts every external data file the model references, whatever its name."""
    from bnfold.pipeline import VerifyOptions, fold_file

    model, _ = conv_bn_model(channels=64)
    src, dst, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    run = fold_file(src, dst, report=rep, verify_options=VerifyOptions(seeds=(0,)))
    assert run.written and run.exit_code == ExitCode.OK and run.comparison is not None and run.comparison.passed
    assert run.input_bytes == src.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    assert json.loads(rep.read_text()) == json.loads(json.dumps(run.to_report()))
    before = src.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    assert fold_file(src, src, verify=False).input_bytes == before  # measured before the input is replaced
