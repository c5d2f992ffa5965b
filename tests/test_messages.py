"""Messages and files a user sees (issue 15, items 11 and 12): one escaped line whatever the names,
typed errors for wrong argument types, the user's path on a full disk, modes kept, log-file output."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import onnx
import pytest
from test_io_cli import conv_bn_model

import bnfold
import bnfold.io.store
from bnfold.cli.app import _console, main
from bnfold.errors import ExitCode
from bnfold.messages import one_line


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def model_file(folder: Path, channels: int = 8) -> Path:
    src = folder / "m.onnx"
    onnx.save(conv_bn_model(channels)[0], src)
    return src


def test_newline_in_a_path_stays_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli([str(tmp_path / "a\nb.onnx"), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == ExitCode.BAD_INPUT
    assert err.count("\n") == 1 and "a\\nb.onnx: no such file" in err


def test_undecodable_bytes_of_a_file_name_print_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/m\xff\x1b.onnx")
    code, _, err = run_cli([name, "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == ExitCode.BAD_INPUT
    assert err.isascii() and err.count("\n") == 1 and "m\\xff\\x1b.onnx: no such file" in err


def test_one_line_escapes_control_characters() -> None:
    assert one_line("node 'a\r\nb\tc\x00'") == "node 'a\\r\\nb\\tc\\x00'"


def test_fold_file_wrong_type_names_the_parameter() -> None:
    with pytest.raises(TypeError, match=r"src must be a path .* not int"):
        bnfold.fold_file(123)  # type: ignore[arg-type]


def test_fold_file_wrong_report_type_names_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"report must be a path .* not list"):
        bnfold.fold_file(model_file(tmp_path), report=["r.json"])  # type: ignore[arg-type]


def test_full_disk_while_folding_names_out_not_the_scratch_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src = model_file(tmp_path, channels=16)  # 16 x 3 x 3 x 3 floats: spilled while folding

    def full(f: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bnfold.io.store, "write_all", full)
    out = tmp_path / "o.onnx"
    code, _, err = run_cli([str(src), "-o", str(out), "--no-verify"], capsys)
    assert code == ExitCode.OUTPUT_ERROR
    assert err.strip() == f"bnfold: error: {out}: cannot write (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_replacing_out_keeps_its_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = model_file(tmp_path), tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    os.chmod(out, 0o640)
    code, _, _ = run_cli([str(src), "-o", str(out), "-q", "--no-verify"], capsys)
    assert code == ExitCode.OK
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640


def test_report_gets_ordinary_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, report = model_file(tmp_path), tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        code, _, _ = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "-q", "--report", str(report)], capsys)
    finally:
        os.umask(old)
    assert code == ExitCode.OK
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o644


def test_log_file_tables_take_their_natural_width(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.table import Table

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table()
    table.add_column("model")
    table.add_column("speed-up")
    cell = "x0.992 (0.97-1.01) " + "long/path/" * 12
    table.add_row("a" * 40, cell.strip())
    _console().print(table)
    out = capsys.readouterr().out
    assert any(cell.strip() in line for line in out.splitlines()), out
    assert "\x1b[" not in out  # no colour


def test_report_dash_writes_json_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = model_file(tmp_path)
    code, out, err = run_cli([str(src), "-o", str(tmp_path / "o.onnx"), "--report", "-"], capsys)
    assert code == ExitCode.OK
    report = json.loads(out)
    assert report["schema"] == "bnfold.report/1" and report["output"]["written"] is True
    assert "wrote" in err  # the tables go to standard error
    assert not (tmp_path / "-").exists()
