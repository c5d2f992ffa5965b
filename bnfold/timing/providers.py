"""The configurations to measure: execution provider x optimization level x I/O mode.

Provider names, availability and optimization levels are :mod:`bnfold.check.runtime`'s. The I/O modes:

- ``bound``: inputs are OrtValues already on the provider's device and outputs are bound to that device
  with I/O binding, so the time is the model's and not the host<->device copies (on CPU there are none).
- ``copies``: numpy in, numpy out through ``InferenceSession.run``; on a GPU provider the time includes
  the copies. Added as its own, labelled configuration by ``include_copies=True``, or used instead of
  ``bound`` when ``io_binding=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bnfold.check.runtime import CUDA, TENSORRT, normalize_level, short_provider

__all__ = ["MeasureConfig", "plan_configs"]

logger = logging.getLogger(__name__)

# Providers whose memory is CUDA device memory, so I/O binding puts inputs and outputs on 'cuda'.
_CUDA_MEMORY = frozenset({CUDA, TENSORRT})


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
