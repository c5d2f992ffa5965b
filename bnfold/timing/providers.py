"""Execution providers, optimization levels and the list of configurations to measure.

A configuration is provider x optimization level x I/O mode. The I/O modes:

- ``bound``: inputs are OrtValues already on the provider's device and outputs are bound to that device
  with I/O binding, so the time is the model's and not the host<->device copies (on CPU there are none).
- ``copies``: numpy in, numpy out through ``InferenceSession.run``; on a GPU provider the time includes
  the copies. Added as its own, labelled configuration by ``include_copies=True``, or used instead of
  ``bound`` when ``io_binding=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import onnxruntime as ort

from bnfold.errors import MissingDependencyError

__all__ = [
    "CPU",
    "CUDA",
    "CUDA_UNAVAILABLE_NOTE",
    "LEVELS",
    "MeasureConfig",
    "ProviderProbe",
    "available_providers",
    "normalize_level",
    "normalize_provider",
    "plan_configs",
    "resolve_providers",
    "short_provider",
]

logger = logging.getLogger(__name__)

ProviderProbe = Callable[[str], "str | None"]
"""``probe(provider) -> None`` when a session really runs on ``provider``, else a one-line reason."""

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CUDA_UNAVAILABLE_NOTE = (
    "CUDA execution provider not available (onnxruntime-gpu not installed or no GPU): measured on CPU only"
)

LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):  # onnxruntime >= 1.22
    LEVELS["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
"""Optimization level names (the CLI's vocabulary) -> onnxruntime's enum."""

_PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": CUDA,
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
# Providers whose memory is CUDA device memory, so I/O binding puts inputs and outputs on 'cuda'.
_CUDA_MEMORY = frozenset({CUDA, "TensorrtExecutionProvider"})
_SHORT = {v: k.upper() if len(k) <= 4 else k.capitalize() for k, v in _PROVIDER_ALIASES.items()}
_SHORT["TensorrtExecutionProvider"] = "TensorRT"


def normalize_level(level: str | ort.GraphOptimizationLevel) -> str:
    """``"enable_all"``, ``"ORT_ENABLE_ALL"`` or the enum -> ``"enable_all"``."""
    if isinstance(level, ort.GraphOptimizationLevel):
        for name, value in LEVELS.items():
            if value == level:
                return name
    key = str(level).strip().lower()
    key = key.removeprefix("ort_")
    key = {"enable_basic": "basic", "enable_extended": "extended", "enable_layout": "layout"}.get(key, key)
    if key not in LEVELS:
        raise ValueError(f"unknown optimization level {level!r}; expected one of {', '.join(LEVELS)}")
    return key


def normalize_provider(name: str) -> str:
    """``"cuda"`` or ``"CUDAExecutionProvider"`` -> ``"CUDAExecutionProvider"``."""
    key = name.strip()
    full = _PROVIDER_ALIASES.get(key.lower(), key)
    if not full.endswith("ExecutionProvider"):
        raise ValueError(
            f"unknown execution provider {name!r}; use one of {', '.join(_PROVIDER_ALIASES)} "
            "or a full onnxruntime provider name"
        )
    return full


def short_provider(provider: str) -> str:
    return _SHORT.get(provider, provider.removesuffix("ExecutionProvider"))


def available_providers() -> list[str]:
    """onnxruntime's list, looked up at each call (``onnxruntime.get_available_providers`` can be patched)."""
    return list(ort.get_available_providers())


@dataclass(frozen=True)
class MeasureConfig:
    """One measured configuration: provider x optimization level x I/O mode."""

    provider: str
    level: str
    io: str  # "bound" | "copies"
    device: str  # memory the inputs/outputs live on with I/O binding: "cpu" | "cuda"
    device_id: int = 0

    @property
    def label(self) -> str:
        parts = [short_provider(self.provider), self.level]
        if self.device != "cpu":
            parts.append("with copies" if self.io == "copies" else "I/O bound")
        return " / ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "provider": self.provider,
            "level": self.level,
            "io": self.io,
            "device": self.device,
            "device_id": self.device_id,
        }


def plan_configs(
    providers: Sequence[str],
    levels: Iterable[str],
    *,
    io_binding: bool = True,
    include_copies: bool = False,
    device_id: int = 0,
) -> list[MeasureConfig]:
    """Every configuration to measure, in report order (provider, then level, then I/O mode)."""
    configs: list[MeasureConfig] = []
    level_names = list(dict.fromkeys(normalize_level(lv) for lv in levels))
    for provider in providers:
        device = "cuda" if provider in _CUDA_MEMORY else "cpu"
        dev_id = device_id if device != "cpu" else 0
        for level in level_names:
            configs.append(MeasureConfig(provider, level, "bound" if io_binding else "copies", device, dev_id))
            if include_copies and io_binding and device != "cpu":
                configs.append(MeasureConfig(provider, level, "copies", device, dev_id))
    return configs


def resolve_providers(
    requested: str | Sequence[str] | None,
    probe: ProviderProbe,
) -> tuple[list[str], list[str]]:
    """Providers to measure and notes for the report.

    ``None`` or ``"auto"``: CPU, plus CUDA when onnxruntime lists it and a session really runs on it
    (onnxruntime-gpu silently falls back to CPU when the CUDA libraries fail to load); otherwise a note.
    An explicitly requested provider that is missing raises :class:`MissingDependencyError`.
    """
    available = available_providers()
    notes: list[str] = []
    if requested is None or (isinstance(requested, str) and requested.strip().lower() == "auto"):
        chosen = [CPU]
        if CUDA not in available:
            notes.append(CUDA_UNAVAILABLE_NOTE)
        else:
            error = probe(CUDA)
            if error is None:
                chosen.append(CUDA)
            else:
                notes.append(
                    f"CUDA execution provider is installed but a session could not run on it ({error}): "
                    "measured on CPU only"
                )
        return chosen, notes
    names = [requested] if isinstance(requested, str) else list(requested)
    chosen = list(dict.fromkeys(normalize_provider(n) for n in names))
    if not chosen:
        raise ValueError("no execution provider requested")
    for provider in chosen:
        if provider not in available:
            hint = " (install bnfold[gpu], i.e. onnxruntime-gpu, on a machine with an NVIDIA GPU)"
            raise MissingDependencyError(
                f"execution provider {provider} is not available in this onnxruntime"
                f"{hint if provider in _CUDA_MEMORY else ''}; available: {', '.join(available)}"
            )
        if provider != CPU:
            error = probe(provider)
            if error is not None:
                raise MissingDependencyError(f"a session could not run on {provider}: {error}")
    return chosen, notes
