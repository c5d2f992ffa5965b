"""Writing a model without holding its tensor bytes: staged beside the target, then renamed into place.

:class:`StagedModel` writes a model into a temporary folder beside its target: either one ``.onnx`` file
(tensor bytes streamed into the protobuf, byte-identical to ``SerializeToString``) or a model file plus
one data file. Tensor bytes come from the caller's in-memory tensors (one at a time) or from file ranges
(external data, a lazily loaded model's own file, the spill file of a fold), copied by the kernel
(``copy_file_range``). Everything is ``fsync``ed; :meth:`StagedModel.commit` renames the data files,
then the model, into place. :func:`checkable_copy` gives ``onnx.checker`` the graph without the bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold._protowire import GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD, field_header, split
from bnfold.errors import BadInputError, OutputError
from bnfold.tensor_store import (
    ALIGN,
    ALIGN_MIN_BYTES,
    LAZY_MIN_BYTES,
    TensorStore,
    copy_header,
    nbytes_of,
    set_external_ref,
    write_all,
)

__all__ = ["INLINE_LIMIT", "Piece", "StagedModel", "checkable_copy", "stage_model"]

INLINE_LIMIT = 2**31 - 1 - 2**20
"""Largest single-file model written (protobuf's 2 GB limit, with headroom); beyond it, external data."""
_EXTERNAL = onnx.TensorProto.EXTERNAL


def stage_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    store: TensorStore | None = None,
) -> StagedModel:
    """Write ``model`` for ``path`` under temporary names beside it; see :class:`StagedModel`."""
    staged = StagedModel(path)
    try:
        staged.write(model, store=store, external_data=external_data)
    except BaseException:
        staged.discard()
        raise
    return staged


Piece = bytes | tuple[Path, int, int]
"""Bytes to write, or a ``(file, offset, length)`` range to copy."""


