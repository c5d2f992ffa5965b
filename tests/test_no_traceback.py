"""Real processes (``python -m bnfold``): bad input and Ctrl-C end in one line on stderr, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from cli_faults import (
    NO_VERIFY,
    assert_one_error_line,
    listing,
    save,
)
from test_io_cli import conv_bn_model

from bnfold.errors import ExitCode


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          check=False, env={**os.environ, "BNFOLD_DEBUG": ""})


def test_subprocess_bad_input_one_line_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "notes.onnx").write_text("just some text\n")
    proc = _run(["-m", "bnfold", "notes.onnx", "-o", "o.onnx"], tmp_path)
    assert proc.returncode == ExitCode.BAD_INPUT
    assert_one_error_line(proc.stderr, "not an ONNX model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.onnx"]


def test_subprocess_ctrl_c_during_the_write(tmp_path: Path) -> None:
    """A real interpreter: Ctrl-C (KeyboardInterrupt) raised inside the write. Exit 130, one line, the
    previous output intact, no temporary file."""
    save(conv_bn_model()[0], tmp_path / "m.onnx")
    (tmp_path / "o.onnx").write_bytes(b"previous output")
    before = listing(tmp_path)
    script = textwrap.dedent(f"""
        import os
        real_write = os.write
        def write(fd, data):
            real_write(fd, bytes(data)[: len(data) // 2])
            raise KeyboardInterrupt
        os.write = write
        from bnfold.cli.app import main
        main(["m.onnx", "-o", "o.onnx", *{NO_VERIFY!r}])
    """)
    proc = _run(["-c", script], tmp_path)
    assert proc.returncode == ExitCode.INTERRUPTED, proc.stderr
    assert proc.stderr.strip() == "bnfold: interrupted; no partial output was left behind"
    assert listing(tmp_path) == before


def test_subprocess_real_sigint_during_the_write(tmp_path: Path) -> None:
    """A real SIGINT delivered while the temporary file is half written (the write is slowed down so the
    signal lands inside it): exit 130, the one line, the previous output intact, no temporary file."""
    save(conv_bn_model()[0], tmp_path / "m.onnx")
    (tmp_path / "o.onnx").write_bytes(b"previous output")
    before = listing(tmp_path)
    script = textwrap.dedent(f"""
        import os, sys, time
        real_write = os.write
        def write(fd, data):
            if fd > 2:
                real_write(fd, bytes(data)[: len(data) // 2])
                sys.stderr.write("WRITING\\n")
                sys.stderr.flush()
                time.sleep(60)
            return real_write(fd, data)
        os.write = write
        from bnfold.cli.app import main
        main(["m.onnx", "-o", "o.onnx", "-q", *{NO_VERIFY!r}])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "BNFOLD_DEBUG": ""})
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert err.strip() == "bnfold: interrupted; no partial output was left behind"
    assert listing(tmp_path) == before
