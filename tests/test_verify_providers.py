"""Execution providers for verification: CUDA missing, listed but not starting, or selected."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from verify_models import (
    CPU,
    CUDA,
    FAST,
    _cli,
    two_convs,
)

from bnfold.check import (
    runtime,
    verify,
)
from bnfold.errors import ExitCode, MissingDependencyError


def test_cuda_not_available_says_so_plainly(monkeypatch):
    """Default providers: CPU and a plain note. CUDA named explicitly: an error, as for latency."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    result = verify(*two_convs(), seeds=(0,), **FAST)
    assert result.providers == (CPU,) and result.notes == (runtime.CUDA_UNAVAILABLE_NOTE,)
    with pytest.raises(MissingDependencyError, match=r"CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        verify(*two_convs(), providers=["cpu", "cuda"], seeds=(0,), **FAST)
    cpu_only = verify(*two_convs(), providers=["cpu"], seeds=(0,), **FAST)
    assert cpu_only.notes == ()
    with pytest.raises(ValueError, match="unknown execution provider 'gpu'"):
        verify(*two_convs(), providers=["gpu"], seeds=(0,), **FAST)


def test_cli_provider_errors(tmp_path: Path, monkeypatch, capsys):
    """``--provider`` means the same in verify and latency: missing -> exit 7, unknown name -> exit 2."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    orig, fold = two_convs()
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(orig, a)
    onnx.save(fold, b)
    assert _cli(["verify", str(a), str(b), "-q", "--provider", "cuda"]) == ExitCode.MISSING_DEPENDENCY
    assert "CUDAExecutionProvider is not available" in capsys.readouterr().err
    assert _cli(["verify", str(a), str(b), "-q", "--provider", "gpu"]) == ExitCode.USAGE
    assert "unknown execution provider 'gpu'" in capsys.readouterr().err
    latency_args = ["latency", str(a), str(b), "-q", "--runs", "1", "--rounds", "1", "--shape", "x=1,3,8,8"]
    assert _cli([*latency_args, "--provider", "cuda"]) == ExitCode.MISSING_DEPENDENCY


def test_cuda_listed_but_not_starting_is_left_out(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    real = ort.InferenceSession

    class FallsBack(real):  # what onnxruntime does when the CUDA libraries are missing
        def __init__(self, model, options, providers):
            super().__init__(model, options, providers=[CPU])

    monkeypatch.setattr(runtime.ort, "InferenceSession", FallsBack)
    result = verify(*two_convs(), seeds=(0,), **FAST)
    assert result.passed and result.providers == (CPU,)
    assert result.notes == (
        "CUDA execution provider is installed but a session could not run on it (CUDAExecutionProvider did not "
        "start; onnxruntime fell back to CPUExecutionProvider): ran on CPU only",
    )
    with pytest.raises(MissingDependencyError, match="a session could not run on CUDAExecutionProvider"):
        verify(*two_convs(), providers=["cuda"], seeds=(0,), **FAST)


def test_cuda_selected_when_available(monkeypatch):
    """With a working CUDA provider both providers are checked, each against its own baseline."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    real = ort.InferenceSession
    asked: list[object] = []

    class PretendsCuda(real):
        def __init__(self, model, options, providers):
            asked.append(providers[0])
            super().__init__(model, options, providers=[CPU])
            self._first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]

        def get_providers(self):
            return [self._first, CPU]

    monkeypatch.setattr(runtime.ort, "InferenceSession", PretendsCuda)
    result = verify(*two_convs(broken=1, how="bias"), seeds=(0, 1), **FAST)
    assert result.providers == (CPU, CUDA)
    assert [(r.provider, r.seed) for r in result.runs] == [(CPU, 0), (CPU, 1), (CUDA, 0), (CUDA, 1)]
    assert (CUDA, {"use_tf32": "0"}) in asked and "CUDA checked with use_tf32=0" in result.notes
    assert result.localisation.provider == CPU and result.localisation.first.output == "bn1"
