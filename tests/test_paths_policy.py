"""The path policy (bnfold/paths.py): what a run may read and write, refused before anything happens.

Probes of issue 15, items 1-8 and 10: outputs over a file the input reads, report equal to OUT, FIFOs
and devices as OUT or input, a tensor with its data in two fields, the report written before OUT is
committed, long names, negative and huge declared inputs.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_io_cli import conv_bn_model

from bnfold.cli.app import main
from bnfold.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def one_error(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: ") and message in lines[0], err


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<other>"
            for p in sorted(folder.rglob("*"))}


def external_model(folder: Path) -> Path:
    """A Conv + BN model whose weights live in ``m.weights`` beside it."""
    model, _ = conv_bn_model()
    src = folder / "m.onnx"
    onnx.save(copy.deepcopy(model), src, save_as_external_data=True, location="m.weights", size_threshold=0)
    return src


def inline_model(folder: Path, name: str = "m.onnx") -> Path:
    src = folder / name
    onnx.save(conv_bn_model()[0], src)
    return src


def test_report_naming_the_input_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(src), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "a file the input reads")
    assert snapshot(tmp_path) == before


def test_report_naming_the_inputs_external_data_is_refused(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "m.weights"),
                            "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "m.weights, a file the input reads")
    assert snapshot(tmp_path) == before


def test_report_through_a_link_to_the_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = external_model(tmp_path)
    (tmp_path / "link.json").symlink_to(tmp_path / "m.weights")
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "link.json"),
                            "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "a file the input reads")
    onnx.checker.check_model(onnx.load(src))


def test_output_naming_the_inputs_external_data_is_refused(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "m.weights"), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "a file the input model reads")
    assert snapshot(tmp_path) == before


def test_output_equal_to_the_input_is_still_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    code, _, _ = run_cli([str(src), "-o", str(src), "--no-verify", "-q"], capsys)
    assert code == ExitCode.OK
    assert [n.op_type for n in onnx.load(src).graph.node] == ["Conv"]


def test_report_equal_to_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    out = tmp_path / "o.onnx"
    code, _, err = run_cli([str(src), "-o", str(out), "--report", str(out), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "names the output model")
    assert not out.exists()


def test_report_named_like_an_output_data_file_is_refused(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report",
                            str(tmp_path / "o.onnx.0badcafe.data"), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "a data file of the output model")


def test_output_fifo_is_refused_and_left_a_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    code, _, err = run_cli([str(src), "-o", str(fifo), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_output_link_to_a_character_device_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    link = tmp_path / "null.onnx"
    link.symlink_to(os.devnull)
    code, _, err = run_cli([str(src), "-o", str(link), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "is a character device")
    assert link.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_output_character_device_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    device = tmp_path / "dev.onnx"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    code, _, err = run_cli([str(src), "-o", str(device), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "is a character device")
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_report_fifo_is_refused_before_the_model_is_written(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(fifo), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "is a FIFO")
    assert not (tmp_path / "o.onnx").exists()


def test_report_directory_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    (tmp_path / "r.json").mkdir()
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"),
                            "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "is a directory")


def _two_field_model(elements: int) -> onnx.ModelProto:
    """y = x + B, where B has both raw_data and float_data (they disagree)."""
    values = np.arange(elements, dtype=np.float32)
    b = helper.make_tensor("B", TensorProto.FLOAT, [elements], values.tobytes(), raw=True)
    b.float_data.extend((values + 1).tolist())
    graph = helper.make_graph([helper.make_node("Add", ["x", "B"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [elements])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])], [b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("elements", [16, 4096], ids=["64 B", "16 KiB"])
def test_tensor_with_data_in_two_fields_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     elements: int) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(_two_field_model(elements).SerializeToString())
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--no-verify"], capsys)
    assert code == ExitCode.BAD_INPUT
    one_error(err, "tensor 'B' has its data in more than one field")
    assert not (tmp_path / "o.onnx").exists()


def _full_disk_for_fdopen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file opened from a descriptor (the staged report) fails to write: disk full."""
    real = os.fdopen

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real(fd, *a, **k)))


def test_report_on_a_full_disk_leaves_out_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = inline_model(tmp_path)
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous OUT")
    _full_disk_for_fdopen(monkeypatch)
    code, _, err = run_cli([str(src), "-o", str(out), "--report", str(tmp_path / "r.json"), "--no-verify"], capsys)
    assert code == ExitCode.OUTPUT_ERROR
    one_error(err, "r.json: cannot write the report (No space left on device)")
    assert out.read_bytes() == b"previous OUT"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]


def test_report_and_model_both_written_on_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    code, _, _ = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"), "-q"],
                         capsys)
    assert code == ExitCode.OK
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"]["written"] is True and report["exit_code"] == 0
    assert report["verification"]["passed"] is True


