"""Tensor bytes that stay on disk: reading them on demand, and keeping new large tensors out of memory.

A model opened with :func:`bnfold.io.load.load_lazily` holds no large tensor bytes: every large
initializer is an ONNX external-data reference (``data_location = EXTERNAL`` with ``location``,
``offset``, ``length``), either to the model's own external data files or to the ``raw_data`` bytes
inside the ``.onnx`` file itself. A :class:`TensorStore` resolves those references against the model's
folder and reads just the tensors a fold needs. With a spill file it also takes the large tensors a fold
creates and appends them to that file, handing back a reference, so a fold of a model bigger than memory
holds one tensor at a time.

References to files the store created itself (the spill file) are absolute paths; those never leave
bnfold: :mod:`bnfold.io.load` rewrites every reference when it writes a model.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from bnfold.errors import BadInputError, OutputError
from bnfold.io.dtypes import PLAIN_TYPES, tensor_nbytes
from bnfold.io.wire import RAW_DATA_FIELD, unknown_bytes

__all__ = [
    "ALIGN",
    "ALIGN_MIN_BYTES",
    "LAZY_MIN_BYTES",
    "TensorStore",
    "all_tensors",
    "copy_header",
    "external_ref",
    "set_external_ref",
    "write_all",
]

log = logging.getLogger(__name__)

LAZY_MIN_BYTES = 1024
"""Initializers with at least this many bytes of data are left on disk by ``bnfold.io.load.load_lazily``, spilled
by a fold, and written to the data file of an external-data output (onnx's own default threshold)."""
ALIGN = 4096
"""Large tensors start at multiples of this in the data files bnfold writes (onnxruntime can then map
them instead of copying)."""
ALIGN_MIN_BYTES = 1 << 20

_EXTERNAL = onnx.TensorProto.EXTERNAL
_DATA_FIELDS = frozenset({RAW_DATA_FIELD, 13, 14})  # raw_data, external_data, data_location


def all_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    """Every tensor of ``model`` that can hold data: the initializers and attribute tensors (``Constant``
    nodes) of every graph and subgraph, and the attribute tensors of local functions."""
    return onnx.external_data_helper._get_all_tensors(model)  # bnfold's one use of this private onnx API


def external_ref(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """``(location, offset, length)`` of an external tensor (read by onnx's ``ExternalDataInfo``); ``length``
    None means "to the end of the file". A negative or non-numeric offset or length is a ValueError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx warns about keys it does not know; they are ignored here too
        info = ExternalDataInfo(tensor)
    return info.location, info.offset or 0, info.length


def set_external_ref(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` an external-data reference (its in-memory data, if any, is dropped). Written here
    rather than with onnx's ``set_external_data``, which refuses a tensor without ``raw_data``: a lazily read
    tensor has none (its bytes stayed in the file)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = _EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


class TensorStore:
    """Resolves external-data references against ``base_dir``; optionally spills new tensors to a file.

    ``model_path`` is the ``.onnx`` file the references came from, when known (the writer uses it to
    never overwrite a file the input still needs).
    """

    def __init__(self, base_dir: str | os.PathLike[str], *, model_path: Path | None = None) -> None:
        self.base_dir = Path(os.fspath(base_dir))
        self.model_path = model_path
        self._base_real = self.base_dir.resolve()
        self._own: set[Path] = set()
        self._paths: dict[str, Path] = {}
        self._spill: Path | None = None
        self._spill_file: io.FileIO | None = None
        self._spill_end = 0
        self._spill_min = 0
        self.spilled: dict[str, int] = {}
        """Bytes spilled per tensor name (diagnostics)."""

    # -- resolving --------------------------------------------------------------------------------
    def path_of(self, location: str) -> Path:
        """The file a reference's ``location`` names; refuses locations outside the model's folder."""
        known = self._paths.get(location)
        if known is not None:
            return known
        if not isinstance(location, str):  # protobuf hands back bytes when the location is not UTF-8
            raise BadInputError(f"external data location {location!r} is not valid UTF-8")
        path = Path(location)
        if path.is_absolute():
            if path in self._own:
                return path
            raise BadInputError(f"external data location {location!r} is an absolute path")
        if ".." in path.parts:
            raise BadInputError(f"external data location {location!r} leaves the model's folder")
        full = self.base_dir / path
        real = full.resolve()
        if real != self._base_real and self._base_real not in real.parents:
            raise BadInputError(f"external data location {location!r} points outside the model's folder")
        self._paths[location] = full
        return full

    def ref(self, tensor: onnx.TensorProto) -> tuple[Path, int, int]:
        """``(file, offset, length)`` of an external tensor, checked against the file's size."""
        location, offset, length = external_ref(tensor)
        if not location:
            raise BadInputError(f"tensor {tensor.name!r}: external data without a location")
        path = self.path_of(location)
        if path.exists() and not path.is_file():
            raise BadInputError(f"tensor {tensor.name!r}: external data location {location!r} is not a regular file")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise BadInputError(
                f"tensor {tensor.name!r}: external data file {location!r} cannot be read "
                f"({exc.strerror or exc})"
            ) from exc
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise BadInputError(
                f"tensor {tensor.name!r}: external data {location!r} [{offset}, {offset + length}) is past "
                f"the end of the file ({size} bytes)"
            )
        expected = tensor_nbytes(tensor)
        if expected is not None and expected != length:
            raise BadInputError(
                f"tensor {tensor.name!r}: {length} bytes of data for shape {list(tensor.dims)} "
                f"({onnx.TensorProto.DataType.Name(tensor.data_type)}), which needs {expected}"
            )
        return path, offset, length

    def referenced_files(self) -> set[Path]:
        """Every file a reference resolved so far names, and the model file itself (all resolved): the
        files of the input model, which a writer must not delete."""
        files = {path.resolve() for path in self._paths.values()}
        if self.model_path is not None:
            files.add(self.model_path)
        return files

    # -- reading ----------------------------------------------------------------------------------
    def read_bytes(self, tensor: onnx.TensorProto) -> bytes:
        path, offset, length = self.ref(tensor)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise BadInputError(f"tensor {tensor.name!r}: external data file {path.name!r} is truncated")
        return data

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The value of an external tensor, read from disk (only its own bytes)."""
        if tensor.data_type in PLAIN_TYPES and sys.byteorder == "little":
            path, offset, length = self.ref(tensor)
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            flat = np.fromfile(path, dtype=np.uint8, count=length, offset=offset)
            if flat.size != length:
                raise BadInputError(f"tensor {tensor.name!r}: external data file {path.name!r} is truncated")
            return flat.view(dtype).reshape(tuple(tensor.dims))
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        inline.raw_data = self.read_bytes(tensor)
        inline.data_location = onnx.TensorProto.DEFAULT
        del inline.external_data[:]
        return numpy_helper.to_array(inline)

    def materialize(self, tensor: onnx.TensorProto) -> None:
        """Read an external tensor's bytes into ``raw_data`` and make it an ordinary in-memory tensor."""
        tensor.raw_data = self.read_bytes(tensor)
        tensor.ClearField("data_location")
        del tensor.external_data[:]

    # -- spilling ---------------------------------------------------------------------------------
    def open_spill(self, path: Path, min_bytes: int = LAZY_MIN_BYTES) -> None:
        """From now on :meth:`spill` appends tensors of at least ``min_bytes`` to ``path`` (created)."""
        path = path.resolve()
        try:
            self._spill_file = open(path, "wb", buffering=0)  # noqa: SIM115 -- closed by close()
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        self._spill, self._spill_end, self._spill_min = path, 0, min_bytes
        self._own.add(path)

    @property
    def spill_path(self) -> Path | None:
        return self._spill

    @property
    def spill_end(self) -> int:
        """Bytes written to the spill file so far (padding included)."""
        return self._spill_end

    def spill(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor`` with its bytes moved to the spill file (a new TensorProto), or ``tensor`` itself when
        there is no spill file or it is small."""
        if self._spill is None or tensor.data_location == _EXTERNAL or not tensor.HasField("raw_data"):
            return tensor
        raw = tensor.raw_data
        if len(raw) < self._spill_min:
            return tensor
        offset = self._append(raw)
        out = onnx.TensorProto()
        copy_header(tensor, out)
        set_external_ref(out, str(self._spill), offset, len(raw))
        self.spilled[tensor.name] = len(raw)
        return out

    def _append(self, data: bytes | memoryview) -> int:
        """Write ``data`` at the end of the spill file (aligned when large); its offset."""
        f = self._spill_file
        assert f is not None
        offset = self._spill_end
        try:
            if len(data) >= ALIGN_MIN_BYTES and offset % ALIGN:
                pad = ALIGN - offset % ALIGN
                write_all(f, bytes(pad))
                offset += pad
            write_all(f, data)
        except OSError as exc:  # disk full while folding: the output cannot be written, not a bug
            raise OutputError(f"{self._spill}: cannot write folded tensors ({exc.strerror or exc})") from exc
        self._spill_end = offset + len(data)
        return offset

    def close(self) -> None:
        """Close the spill file (it stays on disk, readable, until its folder is removed)."""
        if self._spill_file is not None:
            self._spill_file.close()
            self._spill_file = None


def copy_header(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
    """Every field of ``src`` except its data (``raw_data``) and storage location. (``ListFields`` is not
    used: it would copy ``raw_data`` out of the message just to skip it.)"""
    for fd in _HEADER_FIELDS:
        if _is_repeated(fd):
            values = getattr(src, fd.name)
            if len(values):
                getattr(dst, fd.name).extend(values)
        elif src.HasField(fd.name):
            if fd.type == fd.TYPE_MESSAGE:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))
    unknown = unknown_bytes(src)
    if unknown:
        dst.MergeFromString(unknown)


def _is_repeated(fd: FieldDescriptor) -> bool:
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


_HEADER_FIELDS = [fd for fd in onnx.TensorProto.DESCRIPTOR.fields if fd.number not in _DATA_FIELDS]


def write_all(f: object, data: bytes | memoryview) -> None:
    """``os.write`` until every byte of ``data`` is written (an unbuffered file may write less)."""
    view = memoryview(data)
    fd = f.fileno()  # type: ignore[attr-defined]
    while view:
        n = os.write(fd, view)
        view = view[n:]
