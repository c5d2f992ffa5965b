"""Start-up (issue 15, item 13): ``bnfold --version`` / ``--help`` and ``import bnfold`` load none of
onnx, onnxruntime, numpy, torch, rich. Checked with ``-X importtime`` in a subprocess, never wall time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("onnx", "onnxruntime", "numpy", "torch", "rich")


def imported(args: list[str]) -> set[str]:
    """Top-level packages a fresh interpreter imports for ``python -X importtime ARGS``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env,
                          check=True, timeout=120)
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_cli_flag_imports_nothing_heavy(flag: str) -> None:
    assert not imported(["-m", "bnfold", flag]) & set(HEAVY)


def test_import_bnfold_imports_nothing_heavy() -> None:
    assert not imported(["-c", "import bnfold; bnfold.ExitCode; bnfold.__version__"]) & set(HEAVY)


def test_public_names_load_on_first_use() -> None:
    import bnfold

    assert callable(bnfold.fold) and callable(bnfold.fold_file) and bnfold.Comparison.__name__ == "Comparison"
    assert set(bnfold.__all__) <= set(dir(bnfold))


def test_bnfold_verify_stays_the_function_after_the_subpackage_is_imported() -> None:
    import bnfold
    import bnfold.verify.check  # sets the package attribute to the subpackage, normally

    assert callable(bnfold.verify) and bnfold.verify.__name__ == "verify"
