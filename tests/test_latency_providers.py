"""bnfold.timing providers: selection, the run plan, and the CUDA runner's binding on the device (with a
fake session). No timing asserts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime
import pytest
from latency_models import CPU, CUDA

from bnfold.check import runtime
from bnfold.errors import MissingDependencyError
from bnfold.timing import (
    CUDA_UNAVAILABLE_NOTE,
)
from bnfold.timing import measure as measure_mod
from bnfold.timing import providers as prov
from bnfold.timing import session as session_mod


def test_provider_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[str] = []

    def ok(p: str) -> None:
        probed.append(p)

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    assert runtime.resolve_providers(None, ok) == ([CPU], [CUDA_UNAVAILABLE_NOTE])
    assert probed == []
    with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
        runtime.resolve_providers(["cuda"], ok)
    assert runtime.resolve_providers("cpu", ok) == ([CPU], [])

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    assert runtime.resolve_providers("auto", ok) == ([CPU, CUDA], [])
    assert runtime.resolve_providers(["cuda", "CPUExecutionProvider", "cuda"], ok) == ([CUDA, CPU], [])
    chosen, notes = runtime.resolve_providers(None, lambda p: "libcudnn.so.9: cannot open shared object file")
    assert chosen == [CPU] and "libcudnn" in notes[0] and "ran on CPU only" in notes[0]
    with pytest.raises(MissingDependencyError, match="libcudnn"):
        runtime.resolve_providers(["cuda"], lambda p: "libcudnn missing")
    with pytest.raises(ValueError, match="unknown execution provider"):
        runtime.resolve_providers(["gpu"], ok)


def test_plan_configs() -> None:
    cfgs = prov.plan_configs([CPU, CUDA], ["ORT_DISABLE_ALL", "enable_all"], include_copies=True)
    assert [(c.provider, c.level, c.io, c.device) for c in cfgs] == [
        (CPU, "disable_all", "bound", "cpu"),
        (CPU, "enable_all", "bound", "cpu"),
        (CUDA, "disable_all", "bound", "cuda"),
        (CUDA, "disable_all", "copies", "cuda"),
        (CUDA, "enable_all", "bound", "cuda"),
        (CUDA, "enable_all", "copies", "cuda"),
    ]
    assert cfgs[3].label == "CUDA / disable_all / with copies" and cfgs[2].label == "CUDA / disable_all / I/O bound"
    assert [c.io for c in prov.plan_configs([CUDA], ["basic"], io_binding=False)] == ["copies"]
    assert runtime.normalize_level(onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED) == "extended"
    with pytest.raises(ValueError):
        runtime.normalize_level("fast")


class _FakeBinding:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def bind_ortvalue_input(self, name: str, value: Any) -> None:
        self.log.append(("in", name, value))

    def bind_output(self, name: str, device: str, device_id: int) -> None:
        self.log.append(("out", name, device, device_id))

    def synchronize_outputs(self) -> None:
        self.log.append(("sync",))


class _FakeSession:
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def io_binding(self) -> _FakeBinding:
        return _FakeBinding(self.log)

    def get_outputs(self) -> list[Any]:
        return [type("Out", (), {"name": "y"})()]

    def run_with_iobinding(self, binding: _FakeBinding) -> None:
        self.log.append(("run_with_iobinding",))

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> None:
        self.log.append(("run", tuple(names), tuple(feeds)))


def test_cuda_runner_binds_on_device(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, int]] = []

    def fake_from_numpy(array: np.ndarray, device_type: str = "cpu", device_id: int = 0) -> str:
        made.append((device_type, device_id))
        return f"ortvalue@{device_type}:{device_id}"

    monkeypatch.setattr(onnxruntime.OrtValue, "ortvalue_from_numpy", staticmethod(fake_from_numpy))
    feeds = {"x": np.zeros((1, 3), np.float32)}
    bound_cfg, copies_cfg = prov.plan_configs([CUDA], ["enable_all"], include_copies=True, device_id=1)
    session = _FakeSession()
    runner = measure_mod.make_runner(session, feeds, bound_cfg)  # type: ignore[arg-type]
    runner()
    assert made == [("cuda", 1)]
    assert session.log == [
        ("in", "x", "ortvalue@cuda:1"),
        ("out", "y", "cuda", 1),
        ("run_with_iobinding",),
        ("sync",),
    ]
    session = _FakeSession()
    measure_mod.make_runner(session, feeds, copies_cfg)()  # type: ignore[arg-type]
    assert session.log == [("run", ("y",), ("x",))]
    assert runtime.provider_chain(CUDA, session_mod.provider_options(bound_cfg)) == [(CUDA, {"device_id": "1"}), CPU]
