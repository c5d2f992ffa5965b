"""Each fold checked alone, used where the whole model cannot run; a fold no check covered is never written
silently (exit 8); and a tolerance that knows the model's own rounding error.

Every model is built in code (tests/dialects.py) and every figure comes from onnxruntime runs of the
original and the folded graphs on the same inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.check import verify
from bnfold.check.per_fold import check_folds
from bnfold.check.sensitivity import FACTOR
from bnfold.cli.app import main
from bnfold.errors import ExitCode
from bnfold.pipeline import fold_file
from tests import dialects


def _save(model: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0), capsys.readouterr().err


def _corrupt(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for t in bad.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), name))
            return bad
    raise KeyError(name)


def _folded_weight(result: bnfold.FoldResult, output: str) -> str:
    node = next(n for n in result.model.graph.node if output in n.output)
    return node.input[1]


def test_each_fold_alone_passes_and_a_wrong_one_fails():
    m = dialects.paddle_detector()
    result = bnfold.fold(m)
    alone = check_folds(m, result.model, result.folded)
    assert alone.passed and alone.summary == "3 of 3 fold(s) verified alone"
    by = {v.output: v for v in alone.verdicts}
    assert by["c1b"].note == "checked within the fold of 'n1', which took it over"  # Conv -> Add -> BN
    assert by["n1"].inputs == (("x", (1, 3, 16, 16)),)  # x's H, W unknown: the subgraph ladder's first size
    assert by["n2"].inputs == (("r1", (1, 4, 16, 16)),)
    worst = by["n2"].worst
    assert worst is not None and worst.max_abs is not None and worst.max_abs < 1e-5 * max(1.0, worst.ref_max_abs)
    bad = check_folds(m, _corrupt(result.model, _folded_weight(result, "n2"), 1.001), result.folded)
    assert not bad.passed and [v.output for v in bad.failed] == ["n2"]
    assert "elements exceed atol" in bad.failed[0].worst.reason


def test_whole_model_unrunnable_is_checked_per_fold_and_written(tmp_path: Path):
    src = _save(dialects.reshape_locked(), tmp_path)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    run = fold_file(src, out, report=report)
    assert run.exit_code == ExitCode.OK and run.written and run.comparison is None
    assert run.whole_model_error.startswith("the original model runs on none of the synthesised inputs")
    assert run.fold_checks() == [{"output": "n", "verified_by": "per fold", "note": ""}]
    data = json.loads(report.read_text())
    assert data["per_fold"]["passed"] is True and data["fold_checks"][0]["verified_by"] == "per fold"
    assert data["exit_code"] == 0
    # the folded model really computes the same: checked at the one size the model accepts
    assert verify(src, out, shapes={"x": (1, 3, 7, 9)}, threads=1).passed


def test_a_fold_no_check_covers_exits_8_and_is_not_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    src = _save(dialects.unknown_rank(), tmp_path)
    out = tmp_path / "o.onnx"
    run = fold_file(src, out)
    assert run.exit_code == ExitCode.UNVERIFIED == 8 and not run.written and not out.exists()
    assert run.fold_checks()[0]["verified_by"] == "none"
    assert "the fold's input 'r': its rank is unknown" in run.check_message
    code, err = _cli([str(src), "-o", str(out), "-q"], capsys)
    assert code == 8 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("bnfold: the whole model was not checked (the original model runs on none")
    assert "0 of 1 fold(s) verified alone; 1 not covered, first 'y'" in line
    assert line.endswith("nothing written (--force writes anyway)")
    code, err = _cli([str(src), "-o", str(out), "-q", "--force"], capsys)
    assert code == 8 and out.exists() and "written anyway (--force)" in err


def test_ill_conditioned_model_passes_on_its_own_rounding_error():
    m = dialects.ill_conditioned()
    result = bnfold.fold(m)
    assert len(result.folded) == 6
    comparison = verify(m, result.model, fold_outputs=result.folded, threads=1)
    assert comparison.passed and comparison.decided_by == "model sensitivity", comparison.summary
    assert comparison.per_fold is not None and comparison.per_fold.passed
    # each fold alone at the shapes the whole-model run used (shape inference from x[1,8,32,32])
    assert all(v.inputs[0][1] == (1, 8, 32, 32) for v in comparison.per_fold.verdicts)
    assert comparison.sensitivity and all(f.name == "y" for f in comparison.sensitivity)
    for f in comparison.sensitivity:  # the table fails by far more than 10x; the model's own spread covers it
        assert f.fold_error > 10 * f.table_allowance and f.fold_error <= FACTOR * f.spread
    assert not any(r.passed for r in comparison.runs)  # every run failed the fixed table
    assert "within the model's own rounding error (decided by model sensitivity)" in comparison.summary
    d = json.loads(json.dumps(comparison.to_dict(), allow_nan=False))
    assert d["decided_by"] == "model sensitivity" and d["sensitivity"][0]["within_model_error"] is True
    assert set(d["sensitivity"][0]) >= {"fold_error", "table_allowance", "rounding_spread", "allowed_by_spread"}


def test_ill_conditioned_model_with_a_wrong_fold_is_never_passed():
    m = dialects.ill_conditioned()
    result = bnfold.fold(m)
    bad = _corrupt(result.model, _folded_weight(result, "a2"), 1.0 + 2e-4)  # small, but outside rounding
    comparison = verify(m, bad, fold_outputs=result.folded, threads=1, seeds=(0,))
    assert not comparison.passed and comparison.decided_by == "dtype table"
    assert comparison.per_fold is not None and [v.output for v in comparison.per_fold.failed] == ["a2"]
