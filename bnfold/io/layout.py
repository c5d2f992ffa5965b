"""A model as pieces of bytes, so that it can be written without holding its tensors: the light copy
(every large main-graph initializer without its bytes, and where those bytes are), the single-file
layout (protobuf field order: byte-identical to ``SerializeToString``, see :mod:`bnfold.io.wire`), the
data-free copy ``onnx.checker`` reads, and file ranges copied by the kernel. Used by :mod:`bnfold.io.staging`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold.errors import OutputError
from bnfold.io.dtypes import tensor_nbytes
from bnfold.io.store import (
    LAZY_MIN_BYTES,
    TensorStore,
    copy_header,
    write_all,
)
from bnfold.io.wire import GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD, field_header, split

__all__ = [
    "Data",
    "Piece",
    "RangeCopier",
    "checkable_copy",
    "inline_pieces",
    "inline_size",
    "light_copy",
    "other_tensors",
    "reusable_spill",
]

_EXTERNAL = onnx.TensorProto.EXTERNAL


Piece = bytes | tuple[Path, int, int]
"""Bytes to write, or a ``(file, offset, length)`` range to copy."""


@dataclass(frozen=True)
class Data:
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


def reusable_spill(
    directory: Path, placed: list[tuple[onnx.TensorProto, Piece | Data]], store: TensorStore | None
) -> Path | None:
    """The store's spill file, when it lies in ``directory`` and nearly all of it is still used (a fold
    that was matched, then deferred or folded again, leaves a few dead bytes): then it can become the
    output's data file as it is, instead of being copied."""
    if store is None or store.spill_path is None or store.spill_path.parent != directory.resolve():
        return None
    spill = store.spill_path
    live = sum(p[2] for _, p in placed if isinstance(p, tuple) and p[0] == spill)
    return spill if live and store.spill_end - live <= store.spill_end // 64 else None


def light_copy(
    model: onnx.ModelProto, store: TensorStore | None, min_bytes: int = LAZY_MIN_BYTES
) -> tuple[onnx.ModelProto, list[Data | None]]:
    """A copy of ``model`` without the bytes of its main-graph initializers of at least ``min_bytes``, and
    where each one's bytes are (None for those copied whole). Nothing large is copied."""
    if not model.HasField("graph"):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, []
    m_head, m_tail = split(model, GRAPH_FIELD)
    g_head, g_tail = split(model.graph, INITIALIZER_FIELD)
    parts: list[bytes] = [g_head]
    sources: list[Data | None] = []
    for tensor in model.graph.initializer:
        data: Data | None = None
        if tensor.data_location == _EXTERNAL:
            if store is not None:
                ref = store.ref(tensor)
                data = Data(None, ref, ref[2])
            body = tensor.SerializeToString()
        else:
            size = tensor_nbytes(tensor)
            if size is not None and size >= min_bytes and tensor.HasField("raw_data"):
                header = onnx.TensorProto()
                copy_header(tensor, header)
                body = header.SerializeToString()
                data = Data(tensor, None, size)
            else:
                body = tensor.SerializeToString()
        sources.append(data)
        parts.append(field_header(INITIALIZER_FIELD, len(body)) + body)
    parts.append(g_tail)
    graph = b"".join(parts)
    light = onnx.ModelProto()
    light.ParseFromString(m_head + field_header(GRAPH_FIELD, len(graph)) + graph + m_tail)
    return light, sources


def inline_pieces(
    light: onnx.ModelProto, sources: list[Data | None]
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
            if isinstance(part, Data):
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


def inline_size(light: onnx.ModelProto, sources: list[Data | None]) -> int:
    return light.ByteSize() + sum(d.length + 16 for d in sources if d is not None)


def other_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
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
    light, sources = light_copy(model, None)
    if not light.HasField("graph"):
        return light
    for tensor, data in zip(light.graph.initializer, sources, strict=True):
        if data is not None or tensor.data_location == _EXTERNAL:
            _placeholder(tensor)
    for tensor in other_tensors(light):
        if tensor.data_location == _EXTERNAL:
            _placeholder(tensor)
    return light


def _placeholder(tensor: onnx.TensorProto) -> None:
    name, data_type = tensor.name, tensor.data_type
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.append(0)


_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


class RangeCopier:
    """Copies file ranges into an open file with ``copy_file_range`` (in the kernel; falls back to reads)."""

    _CHUNK = 1 << 24

    def __init__(self) -> None:
        self._files: dict[Path, int] = {}

    def __enter__(self) -> RangeCopier:
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
