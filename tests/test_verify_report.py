"""Verification sources, report and command line: paths with external data, bytes, spilled protos, the
JSON report, option parsers, the rendered table, ``bnfold verify`` and the fold's check before writing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from verify_models import (
    CPU,
    FAST,
    PAIRS,
    _cli,
    two_convs,
)

from bnfold.check import (
    parse_range_option,
    parse_shape_option,
    runtime,
    verify,
)
from bnfold.errors import BadInputError


def test_paths_with_external_data_and_bytes(tmp_path: Path):
    orig, fold = two_convs(broken=2, how="axis")
    paths = []
    for name, m in (("orig", orig), ("fold", fold)):
        p = tmp_path / f"{name}.onnx"
        onnx.save_model(m, p, save_as_external_data=True, location=f"{name}.data", size_threshold=0)
        paths.append(p)
    result = verify(*paths, seeds=(0,), fold_outputs=PAIRS, **FAST)
    assert not result and result.localisation.first.output == "bn2"
    orig, fold = two_convs()  # save_model above moved the data of the first pair out of the protos
    assert verify(orig.SerializeToString(), fold.SerializeToString(), seeds=(0,), **FAST).passed
    with pytest.raises(BadInputError, match="no such file"):
        verify(tmp_path / "missing.onnx", paths[1])


def test_protos_over_the_limit_are_spilled_not_serialised(monkeypatch):
    monkeypatch.setattr(runtime, "_PROTO_LIMIT", 500)  # pretend these models are over 2 GB
    monkeypatch.setattr(runtime, "_SPILL_THRESHOLD", 16)
    orig, fold = two_convs(broken=1, how="bias")
    before = orig.SerializeToString()
    result = verify(orig, fold, seeds=(0,), fold_outputs=PAIRS, **FAST)
    assert not result and result.localisation.first.output == "bn1"
    assert orig.SerializeToString() == before  # the caller's model is untouched


def test_to_dict_is_json_and_complete():
    result = verify(*two_convs(broken=2, how="bias"), seeds=(0,), fold_outputs=PAIRS, **FAST)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["passed"] is False and d["seeds"] == [0] and d["providers"] == [CPU]
    assert d["tolerances"]["defaults"]["float32"] == {"rtol": 1e-4, "atol": 1e-5}
    assert d["environment"]["onnxruntime"] == ort.__version__
    assert d["environment"]["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert d["inputs"][0] == {
        "name": "x",
        "dtype": "float32",
        "shape": [1, 3, 32, 32],
        "source": "normal(0, 1)",
        "defaulted_dims": [0, 2, 3],
        "shape_source": "ladder: size 32",
    }
    out = d["runs"][0]["outputs"][0]
    assert set(out) >= {"max_abs", "max_rel", "mean_abs", "p999_abs", "cosine", "needed_atol", "needed_rtol"}
    assert d["localisation"]["first"] == "bn2" and len(d["localisation"]["checks"]) == 2
    assert all(isinstance(v, float) and math.isfinite(v) for v in (out["max_abs"], out["cosine"]))


def test_option_parsers():
    assert parse_shape_option("x=1,3,224,224") == ("x", (1, 3, 224, 224))
    assert parse_shape_option("input:0=1x3x8x8") == ("input:0", (1, 3, 8, 8))
    assert parse_shape_option("batch=4") == ("batch", (4,))
    assert parse_range_option("ids=0,30522") == ("ids", (0, 30522))
    assert parse_range_option("x=-1.5,2") == ("x", (-1.5, 2))
    assert parse_shape_option("1,3,8,8", allow_bare=True) == ("", (1, 3, 8, 8))
    for bad in ("x", "x=", "x=1,a", "=1,2", "1,3"):
        with pytest.raises(ValueError):
            parse_shape_option(bad)
    with pytest.raises(ValueError, match="LO must be below HI"):
        parse_range_option("ids=5,5")


def test_render_comparison():
    from rich.console import Console

    from bnfold.check import render_comparison

    console = Console(record=True, width=120)
    console.print(render_comparison(verify(*two_convs(broken=1, how="bias"), seeds=(0,), fold_outputs=PAIRS, **FAST)))
    text = console.export_text()
    assert "Verification on CPU: FAILED" in text and "FAIL" in text
    assert "first diverging fold: 'bn1' (conv), Conv 'conv1'" in text.replace("\n", " ")


def test_cli_verify_verb(tmp_path: Path, capsys):
    orig, bad = two_convs(broken=2, how="bias")
    _, good = two_convs()
    for name, m in (("a", orig), ("bad", bad), ("good", good)):
        onnx.save(m, tmp_path / f"{name}.onnx")
    a, report = str(tmp_path / "a.onnx"), tmp_path / "r.json"
    assert _cli(["verify", a, str(tmp_path / "bad.onnx"), "--seeds", "3", "--report", str(report), "-q"]) == 4
    err = capsys.readouterr().err
    assert (
        err.startswith("bnfold: verification failed on CPU seed 3, output 'y'") and "first diverging fold: 'bn2'" in err
    )
    data = json.loads(report.read_text())
    assert data["schema"] == "bnfold.verify-report/1" and data["exit_code"] == 4
    assert data["verification"]["seeds"] == [3] and data["verification"]["localisation"]["first"] == "bn2"
    good_args = ["verify", a, str(tmp_path / "good.onnx"), "-q", "--seeds", "0"]
    assert _cli([*good_args, "--shape", "1,3,8,8", "--atol", "1e-4", "--rtol", "0"]) == 0
    assert _cli([*good_args, "--shape", "N=2"]) == 0
    assert _cli([*good_args, "--shape", "z=1"]) == 3  # bad input: names no input
    assert _cli([*good_args, "--seeds", "a"]) == 2  # usage
    assert _cli([*good_args, "--input-range", "x=3,1"]) == 2
    np.savez(tmp_path / "in.npz", x=np.ones((1, 3, 4, 4), np.float32))
    assert _cli([*good_args, "--inputs", str(tmp_path / "in.npz")]) == 0


def test_cli_fold_checks_before_writing(tmp_path: Path, monkeypatch, capsys):
    """The fold verb verifies what the passes return; here they return a broken model on purpose."""
    import bnfold.folding.passes
    from bnfold.folding.passes import FoldedPair, FoldResult

    orig, bad = two_convs(broken=1, how="bias")
    _, good = two_convs()
    src = tmp_path / "m.onnx"
    onnx.save(orig, src)
    returned = {"model": bad}

    def fake_fold(model: object, *_: object, **__: object) -> FoldResult:
        pairs = tuple(FoldedPair("conv", "Conv", f"bn{i}", "BatchNormalization") for i in (1, 2))
        return FoldResult(pairs, (), 6, 4, model=returned["model"])

    monkeypatch.setattr(bnfold.folding.passes, "fold_model", fake_fold)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    base = [str(src), "-o", str(out), "--seeds", "0", "--report", str(report), "-q"]
    assert _cli(base) == 4 and not out.exists()
    assert "first diverging fold: 'bn1'" in capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["exit_code"] == 4 and data["output"]["written"] is False
    assert data["verification"]["passed"] is False and data["verification"]["localisation"]["first"] == "bn1"
    assert _cli([*base, "--force"]) == 4 and out.exists()
    assert "written anyway (--force)" in capsys.readouterr().err
    out.unlink()
    assert _cli([*base, "--no-verify"]) == 0 and out.exists()
    assert json.loads(report.read_text())["verification"] is None
    returned["model"] = good
    assert _cli([*base, "--shape", "x=1,3,8,8"]) == 0
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] is True and data["verification"]["inputs"][0]["shape"] == [1, 3, 8, 8]