class StagedModel:
    """A model written under temporary names in a folder beside its target, not yet in place.

    ``path`` is the staged ``.onnx`` file: onnxruntime (or verification) can load it by path, its data
    files lie beside it under their final names. :meth:`commit` renames the data files, then the model,
    into the target's folder; :meth:`discard` deletes everything. Used as a context manager, whatever
    was not committed is discarded on exit. ``model`` is the model as written, its large tensors as
    external-data references relative to ``path``'s folder (into the ``.onnx`` itself for an inline file).
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(os.fspath(target))
        directory = self.target.parent if str(self.target.parent) else Path(".")
        if not directory.is_dir():
            raise OutputError(f"{self.target}: output directory {directory} does not exist")
        if self.target.is_dir():
            raise OutputError(f"{self.target}: is a directory")
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=directory))
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot write ({exc.strerror or exc})") from exc
        self.path = self.dir / self.target.name
        self.model: onnx.ModelProto | None = None
        self.data_files: list[str] = []
        """Names of the data files written beside the model (empty for a single-file model)."""
        self.nbytes = 0
        """Bytes written: the model file and its data files."""
        self.committed = False

    @property
    def scratch(self) -> Path:
        """A file name inside the staging folder for temporary data (deleted with it)."""
        return self.dir / ".scratch"

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.discard()

    # -- writing ----------------------------------------------------------------------------------
    def write(self, model: onnx.ModelProto, *, store: TensorStore | None = None,
              external_data: bool | None = None) -> None:
        """Write ``model`` into the staging folder (once). ``model`` is not modified."""
        if self.model is not None:
            raise RuntimeError("a StagedModel is written once")
        try:
            light, sources = _light_copy(model, store)
            inline_size = _inline_size(light, sources)
            use_external = external_data if external_data is not None else inline_size > INLINE_LIMIT
            if use_external:
                self._write_external(light, sources, store)
            else:
                self._write_inline(light, sources, store)
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot write ({exc.strerror or exc})") from exc

    def _write_inline(self, light: onnx.ModelProto, sources: list[_Data | None], store: TensorStore | None) -> None:
        if store is not None:  # references outside the main initializers: read them into the copy
            for tensor in _other_tensors(light):
                if tensor.data_location == _EXTERNAL:
                    store.materialize(tensor)
        pieces, positions = _inline_pieces(light, sources)
        with open(self.path, "wb", buffering=0) as f, _RangeCopier() as copier:
            offset = 0
            for piece in pieces:
                if isinstance(piece, bytes):
                    write_all(f, piece)
                    offset += len(piece)
                else:
                    copier.copy(piece, f)
                    offset += piece[2]
            os.fsync(f.fileno())
        self.nbytes = offset
        for index, pos, length in positions:  # what was written, as references into the file itself
            set_external_ref(light.graph.initializer[index], self.target.name, pos, length)
        self.model = light

    def _write_external(self, light: onnx.ModelProto, sources: list[_Data | None], store: TensorStore | None) -> None:
        data_name = _data_name(self.target, store, light)
        placed: list[tuple[onnx.TensorProto, Piece]] = []
        for tensor, data in zip(light.graph.initializer, sources, strict=True):
            if data is not None:
                placed.append((tensor, data.range if data.range is not None else data))  # type: ignore[arg-type]
        if store is not None:
            placed += [(t, store.ref(t)) for t in _other_tensors(light) if t.data_location == _EXTERNAL]
        spill = _reusable_spill(self.dir, placed, store)
        data_path = self.dir / data_name
        if spill is not None:  # the folded tensors are already in a file here: it becomes the data file
            assert store is not None
            store.close()
            os.replace(spill, data_path)
        with open(data_path, "ab" if spill is not None else "wb", buffering=0) as f, _RangeCopier() as copier:
            end = os.fstat(f.fileno()).st_size
            for tensor, piece in placed:
                if isinstance(piece, tuple) and piece[0] == spill:
                    set_external_ref(tensor, data_name, piece[1], piece[2])
                    continue
                if isinstance(piece, _Data):
                    piece = piece.piece()
                length = len(piece) if isinstance(piece, bytes) else piece[2]
                if length >= ALIGN_MIN_BYTES and end % ALIGN:
                    pad = ALIGN - end % ALIGN
                    write_all(f, bytes(pad))
                    end += pad
                if isinstance(piece, bytes):
                    write_all(f, piece)
                else:
                    copier.copy(piece, f)
                set_external_ref(tensor, data_name, end, length)
                end += length
            os.fsync(f.fileno())
        serialized = light.SerializeToString()
        with open(self.path, "wb", buffering=0) as f:
            write_all(f, serialized)
            os.fsync(f.fileno())
        self.data_files = [data_name]
        self.nbytes = len(serialized) + end
        self.model = light

    # -- committing -------------------------------------------------------------------------------
    def commit(self) -> None:
        """Rename the data files, then the model, into place (each rename atomic); remove the folder."""
        if self.model is None:
            raise RuntimeError("nothing was written")
        directory = self.target.parent
        try:
            for name in self.data_files:
                os.replace(self.dir / name, directory / name)
            os.replace(self.path, self.target)
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot write ({exc.strerror or exc})") from exc
        self.committed = True
        self.path = self.target
        self._remove_dir()

    def discard(self) -> None:
        """Delete the staged files (nothing at the target is touched)."""
        if not self.committed:
            self._remove_dir()

    def _remove_dir(self) -> None:
        if not self.dir.exists():
            return
        for leftover in self.dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()


@dataclass(frozen=True)
class _Data:
    """The bytes of a main-graph initializer kept out of the light copy: in a caller's in-memory tensor
    (read when written) or in a file range."""

    tensor: onnx.TensorProto | None
    range: tuple[Path, int, int] | None
    length: int

    def piece(self) -> Piece:
        if self.range is not None:
            return self.range
        assert self.tensor is not None
        raw = self.tensor.raw_data
        if len(raw) != self.length:
            raise OutputError(f"tensor '{self.tensor.name}' has {len(raw)} bytes of raw_data; its shape needs "
                              f"{self.length}")
        return raw


def _reusable_spill(
    directory: Path, placed: list[tuple[onnx.TensorProto, Piece | _Data]], store: TensorStore | None
) -> Path | None:
    """The store's spill file, when it lies in ``directory`` and nearly all of it is still used (a fold
    that was matched, then deferred or folded again, leaves a few dead bytes): then it can become the
    output's data file as it is, instead of being copied."""
    if store is None or store.spill_path is None or store.spill_path.parent != directory.resolve():
        return None
    spill = store.spill_path
    live = sum(p[2] for _, p in placed if isinstance(p, tuple) and p[0] == spill)
    return spill if live and store.spill_end - live <= store.spill_end // 64 else None


def _light_copy(model: onnx.ModelProto, store: TensorStore | None) -> tuple[onnx.ModelProto, list[_Data | None]]:
    """A copy of ``model`` without the bytes of its large main-graph initializers, and where each one's
    bytes are (None for those copied whole). Nothing large is copied."""
    if not model.HasField("graph"):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, []
    m_head, m_tail = split(model, GRAPH_FIELD)
    g_head, g_tail = split(model.graph, INITIALIZER_FIELD)
    parts: list[bytes] = [g_head]
    sources: list[_Data | None] = []
    for tensor in model.graph.initializer:
        data: _Data | None = None
        if tensor.data_location == _EXTERNAL:
            if store is not None:
                ref = store.ref(tensor)
                data = _Data(None, ref, ref[2])
            body = tensor.SerializeToString()
        else:
            size = nbytes_of(tensor)
            if size is not None and size >= LAZY_MIN_BYTES and tensor.HasField("raw_data"):
                header = onnx.TensorProto()
                copy_header(tensor, header)
                body = header.SerializeToString()
                data = _Data(tensor, None, size)
            else:
                body = tensor.SerializeToString()
        sources.append(data)
        parts.append(field_header(INITIALIZER_FIELD, len(body)) + body)
    parts.append(g_tail)
    graph = b"".join(parts)
    light = onnx.ModelProto()
    light.ParseFromString(m_head + field_header(GRAPH_FIELD, len(graph)) + graph + m_tail)
    return light, sources


