"""The code stays lint-clean and type-checked: ruff and mypy run as part of the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("ruff", ["check", "bnfold", "tests", "benchmarks", "models", "scripts"]),
        ("mypy", ["bnfold", "--ignore-missing-imports"]),
    ],
)
def test_tool_is_clean(tool: str, args: list[str]) -> None:
    if shutil.which(tool) is None and not (Path(sys.executable).parent / tool).exists():
        pytest.fail(f"{tool} is not installed: pip install -e '.[test]'")
    exe = shutil.which(tool) or str(Path(sys.executable).parent / tool)
    proc = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
