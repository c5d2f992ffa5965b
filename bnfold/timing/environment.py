"""The machine and software a measurement ran on, for the report."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["collect_environment", "cpu_model", "gpu_names"]

logger = logging.getLogger(__name__)


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it, else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin" and shutil.which("sysctl"):
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_names() -> list[str]:
    """NVIDIA GPU names from ``nvidia-smi``, or ``[]`` when it is absent or fails."""
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


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return os.cpu_count()


def collect_environment(measured_providers: list[str]) -> dict[str, object]:
    env: dict[str, object] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": _usable_cpus(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "available_providers": list(ort.get_available_providers()),
        "measured_providers": list(measured_providers),
    }
    if any(p != "CPUExecutionProvider" for p in measured_providers):
        env["gpus"] = gpu_names()
    return env
