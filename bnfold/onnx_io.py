"""Loading and saving ONNX models: every failure is one clear line, every write is atomic.

* ``load_model`` takes a path, bytes or a ``ModelProto`` and checks that what it got is a model
  (``onnx.load`` of an empty or foreign file returns an empty model without complaint).
* ``save_model`` writes to a temporary file beside the target and renames it into place, so an
  interrupted run leaves no half-written file and ``-o`` equal to the input is safe. A model with
  external data is saved with its data next to the output (``OUT.data``), never over the input's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import BadInputError, OutputError

__all__ = [
    "PROTOBUF_LIMIT",
    "ModelSource",
    "NameAllocator",
    "atomic_write_bytes",
    "has_external_data",
    "load_model",
    "model_bytes",
    "save_model",
]

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
PROTOBUF_LIMIT = 2**31 - 1
_ZIP_MAGIC = b"PK\x03\x04"


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) from a path, bytes or a ``ModelProto``.

    Raises ``BadInputError`` with a one-line message when the input is not a usable model.
    """
    if isinstance(source, onnx.ModelProto):
        _check_is_model(source, "the given ModelProto")
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        model = _parse(bytes(source), "the given bytes")
        _check_is_model(model, "the given bytes")
        return model
    path = Path(os.fspath(source))
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, not an ONNX file")
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
    try:
        model = onnx.load_model(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise BadInputError(f"{path}: not an ONNX model (protobuf could not parse it)") from exc
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    _check_is_model(model, str(path))
    if has_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
            raise BadInputError(f"{path}: external data could not be read ({detail})") from exc
    return model


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


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(model)
    )


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` in bytes (external data not counted)."""
    return model.ByteSize()


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically.

    ``external_data``: None chooses external data when the model does not fit one protobuf (2 GB);
    the data then goes to ``<name>.data`` next to the output. The input ``model`` is not modified.
    """
    target = Path(os.fspath(path))
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"{target}: output directory {directory} does not exist")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory")
    use_external = external_data if external_data is not None else model.ByteSize() > PROTOBUF_LIMIT - 2**20
    try:
        if use_external:
            _save_external(model, target)
        else:
            _atomic_write(target, model.SerializeToString())
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; raise ``OutputError`` with one line on failure."""
    target = Path(os.fspath(path))
    if not target.parent.is_dir():
        raise OutputError(f"{target}: directory {target.parent} does not exist")
    try:
        _atomic_write(target, data)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc


def _atomic_write(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_external(model: onnx.ModelProto, target: Path) -> None:
    """Model + one data file ``<target>.data``, both written to a temporary folder then renamed."""
    data_name = f"{target.name}.data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(
            copy,
            str(tmpdir / target.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        os.replace(tmpdir / data_name, target.parent / data_name)
        os.replace(tmpdir / target.name, target)
    finally:
        for leftover in tmpdir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            tmpdir.rmdir()


class NameAllocator:
    """Fresh tensor names that collide with nothing in the model (any graph, any kind of name)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._used: set[str] = set()
        self._collect(model.graph)
        for f in model.functions:
            self._used.update(f.input)
            self._used.update(f.output)
            for node in f.node:
                self._used.update(node.output)

    def _collect(self, graph: onnx.GraphProto) -> None:
        from bnfold.graph import subgraphs

        used = self._used
        used.update(t.name for t in graph.initializer)
        used.update(t.values.name for t in graph.sparse_initializer)
        used.update(v.name for v in graph.input)
        used.update(v.name for v in graph.output)
        used.update(v.name for v in graph.value_info)
        for node in graph.node:
            used.update(node.input)
            used.update(node.output)
            for _, g in subgraphs(node):
                self._collect(g)

    def fresh(self, base: str) -> str:
        """``base`` itself if unused, else ``base_1``, ``base_2``, ... Reserves the name returned."""
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name
