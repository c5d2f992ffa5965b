"""The machine and software a run used, captured once in one type for every report: the fold report, a
verification (:class:`bnfold.check.Comparison`) and a latency measurement (:class:`bnfold.timing.LatencyReport`).

An :class:`Environment` is also a read-only mapping of its JSON form (``env["onnxruntime"]``), which is
what the latency report held before it was typed.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Environment", "cpu_model", "gpu_names", "usable_cpus"]

logger = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin" and shutil.which("sysctl"):
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_names() -> list[str]:
    """NVIDIA GPU names (with the driver version) from ``nvidia-smi``, or ``[]`` when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        logger.debug("nvidia-smi failed: %s", err)
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        return os.cpu_count()


@dataclass(frozen=True)
class Environment(Mapping[str, object]):
    """Versions, machine and onnxruntime providers, plus the runtime settings of the run it describes."""

    python: str
    platform: str
    machine: str
    onnx: str
    onnxruntime: str
    numpy: str
    available_providers: tuple[str, ...]
    cpu_model: str
    cpu_count: int | None
    cpu_usable: int | None
    gpus: tuple[str, ...] | None = None
    """NVIDIA GPU names; None when not looked up (only for a run on a GPU provider: it costs a subprocess)."""
    graph_optimization_level: str | None = None
    """The run's settings; None (and left out of :meth:`to_dict`) where they do not apply."""
    intra_op_num_threads: int | None = None
    """0: onnxruntime's default."""
    measured_providers: tuple[str, ...] | None = None

    @classmethod
    def capture(
        cls,
        *,
        level: str | None = None,
        threads: int | None = None,
        measured_providers: Sequence[str] | None = None,
        gpus: bool | None = None,
    ) -> Environment:
        """This process's environment. ``gpus``: look up the GPU names (None: when ``measured_providers``
        names a provider other than CPU). onnx and onnxruntime are imported here, not with this module."""
        import numpy
        import onnx
        import onnxruntime

        measured = None if measured_providers is None else tuple(measured_providers)
        if gpus is None:
            gpus = any(p != _CPU for p in measured or ())
        return cls(
            python=platform.python_version(),
            platform=platform.platform(),
            machine=platform.machine(),
            onnx=onnx.__version__,
            onnxruntime=onnxruntime.__version__,
            numpy=numpy.__version__,
            available_providers=tuple(onnxruntime.get_available_providers()),
            cpu_model=cpu_model(),
            cpu_count=os.cpu_count(),
            cpu_usable=usable_cpus(),
            gpus=tuple(gpu_names()) if gpus else None,
            graph_optimization_level=level,
            intra_op_num_threads=threads,
            measured_providers=measured,
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready; the fields that are None (not looked up, not applicable) are left out."""
        out: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    # -- read-only mapping of to_dict() --------------------------------------------------------------
    def __getitem__(self, key: str) -> object:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
