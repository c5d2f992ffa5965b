"""Start-up stays cheap: ``bnfold --version`` / ``--help`` and ``import bnfold`` import none of the heavy
libraries (onnx, onnxruntime, numpy, torch, rich); each command imports what it needs when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("onnx", "onnxruntime", "numpy", "torch", "rich", "ml_dtypes")

_PROBE = """
import json, sys
sys.argv = ["bnfold", *json.loads(sys.argv[1])]
if sys.argv[1:] == ["<import>"]:
    import bnfold
    bnfold.__version__, bnfold.ExitCode, bnfold.BnfoldError
else:
    import bnfold.cli
    try:
        bnfold.cli.main()
    except SystemExit:
        pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["fold", "--help"], ["<import>"]])
def test_nothing_heavy_is_imported(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                          check=True, timeout=60)
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_public_names_resolve_on_first_use() -> None:
    """Every name in ``bnfold.__all__`` is there, and none is shadowed by a stage package of the same name."""
    import pkgutil

    import bnfold

    for name in bnfold.__all__:
        assert getattr(bnfold, name) is not None, name
    stages = {m.name for m in pkgutil.iter_modules(bnfold.__path__)}
    assert not stages & set(bnfold.__all__), stages & set(bnfold.__all__)
    assert callable(bnfold.fold) and callable(bnfold.verify) and callable(bnfold.latency)
