"""The one-call entry points an export pipeline uses."""

from __future__ import annotations

import os

import onnx

from bnfold.errors import OutputError
from bnfold.onnx_io import ModelSource, StagedModel, load_lazily, load_model, materialize
from bnfold.passes import FoldResult, fold_in_place, fold_onnx
from bnfold.rules.base import FoldOptions
from bnfold.tensor_store import TensorStore

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
    output: str | os.PathLike[str] | None = None,
    commit: bool = True,
) -> FoldResult:
    """Fold every foldable BatchNormalization of an ONNX model.

    ``model`` is a path, bytes or an ``onnx.ModelProto`` (never modified). Returns a
    :class:`~bnfold.passes.FoldResult`: the folded model, the folds made and every normalization left
    with its reason. ``check`` runs ``onnx.checker`` on the input and the output. Raises
    :class:`~bnfold.errors.BadInputError` for input that is not a valid model.

    ``output``: write the folded model there (atomically) while folding: from a path, tensors are read
    on demand and the new ones go straight to disk, so memory stays far below the model's size (any size,
    external data or not); ``result.model`` is then the graph as written, tensors left on disk, and
    ``result.staged`` says what was written. ``commit=False`` leaves the written files under temporary
    names beside ``output``: ``result.staged.path`` loads by path (verification), then
    ``result.staged.commit()`` or ``.discard()``. Without ``output`` the result is fully in memory.
    """
    options = FoldOptions(
        initializers_as_constants=initializers_as_constants,
        only=frozenset(only) if only is not None else None,
        skip=frozenset(skip),
        clone=clone,
        max_clone_bytes=max_clone_bytes,
    )
    if output is not None:
        return _fold_to_file(model, output, options, check, commit)
    if isinstance(model, onnx.ModelProto):
        return fold_onnx(load_model(model), options, check=check)
    if isinstance(model, bytes | bytearray | memoryview):
        return fold_in_place(load_model(model), options, check=check)  # parsed here: nobody else holds it
    lazy = load_lazily(model)
    result = fold_in_place(lazy.proto, options, check=check, store=lazy.store)
    materialize(lazy)
    return result


def _fold_to_file(
    model: ModelSource, output: str | os.PathLike[str], options: FoldOptions, check: bool, commit: bool
) -> FoldResult:
    staged = StagedModel(output)
    store: TensorStore | None = None
    try:
        external: bool | None = None
        if isinstance(model, onnx.ModelProto):
            result = fold_onnx(load_model(model), options, check=check)
        elif isinstance(model, bytes | bytearray | memoryview):
            result = fold_in_place(load_model(model), options, check=check)
        else:
            lazy = load_lazily(model)
            store, external = lazy.store, (None if lazy.inline else True)
            try:
                store.open_spill(staged.scratch)
                result = fold_in_place(lazy.proto, options, check=check, store=store)
            except OutputError as exc:  # the scratch file is ours, not the user's: name the output
                cause = exc.__cause__
                detail = getattr(cause, "strerror", None) or cause or exc
                raise OutputError(f"{staged.target}: cannot write ({detail})") from exc
        staged.write(result.model, store=store, external_data=external)
        if store is not None:
            store.close()
        assert staged.model is not None
        result.model, result.staged = staged.model, staged
        if commit:
            staged.commit()
    except BaseException:
        if store is not None:
            store.close()
        staged.discard()
        raise
    return result
