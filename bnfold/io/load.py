"""Loading and saving ONNX models: every failure is one clear line, every write is atomic, and no
step needs the model's tensor bytes in memory.

* ``load_model`` takes a path, bytes or a ``ModelProto`` and checks that what it got is a model
  (``onnx.load`` of an empty or foreign file returns an empty model without complaint).
* ``load_lazily`` reads a model file without its large tensors: they become external-data references
  (to the model's own data files, or to their bytes inside the ``.onnx`` file) that a
  :class:`~bnfold.io.store.TensorStore` reads on demand. ``materialize`` loads them.
* ``save_model`` writes to temporary names beside the target and renames into place, so an interrupted
  run leaves no half-written file and ``-o`` equal to the input is safe. ``stage_model`` /
  :class:`StagedModel` stop before the rename: the staged model can be loaded by path (onnxruntime,
  verification), then committed or discarded. Tensor bytes are streamed: file ranges are copied by the
  kernel (``copy_file_range``), in-memory tensors written one at a time. A model with external data is
  saved with its data next to the output in ``OUT.<crc>.data``, named after its content (the CRC-32 of
  its bytes), so the model's rename is the one commit point: the previous ``OUT`` keeps its own data
  until it is replaced, and a rerun writes the same names. Data files only the previous ``OUT`` used are
  deleted after that rename, never one the input uses (see :mod:`bnfold.io.staging`).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError

from bnfold.errors import BadInputError, first_line
from bnfold.io.dtypes import np_dtype, tensor_nbytes
from bnfold.io.store import LAZY_MIN_BYTES, TensorStore, all_tensors, set_external_ref
from bnfold.io.wire import WireError, scan_model

__all__ = [
    "LAZY_MIN_BYTES",
    "LazyModel",
    "ModelSource",
    "all_tensors",
    "file_size",
    "has_external_data",
    "load_lazily",
    "load_model",
    "materialize",
    "model_file_bytes",
]

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
_ZIP_MAGIC = b"PK\x03\x04"
_EXTERNAL = onnx.TensorProto.EXTERNAL


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) from a path, bytes or a ``ModelProto``.

    From a path, the tensors are read one at a time into the parsed model (peak: the model once, not
    the file's bytes plus a parsed copy). Raises ``BadInputError`` with a one-line message when the
    input is not a usable model.
    """
    if isinstance(source, onnx.ModelProto):
        _check_is_model(source, "the given ModelProto")
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        model = _parse(bytes(source), "the given bytes")
        _check_is_model(model, "the given bytes")
        return model
    lazy = load_lazily(source)
    materialize(lazy)
    return lazy.proto


@dataclass
class LazyModel:
    """A model read from a file without its large tensors (see :func:`load_lazily`)."""

    proto: onnx.ModelProto
    """The model; every initializer of at least ``LAZY_MIN_BYTES`` is an external-data reference."""
    store: TensorStore
    """Reads those references (resolved against the model file's folder)."""
    path: Path
    inline: bool
    """True when the file held all its tensors itself (no external data files)."""


def _readable_model_path(source: str | os.PathLike[str]) -> Path:
    from bnfold.io.paths import as_path, check_input_file

    path = check_input_file(as_path(source, "model"))  # a regular file: a FIFO or device is never opened
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not head:
        raise BadInputError(f"{path}: empty file, not an ONNX model")
    if head == _ZIP_MAGIC:
        raise BadInputError(
            f"{path}: is a zip archive (a TorchScript or PyTorch file?), not an ONNX model"
        )
    return path


def load_lazily(source: str | os.PathLike[str], *, min_bytes: int = LAZY_MIN_BYTES) -> LazyModel:
    """Read the model file ``source`` leaving every main-graph initializer of at least ``min_bytes`` on
    disk: its bytes inside the ``.onnx`` file, or its external data file, become an external-data
    reference. Memory use is the graph's structure, not the model's size. Every reference is checked
    (file present, range inside it, length matching the shape); raises ``BadInputError`` otherwise.
    """
    path = _readable_model_path(source)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            model, lazy = scan_model(buf, min_bytes)
    except (DecodeError, WireError, RuntimeWarning, ValueError) as exc:
        raise BadInputError(f"{path}: not an ONNX model (protobuf could not parse it)") from exc
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    inline = not has_external_data(model)
    for item in lazy:
        set_external_ref(item.tensor, path.name, item.offset, item.length)
    _check_is_model(model, str(path))
    for item in lazy:
        expected = tensor_nbytes(item.tensor)
        if expected is not None and expected != item.length:
            raise BadInputError(
                f"{path}: invalid ONNX model (tensor '{item.tensor.name}' has {item.length} bytes of data; "
                f"its shape {list(item.tensor.dims)} needs {expected})"
            )
    store = TensorStore(path.parent, model_path=path.resolve())
    if not inline:
        for tensor in all_tensors(model):
            if tensor.data_location == _EXTERNAL:
                try:
                    store.ref(tensor)
                except (BadInputError, ValueError) as exc:  # ValueError: offset 'abc', a NUL in the location
                    raise BadInputError(f"{path}: external data could not be read ({exc})") from exc
                except OSError as exc:  # a location the file system refuses (a name over 255 bytes)
                    raise BadInputError(f"{path}: external data of tensor '{tensor.name}' could not be read "
                                        f"({exc.strerror or exc})") from exc
    log.debug("%s: %d tensors left on disk", path, len(lazy))
    return LazyModel(model, store, path, inline)


