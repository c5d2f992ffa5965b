"""The one-call entry points an export pipeline uses."""

from __future__ import annotations

from bnfold.onnx_io import ModelSource, load_model
from bnfold.passes import FoldResult, fold_onnx
from bnfold.rules.base import FoldOptions

__all__ = ["fold"]


def fold(
    model: ModelSource,
    *,
    initializers_as_constants: bool = False,
    only: list[str] | tuple[str, ...] | frozenset[str] | None = None,
    skip: list[str] | tuple[str, ...] | frozenset[str] = (),
    clone: bool = True,
    max_clone_bytes: int = 1 << 20,
    check: bool = True,
) -> FoldResult:
    """Fold every foldable BatchNormalization of an ONNX model.

    ``model`` is a path, bytes or an ``onnx.ModelProto`` (never modified). Returns a
    :class:`~bnfold.passes.FoldResult`: the folded model, the folds made and every normalization left
    with its reason. ``check`` runs ``onnx.checker`` on the input and the output. Raises
    :class:`~bnfold.errors.BadInputError` for input that is not a valid model.
    """
    options = FoldOptions(
        initializers_as_constants=initializers_as_constants,
        only=frozenset(only) if only is not None else None,
        skip=frozenset(skip),
        clone=clone,
        max_clone_bytes=max_clone_bytes,
    )
    return fold_onnx(load_model(model), options, check=check)
