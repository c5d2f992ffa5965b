"""The output side (exit 6, or 130 on Ctrl-C): the input untouched and the output folder exactly as it was
(no partial model, no temporary file); the library raises a typed OutputError.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_faults import (
    NO_VERIFY,
    assert_one_error_line,
    listing,
    run_cli,
    save,
)
from conftest import assert_same_outputs, ops
from test_io_cli import conv_bn_model

import bnfold
from bnfold.errors import BnfoldError, ExitCode, OutputError


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return save(conv_bn_model()[0], tmp_path / "in" / "m.onnx")


def _fail_output(tmp_path: Path, src: Path, out: Path, capsys: pytest.CaptureFixture[str],
                 code: ExitCode, message: str, extra: list[str] | None = None) -> None:
    """Run the CLI expecting ``code``; check one error line, input and output folders unchanged (the
    output folder when it exists and is ours)."""
    folders = {tmp_path / "in"}
    if out.parent.exists() and out.parent.is_relative_to(tmp_path):
        folders.add(out.parent)
    before = {f: listing(f) for f in folders}
    got = run_cli([str(src), "-o", str(out), *NO_VERIFY, *(extra or [])], capsys)
    assert got.code == code, got.err
    if code == ExitCode.INTERRUPTED:
        assert got.err.strip() == "bnfold: interrupted; no partial output was left behind"
    else:
        assert_one_error_line(got.err, message)
    assert {f: listing(f) for f in folders} == before


def test_missing_output_directory(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fail_output(tmp_path, src, tmp_path / "nowhere" / "o.onnx", capsys, ExitCode.OUTPUT_ERROR, "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_output_is_a_directory(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out" / "o.onnx").mkdir(parents=True)
    _fail_output(tmp_path, src, tmp_path / "out" / "o.onnx", capsys, ExitCode.USAGE, "is a directory")


def test_output_under_a_file(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fail_output(tmp_path, src, src / "o.onnx", capsys, ExitCode.OUTPUT_ERROR, "does not exist")


def test_read_only_output_directory(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores directory permissions, so the refusal is simulated where the temporary file is made."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "o.onnx").write_bytes(b"previous output")

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    _fail_output(tmp_path, src, out / "o.onnx", capsys, ExitCode.OUTPUT_ERROR, "Permission denied")


@pytest.mark.skipif(os.access("/sys", os.W_OK) and not Path("/sys").is_mount(), reason="/sys is writable here")
def test_read_only_filesystem(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real read-only place, even for root: sysfs."""
    probe = Path("/sys/bnfold-probe")
    try:
        probe.write_bytes(b"")
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys: nothing to test
        probe.unlink()
        pytest.skip("/sys accepts files here")
    _fail_output(tmp_path, src, Path("/sys/o.onnx"), capsys, ExitCode.OUTPUT_ERROR, "cannot write")
    assert not Path("/sys/o.onnx").exists()
    assert not [p for p in Path("/sys").iterdir() if p.name.startswith(".o.onnx")]


class _BrokenFile:
    """A file object whose write stores half the data, then raises (a disk filling up, a Ctrl-C)."""

    def __init__(self, f: Any, exc: BaseException) -> None:
        self._f, self._exc = f, exc

    def write(self, data: bytes) -> int:
        self._f.write(bytes(data)[: len(data) // 2])
        self._f.flush()
        raise self._exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _BrokenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def break_writes(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make every low-level write fail halfway with ``exc``: ``os.write`` (what the atomic save uses),
    files opened from a descriptor, and the kernel copies (``copy_file_range``, ``sendfile``) used for
    tensor bytes that stay on disk."""
    real_fdopen, real_write = os.fdopen, os.write

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        return _BrokenFile(real_fdopen(fd, *args, **kwargs), exc)

    def write(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise exc

    def copy(*args: Any, **kwargs: Any) -> int:
        raise exc

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(os, "write", write)
    for name in ("copy_file_range", "sendfile"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, copy)


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), ExitCode.OUTPUT_ERROR, "No space left on device"),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, ""),
    ],
    ids=["disk-full", "ctrl-c"],
)
@pytest.mark.parametrize("same_as_input", [False, True], ids=["new-output", "output-is-input"])
def test_failure_during_the_write_leaves_everything_as_it_was(
    tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    exc: BaseException, code: ExitCode, message: str, same_as_input: bool,
) -> None:
    """Full disk or Ctrl-C halfway through writing: the previous output (or the input, when -o is the
    input) is intact and no temporary file is left."""
    if same_as_input:
        out = src
    else:
        out = tmp_path / "out" / "o.onnx"
        out.parent.mkdir()
        out.write_bytes(b"previous output")
    break_writes(monkeypatch, exc)
    _fail_output(tmp_path, src, out, capsys, code, message)


def test_ctrl_c_at_the_rename(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    out.write_bytes(b"previous output")

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    monkeypatch.setattr(os, "rename", interrupted)
    _fail_output(tmp_path, src, out, capsys, ExitCode.INTERRUPTED, "")


def test_output_equal_to_input_replaces_it_atomically(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = onnx.load(src)
    got = run_cli([str(src), "-o", str(src), *NO_VERIFY], capsys)
    assert got.code == ExitCode.OK
    assert ops(onnx.load(src)) == ["Conv"]
    assert sorted(p.name for p in src.parent.iterdir()) == ["m.onnx"]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    assert_same_outputs(model, onnx.load(src), feeds)


def test_unwritable_report_writes_nothing(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    _fail_output(tmp_path, src, tmp_path / "out" / "o.onnx", capsys, ExitCode.OUTPUT_ERROR, "does not exist",
                 extra=["--report", str(tmp_path / "nowhere" / "r.json")])


def test_library_save_errors_are_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = conv_bn_model()
    with pytest.raises(OutputError, match="does not exist"):
        bnfold.save(model, tmp_path / "nowhere" / "o.onnx")
    break_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OutputError, match="No space left") as info:
        bnfold.save(model, tmp_path / "o.onnx")
    assert isinstance(info.value, BnfoldError) and info.value.exit_code == ExitCode.OUTPUT_ERROR
    assert list(tmp_path.iterdir()) == []
