"""One options object per stage, and keyword overrides of its fields at a library call.

``bnfold.fold(model, only={"conv"})`` and ``bnfold.fold(model, FoldOptions(only={"conv"}))`` mean the
same: each public function takes its stage's frozen options object and accepts its fields as keywords,
merged here once, so options are never unpacked and repacked from layer to layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["with_overrides"]

T = TypeVar("T")


def with_overrides(cls: type[T], options: T | None, overrides: Mapping[str, Any]) -> T:
    """``options`` (default ``cls()``) with the fields named in ``overrides`` replaced. An unknown name or
    an options object of another type is a TypeError naming what is accepted."""
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__}, not {type(options).__name__}")
    if not overrides:
        return options
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    return dataclasses.replace(options, **overrides)  # type: ignore[type-var]
