"""Saving a model with external data: an interrupted or crashing save (at each rename) keeps the old output
and the input's data files; reruns write the same bytes; links to the output delete no data.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_faults import (
    _external,
    _set_ref,
    listing,
)
from conftest import ops, run_ort
from test_io_cli import conv_bn_model

import bnfold
from bnfold.errors import OutputError


def test_interrupted_external_data_save_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, _ = conv_bn_model(channels=64, seed=0)
    new, feeds = conv_bn_model(channels=64, seed=1)
    out = tmp_path / "o.onnx"
    bnfold.save(old, out, external_data=True)
    before = listing(tmp_path)
    real_replace = os.replace
    calls: list[object] = []

    def second_rename_interrupted(a: Any, b: Any) -> None:
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", second_rename_interrupted)
    with pytest.raises(KeyboardInterrupt):
        bnfold.save(new, out, external_data=True)
    monkeypatch.undo()
    assert listing(tmp_path) == before, "the previous output (model + data) changed"
    np.testing.assert_array_equal(run_ort(onnx.load(out), feeds)[0], run_ort(old, feeds)[0])


def _content(path: Path) -> bytes:
    """The model at ``path`` with its external data read in: what onnxruntime would compute with."""
    return onnx.load(path).SerializeToString()


def _counting_replace(monkeypatch: pytest.MonkeyPatch, fail_at: int, exc: BaseException) -> list[object]:
    """``os.replace`` that raises ``exc`` on its ``fail_at``-th call (never when 0); returns the calls."""
    real_replace = os.replace
    calls: list[object] = []

    def replace(a: Any, b: Any) -> None:
        calls.append(b)
        if len(calls) == fail_at:
            raise exc
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def _external_at(location: str) -> Callable[[Path], Path]:
    """``_external`` with the data file named ``location``."""
    def build(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        model, _ = conv_bn_model(channels=64)
        onnx.save(model, d / "m.onnx", save_as_external_data=True, location=location, size_threshold=0)
        return d / "m.onnx"

    return build


@pytest.mark.parametrize("location", ["m.onnx.data", "m.weights"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["ctrl-c", "disk-full"])
def test_in_place_external_data_fold_interrupted_at_each_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException, location: str
) -> None:
    """-o equal to an input with external data (named as bnfold once named its outputs' data, or not), a
    failure at every rename in turn: the model at OUT loads and is exactly the old one or the new one,
    never the old graph with new weights; every rename comes before the commit point (the model's own
    rename), so the folder is exactly as it was."""
    build = _external_at(location)
    reference = build(tmp_path / "reference")
    old = _content(reference)
    calls = _counting_replace(monkeypatch, 0, exc)
    bnfold.fold_file(reference, reference, verify=False)
    monkeypatch.undo()
    new = _content(reference)
    assert new != old and calls[-1] == reference, calls  # the model is renamed last
    for fail_at in range(1, len(calls) + 1):
        src = build(tmp_path / f"fail-{fail_at}")
        before = listing(src.parent)
        _counting_replace(monkeypatch, fail_at, exc)
        with pytest.raises(type(exc) if isinstance(exc, KeyboardInterrupt) else OutputError):
            bnfold.fold_file(src, src, verify=False)
        monkeypatch.undo()
        assert _content(src) in (old, new), f"a mix after a failure at rename {fail_at}"
        assert listing(src.parent) == before, f"rename {fail_at} of {len(calls)}"


_CRASH_SCRIPT = """
import os, sys
real_replace, calls, crash_at = os.replace, [], int(sys.argv[1])
def replace(a, b):
    calls.append(b)
    if len(calls) == crash_at:
        os._exit(9)  # a crash: no exception handler, no cleanup
    real_replace(a, b)
    if len(calls) == -crash_at:
        os._exit(9)
os.replace = replace
import bnfold
bnfold.fold_file("m.onnx", "m.onnx", verify=False)
print(len(calls))
"""


def test_in_place_external_data_fold_crashing_at_each_rename(tmp_path: Path) -> None:
    """A real crash (the process ends on the spot) before each rename, and right after the model's:
    the model at OUT loads and is the old one or the new one. Left behind: the staging folder, and a data
    file nobody uses (the new one, which a rerun adopts: same bytes, same name; or, after the commit
    point, the input's old one)."""
    build = _external_at("m.onnx.data")
    reference = build(tmp_path / "reference")
    old = _content(reference)
    done = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, "0"], cwd=reference.parent, capture_output=True,
                          text=True, timeout=120, check=True)
    renames = int(done.stdout)
    new = _content(reference)
    assert new != old
    data = [p.name for p in reference.parent.iterdir() if p.name != "m.onnx"]
    assert len(data) == 1 and data != ["m.onnx.data"]
    for crash_at in [*range(1, renames + 1), -renames]:  # -renames: just after the model's rename
        src = build(tmp_path / f"crash-{crash_at}")
        proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(crash_at)], cwd=src.parent,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 9, proc.stderr
        assert _content(src) == (new if crash_at < 0 else old), f"crash at {crash_at}"
        bnfold.fold_file(src, src, verify=False)  # the rerun: of the fold, or of the folded model (nothing to fold)
        assert _content(src) == new
        visible = sorted(p.name for p in src.parent.iterdir() if not p.name.startswith("."))
        assert visible == sorted(["m.onnx", *data, *(["m.onnx.data"] if crash_at < 0 else [])]), crash_at