def _inline_pieces(
    light: onnx.ModelProto, sources: list[_Data | None]
) -> tuple[list[Piece], list[tuple[int, int, int]]]:
    """The serialized model as pieces, tensor bytes streamed; and where each streamed tensor's bytes land."""
    if not sources:
        return [light.SerializeToString()], []
    m_head, m_tail = split(light, GRAPH_FIELD)
    g_head, g_tail = split(light.graph, INITIALIZER_FIELD)
    tensors: list[list[Piece]] = []
    total = len(g_head) + len(g_tail)
    for tensor, data in zip(light.graph.initializer, sources, strict=True):
        if data is None:
            body = tensor.SerializeToString()
            tensors.append([field_header(INITIALIZER_FIELD, len(body)) + body])
            total += len(tensors[-1][0])  # type: ignore[arg-type]
            continue
        t_head, t_tail = split(tensor, RAW_DATA_FIELD, drop=_LOCATION_FIELDS)
        raw_header = field_header(RAW_DATA_FIELD, data.length)
        size = len(t_head) + len(raw_header) + data.length + len(t_tail)
        opening = field_header(INITIALIZER_FIELD, size) + t_head + raw_header
        tensors.append([opening, data, t_tail])  # type: ignore[list-item]
        total += len(opening) + data.length + len(t_tail)
    pieces: list[Piece] = [m_head + field_header(GRAPH_FIELD, total) + g_head]
    positions: list[tuple[int, int, int]] = []
    offset = len(pieces[0])
    for index, group in enumerate(tensors):
        for part in group:
            if isinstance(part, _Data):
                positions.append((index, offset, part.length))
                piece = part.piece()
                pieces.append(piece)
                offset += part.length
            else:
                pieces.append(part)
                offset += len(part)
    pieces += [g_tail, m_tail]
    return pieces, positions


_LOCATION_FIELDS = frozenset({13, 14})  # TensorProto.external_data, data_location


def _inline_size(light: onnx.ModelProto, sources: list[_Data | None]) -> int:
    return light.ByteSize() + sum(d.length + 16 for d in sources if d is not None)


def _other_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model`` except the main graph's initializers: attribute tensors (``Constant``
    nodes), subgraph initializers, function bodies."""

    def in_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for sub in subs:
                    yield from sub.initializer
                    yield from in_nodes(sub.node)

    yield from in_nodes(model.graph.node)
    for function in model.functions:
        yield from in_nodes(function.node)


def checkable_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for ``onnx.checker`` without tensor bytes: every large or external tensor
    becomes an empty placeholder (same name and element type, shape ``[0]``). The checker then validates
    the graph (nodes, attributes, types, opsets, names) without serialising the weights twice and
    without reading external data; the weights' sizes are checked where they are read."""
    light, sources = _light_copy(model, None)
    if not light.HasField("graph"):
        return light
    for tensor, data in zip(light.graph.initializer, sources, strict=True):
        if data is not None or tensor.data_location == _EXTERNAL:
            _placeholder(tensor)
    for tensor in _other_tensors(light):
        if tensor.data_location == _EXTERNAL:
            _placeholder(tensor)
    return light


def _placeholder(tensor: onnx.TensorProto) -> None:
    name, data_type = tensor.name, tensor.data_type
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.append(0)


def _data_name(target: Path, store: TensorStore | None, light: onnx.ModelProto) -> str:
    """``<target>.data``, unless that would overwrite a file the input model still reads (then
    ``<target>.1.data``, ...). Replacing the input model itself (``-o`` = input) may replace its data."""
    used: set[Path] = set()
    if store is not None:
        for tensor in _all_tensors(light):
            if tensor.data_location == _EXTERNAL:
                with contextlib.suppress(BadInputError, OSError):
                    used.add(store.ref(tensor)[0].resolve())
        in_place = store.model_path is not None and target.resolve() == store.model_path
        if in_place:
            used.clear()
    name, i = f"{target.name}.data", 0
    while (target.parent / name).resolve() in used:
        i += 1
        name = f"{target.name}.{i}.data"
    return name


_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


class _RangeCopier:
    """Copies file ranges into an open file with ``copy_file_range`` (in the kernel; falls back to reads)."""

    _CHUNK = 1 << 24

    def __init__(self) -> None:
        self._files: dict[Path, int] = {}

    def __enter__(self) -> _RangeCopier:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def copy(self, piece: tuple[Path, int, int], out: object) -> None:
        path, offset, length = piece
        src = self._files.get(path)
        if src is None:
            src = self._files[path] = os.open(path, os.O_RDONLY)
        dst = out.fileno()  # type: ignore[attr-defined]
        end = offset + length
        if hasattr(os, "copy_file_range"):
            try:
                while offset < end:
                    n = os.copy_file_range(src, dst, min(end - offset, 1 << 30), offset)
                    if n <= 0:
                        raise OSError(f"{path.name}: unexpected end of file")
                    offset += n
                return
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise
                # the kernel or file system cannot: copy through user space from where it stopped
        while offset < end:
            chunk = os.pread(src, min(end - offset, self._CHUNK), offset)
            if not chunk:
                raise OSError(f"{path.name}: unexpected end of file")
            write_all(out, chunk)
            offset += len(chunk)




def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(onnx.external_data_helper._get_all_tensors(model))
