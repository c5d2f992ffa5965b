"""Tiny graphs for the refusal tests: a BatchNormalization with constant statistics, value infos, and
the reasons a fold gives. Most of these graphs are malformed on purpose (onnx.checker would reject
them), so the fold runs with ``check=False``: the refusal, not the checker, must catch them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from conftest import tensor
from onnx import TensorProto, helper

import bnfold

__all__ = ["bn", "bn_inits", "reasons", "vi"]


def vi(name: str, shape: Sequence[int | str] | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def bn_inits(channels: int, prefix: str = "bn", sizes: Sequence[int] | None = None) -> list[onnx.TensorProto]:
    """scale 1.5, bias 0.25, mean 0.1, var 2.0; ``sizes`` gives each statistic its own length."""
    sizes = sizes or [channels] * 4
    values = (1.5, 0.25, 0.1, 2.0)
    return [tensor(f"{prefix}_{role}", np.full(n, v, np.float32))
            for role, n, v in zip(("scale", "bias", "mean", "var"), sizes, values, strict=True)]


def bn(x: str, y: str, prefix: str = "bn", **attrs: object) -> onnx.NodeProto:
    names = [x, *(f"{prefix}_{r}" for r in ("scale", "bias", "mean", "var"))]
    return helper.make_node("BatchNormalization", names, [y], **attrs)


def reasons(model: onnx.ModelProto, **options: object) -> list[str]:
    """Fold ``model`` (checker off unless ``check=True`` is passed); assert nothing folded; the reasons."""
    options.setdefault("check", False)
    result = bnfold.fold(model, **options)  # type: ignore[arg-type]
    assert result.folded == (), result.folded
    return [s.reason for s in result.skipped]