def test_rerun_writes_the_same_bytes_and_in_place_leaves_no_stale_data(tmp_path: Path) -> None:
    src = _external(lambda d: None)(tmp_path / "in")
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    bnfold.fold_file(src, out, verify=False)
    first = listing(out.parent)
    bnfold.fold_file(src, out, verify=False)  # same content, same names: the data file is renamed over its twin
    assert listing(out.parent) == first
    data = [name for name in first if name != "o.onnx"]
    assert len(first) == 2 and re.fullmatch(r"o\.onnx\.[0-9a-f]{8}\.data", data[0])
    expected = _content(out)
    bnfold.fold_file(src, src, verify=False)  # in place: the input's old data file goes once nothing uses it
    assert _content(src) == expected
    assert sorted(p.name for p in src.parent.iterdir()) == ["m.onnx", "m" + data[0][1:]]  # the same bytes


def test_replacing_an_output_keeps_data_files_the_input_uses(tmp_path: Path) -> None:
    """OUT's previous model used the input's data file (OUT was a copy of the input) and a file of its own:
    its own goes, the input's stays."""
    src = _external(lambda d: None)(tmp_path)
    out = tmp_path / "o.onnx"
    previous = onnx.load(src, load_external_data=False)
    gamma = next(t for t in previous.graph.initializer if t.name == "gamma")
    (tmp_path / "o.onnx.old.data").write_bytes(onnx.load(src).graph.initializer[1].raw_data)
    _set_ref(previous, "gamma", "location", "o.onnx.old.data")
    _set_ref(previous, "gamma", "offset", "0")
    assert gamma.name == "gamma"
    out.write_bytes(previous.SerializeToString())
    assert _content(out) == _content(src)
    before = listing(tmp_path)
    bnfold.fold_file(src, out, verify=False)
    after = listing(tmp_path)
    assert "o.onnx.old.data" not in after
    assert {k: after[k] for k in ("m.onnx", "m.weights")} == {k: before[k] for k in ("m.onnx", "m.weights")}
    assert ops(onnx.load(out)) == ["Conv"]


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_replacing_a_linked_output_deletes_no_data(tmp_path: Path, link: str) -> None:
    """OUT is another name of a model (a link): replacing the name leaves that model, and its data, whole."""
    other = _external_at("other.onnx.data")(tmp_path / "other")
    out = tmp_path / "other" / "o.onnx"
    if link == "symlink":
        out.symlink_to(other.name)
    else:
        os.link(other, out)
    before = listing(other.parent)
    src = _external(lambda d: None)(tmp_path / "in")
    bnfold.fold_file(src, out, verify=False)
    assert not out.is_symlink() and ops(onnx.load(out)) == ["Conv"]
    after = listing(other.parent)
    assert {k: after[k] for k in ("m.onnx", "other.onnx.data")} == {k: before[k] for k in ("m.onnx", "other.onnx.data")}
    assert ops(onnx.load(other)) == ["Conv", "BatchNormalization"]