def _subprocess(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def test_fifo_input_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "in.onnx"
    os.mkfifo(fifo)
    done = _subprocess([str(fifo), "-o", str(tmp_path / "o.onnx")], timeout=60)
    assert done.returncode == ExitCode.BAD_INPUT
    one_error(done.stderr, "is a FIFO (named pipe), not a model file")


def test_character_device_input_is_refused_without_reading_it(tmp_path: Path) -> None:
    done = _subprocess(["/dev/zero", "-o", str(tmp_path / "o.onnx")], timeout=60)
    assert done.returncode == ExitCode.BAD_INPUT
    one_error(done.stderr, "/dev/zero: is a character device")


@pytest.mark.parametrize("verb", ["verify", "latency"])
def test_missing_input_of_verify_and_latency_is_one_line_exit_3(tmp_path: Path, verb: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    code, _, err = run_cli([verb, str(src), str(tmp_path / "missing.onnx")], capsys)
    assert code == ExitCode.BAD_INPUT
    one_error(err, "missing.onnx: no such file")


def test_output_name_over_255_bytes_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    out = tmp_path / ("o" * 300 + ".onnx")
    code, _, err = run_cli([str(src), "-o", str(out), "--no-verify"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "file name too long")


def test_output_name_of_250_bytes_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = inline_model(tmp_path)
    out = tmp_path / ("o" * 245 + ".onnx")
    code, _, err = run_cli([str(src), "-o", str(out), "--no-verify", "-q"], capsys)
    assert code == ExitCode.OK, err
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv"]


def test_external_data_location_over_255_bytes_is_bad_input(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = external_model(tmp_path)
    model = onnx.load(src, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "w" * 300
    src.write_bytes(model.SerializeToString())
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--no-verify"], capsys)
    assert code == ExitCode.BAD_INPUT
    one_error(err, "name too long")


def _relu_model(dims: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_negative_input_dim_is_a_dynamic_dim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A negative declared dim (paddle2onnx writes -1) is dynamic: sized like any other (issue 13), never a crash."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for path in (a, b):
        path.write_bytes(_relu_model([1, -3]).SerializeToString())
    code, _, err = run_cli(["verify", str(a), str(b), "-q"], capsys)
    assert code == ExitCode.OK and err == ""


def test_huge_declared_input_is_refused_with_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for path in (a, b):
        path.write_bytes(_relu_model([1 << 20, 1 << 20]).SerializeToString())
    code, _, err = run_cli(["verify", str(a), str(b), "-q"], capsys)
    assert code == ExitCode.BAD_INPUT
    one_error(err, "--shape x=DIMS")
    assert "4,398,046,511,104 bytes" in err


def test_verify_report_naming_a_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = inline_model(tmp_path, "a.onnx"), inline_model(tmp_path, "b.onnx")
    before = snapshot(tmp_path)
    code, _, err = run_cli(["verify", str(a), str(b), "--report", str(b)], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "a file the input reads")
    assert snapshot(tmp_path) == before


def test_latency_report_naming_a_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = inline_model(tmp_path, "a.onnx"), inline_model(tmp_path, "b.onnx")
    before = snapshot(tmp_path)
    code, _, err = run_cli(["latency", str(a), str(b), "--report", str(a), "--runs", "1"], capsys)
    assert code == ExitCode.USAGE
    one_error(err, "a file the input reads")
    assert snapshot(tmp_path) == before


def _torchscript_model(folder: Path) -> Path:
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    path = folder / "m.pt"
    with pytest.warns(DeprecationWarning):  # torch.jit.* is deprecated in this torch
        torch.jit.save(torch.jit.trace(module, torch.randn(1, 3, 8, 8)), str(path))
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_report_on_a_full_disk_leaves_out_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = _torchscript_model(tmp_path)
    out = tmp_path / "o.pt"
    out.write_bytes(b"previous OUT")
    _full_disk_for_fdopen(monkeypatch)
    code, _, err = run_cli([str(src), "-o", str(out), "--report", str(tmp_path / "r.json")], capsys)
    assert code == ExitCode.OUTPUT_ERROR
    one_error(err, "r.json: cannot write the report (No space left on device)")
    assert out.read_bytes() == b"previous OUT"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_output_and_report_written_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _torchscript_model(tmp_path)
    out, rep = tmp_path / "o.pt", tmp_path / "r.json"
    code, _, err = run_cli([str(src), "-o", str(out), "--report", str(rep), "-q"], capsys)
    assert code == ExitCode.OK, err
    import json

    report = json.loads(rep.read_text())
    assert report["output"]["written"] is True and report["output"]["bytes"] == out.stat().st_size
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(rep.stat().st_mode)