def materialize(lazy: LazyModel) -> None:
    """Read every tensor of ``lazy.proto`` that is on disk into memory (one tensor at a time)."""
    for tensor in all_tensors(lazy.proto):
        if tensor.data_location == _EXTERNAL:
            try:
                lazy.store.materialize(tensor)
            except (BadInputError, OSError) as exc:
                detail = getattr(exc, "strerror", None) or str(exc)
                raise BadInputError(f"{lazy.path}: external data could not be read ({detail})") from exc


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    if not data:
        raise BadInputError(f"{what}: empty, not an ONNX model")
    if data[:4] == _ZIP_MAGIC:
        raise BadInputError(f"{what}: a zip archive (TorchScript?), not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise BadInputError(f"{what}: not an ONNX model (protobuf could not parse it)") from exc
    return model


def _check_is_model(model: onnx.ModelProto, what: str) -> None:
    if not model.HasField("graph") or model.ir_version <= 0:
        raise BadInputError(f"{what}: not an ONNX model (no graph or no IR version)")
    if len(model.opset_import) == 0 and model.ir_version >= 3:
        raise BadInputError(f"{what}: invalid ONNX model (no opset_import)")
    _check_tensors(model, what)


_DECODE_CHECK_BYTES = 1 << 18
"""Tensors declared at most this big are decoded once at load time (cheap: BN statistics, biases)."""


def _check_tensors(model: onnx.ModelProto, what: str) -> None:
    """Reject in-memory tensors that nothing can read: an element type that is not in the ONNX enum,
    ``raw_data`` whose length does not match the declared shape (onnx.checker only sees tensors too
    short, and bnfold's checker copy leaves large tensors out), or (small tensors, decoded here) any
    other data that does not fit the shape. External-data tensors are checked where they are read."""
    known = set(onnx.TensorProto.DataType.values())
    for t in all_tensors(model):
        if t.data_type not in known:
            raise BadInputError(f"{what}: invalid ONNX model (tensor '{t.name}' has unknown element type "
                                f"{t.data_type})")
        _check_one_data_field(t, what)
        dtype = np_dtype(t.data_type)
        if (t.data_location == onnx.TensorProto.EXTERNAL or dtype is None or dtype.kind == "O"
                or any(d < 0 for d in t.dims)):  # negative dims: onnx.checker says so, in its words
            continue  # external: checked where read; UNDEFINED or STRING: no fixed size to check
        nbytes = tensor_nbytes(t)
        if t.HasField("raw_data") and nbytes is not None and len(t.raw_data) != nbytes:
            raise BadInputError(f"{what}: invalid ONNX model (tensor '{t.name}' has {len(t.raw_data)} bytes of "
                                f"data; its shape {list(t.dims)} needs {nbytes})")
        if math.prod(t.dims) * dtype.itemsize > _DECODE_CHECK_BYTES:
            continue
        try:
            onnx.numpy_helper.to_array(t)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            detail = first_line(exc)
            raise BadInputError(f"{what}: invalid ONNX model (tensor '{t.name}' of shape {list(t.dims)} "
                                f"cannot be read: {detail})") from exc


_TYPED_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_one_data_field(t: onnx.TensorProto, what: str) -> None:
    """A tensor carries its data in one place: ``raw_data``, one typed field, or external data, whatever
    its size (a reader picks one and ignores the rest; ``onnx.checker`` refuses two)."""
    places = [name for name in _TYPED_DATA_FIELDS if len(getattr(t, name))]
    if t.HasField("raw_data"):
        places.append("raw_data")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        places.append("external data")
    if len(places) > 1:
        raise BadInputError(f"{what}: invalid ONNX model (tensor '{t.name}' has its data in more than one "
                            f"field: {' and '.join(places)})")


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model))


def model_file_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of an ONNX model file plus every external data file it references (None: unreadable)."""
    try:
        files = load_lazily(path).store.referenced_files()
        return sum(f.stat().st_size for f in files)
    except (BadInputError, OSError):
        return file_size(Path(os.fspath(path)))


def file_size(path: Path) -> int | None:
    """The size of the file at ``path``; None when it cannot be read."""
    try:
        return path.stat().st_size
    except OSError:
        return None
