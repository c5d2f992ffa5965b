"""What may be folded: the fold stage's options (imports nothing heavy: the CLI builds it before any
model is read)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FoldOptions"]


@dataclass(frozen=True)
class FoldOptions:
    """Switches that change what may be folded. Defaults are the safe choice."""

    initializers_as_constants: bool = False
    """Treat initializers that are also graph inputs (IR < 4 models) as constants."""
    only: frozenset[str] | None = None
    """Run only these rules (by name, any iterable); None runs all."""
    skip: frozenset[str] = frozenset()
    """Rules not to run."""
    clone: bool = True
    """Allow cloning a producer whose output has other consumers (rules that support it)."""
    max_clone_bytes: int = 1 << 20
    """Largest extra weight a clone may add."""
    check: bool = True
    """Run ``onnx.checker`` on the input (refused: BadInputError) and on the folded model."""

    def __post_init__(self) -> None:
        if self.only is not None:
            object.__setattr__(self, "only", _names(self.only, "only"))
        object.__setattr__(self, "skip", _names(self.skip, "skip"))
        limit = self.max_clone_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise TypeError(f"max_clone_bytes must be an int >= 0, got {self.max_clone_bytes!r}")


def _names(value: Iterable[str], field: str) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset({value})
    try:
        names = frozenset(value)
    except TypeError:
        raise TypeError(f"{field} must be rule names (a list or set of str), got {value!r}") from None
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{field} must be rule names (str), got {sorted(map(repr, names))}")
    return names
