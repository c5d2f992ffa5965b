"""Shared helpers of the fault-catalogue tests (README.md, "Exit codes and errors"): run the command line
in-process, snapshot a folder, assert one error line, build a model folder with external data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
from test_io_cli import conv_bn_model

from bnfold.cli.app import fold_cmd, main

# verification runs by default; the catalogue is about input and output, so skip it where it exists
NO_VERIFY = ["--no-verify"] if any(p.name == "no_verify" for p in fold_cmd.params) else []


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return Outcome(int(info.value.code or 0), out, err)


def listing(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its SHA-256: the before/after snapshot."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(folder.rglob("*"))
    }


def assert_one_error_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bnfold: error: "), err
    assert message in lines[0], err
    assert "Traceback" not in err


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def torch_or_skip() -> Any:
    return pytest.importorskip("torch", reason="needs the torch extra")


def _external(edit: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        model, _ = conv_bn_model(channels=64)
        onnx.save(model, d / "m.onnx", save_as_external_data=True, location="m.weights", size_threshold=0)
        edit(d)
        return d / "m.onnx"

    return build


def _set_ref(model: onnx.ModelProto, name: str, key: str, value: str) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    entry = next((e for e in tensor.external_data if e.key == key), None) or tensor.external_data.add()
    entry.key, entry.value = key, value
