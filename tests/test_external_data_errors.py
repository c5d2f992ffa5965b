"""External data references found broken by the loader fuzz: each ends in a BnfoldError or a refusal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from cli_faults import (
    _external,
    _set_ref,
)
from conftest import ops
from onnx import TensorProto

import bnfold
from bnfold.errors import BadInputError


def _external_model(tmp_path: Path, edit: Callable[[onnx.ModelProto], None]) -> Path:
    src = _external(lambda d: None)(tmp_path)
    model = onnx.load(src, load_external_data=False)
    edit(model)
    src.write_bytes(model.SerializeToString())
    return src


def test_external_data_location_that_is_a_directory(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    for i in range(16):  # a directory whose size (st_size) covers the tensor's range
        (sub / f"entry-with-a-long-name-{i:04d}").touch()
    if sub.stat().st_size < 64:
        pytest.skip("directory sizes are too small on this file system")

    def edit(model: onnx.ModelProto) -> None:
        _set_ref(model, "var", "location", "sub")
        _set_ref(model, "var", "offset", "0")

    src = _external_model(tmp_path, edit)
    with pytest.raises(BadInputError, match="external data"):
        bnfold.fold(src)


def test_external_data_length_not_matching_the_shape(tmp_path: Path) -> None:
    """Found by the loader fuzz (ValueError from numpy before). Today the BN is left with a reason (the
    pass turns a read failure into a refusal); a BadInputError would do as well."""
    def edit(model: onnx.ModelProto) -> None:
        gamma = next(t for t in model.graph.initializer if t.name == "gamma")
        gamma.data_type = TensorProto.FLOAT8E4M3FN  # 1 byte per element; the data holds 4 per element

    src = _external_model(tmp_path, edit)
    try:
        result = bnfold.fold(src)
    except BadInputError:
        return
    assert ops(result.model) == ["Conv", "BatchNormalization"]
    assert "could not be read" in result.skipped[0].reason


def test_external_data_location_not_utf8(tmp_path: Path) -> None:
    src = _external(lambda d: None)(tmp_path)
    data = src.read_bytes()
    cut = data.rindex(b"m.weights")
    src.write_bytes(data[:cut] + b"m.weight\xff" + data[cut + len(b"m.weights"):])
    with pytest.raises(BadInputError, match="external data"):
        bnfold.fold(src)
