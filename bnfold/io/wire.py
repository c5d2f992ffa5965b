"""Protobuf wire format, just enough to read and write an ONNX model without holding its tensor bytes.

A ``ModelProto`` is a sequence of fields; its graph is field 7, the graph's initializers are field 5, a
tensor's ``raw_data`` is field 9. Reading: :func:`scan_model` walks a file's bytes (an ``mmap``), parses
everything with protobuf except the ``raw_data`` of large main-graph initializers, whose position in the
file it records instead. Writing: :func:`split` serialises a message's fields before and after one field
number, so a model can be written as ``head + graph(head + tensors... + tail) + tail`` with each tensor's
bytes streamed from wherever they are. Known fields come out in field-number order followed by unknown
fields, exactly as protobuf's own serialiser orders them, so the streamed bytes equal
``SerializeToString()`` of the same model.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
from google.protobuf import unknown_fields
from google.protobuf.message import Message

__all__ = [
    "GRAPH_FIELD",
    "INITIALIZER_FIELD",
    "RAW_DATA_FIELD",
    "LazyRange",
    "WireError",
    "copy_field",
    "field_header",
    "scan_model",
    "split",
    "unknown_bytes",
    "varint",
]

GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data
_LEN = 2

WireBuffer = bytes | memoryview | mmap.mmap
"""What a model is scanned from: its bytes, or the model file mapped into memory."""


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_header(number: int, length: int) -> bytes:
    """Tag and length prefix of a length-delimited field."""
    return varint(number << 3 | _LEN) + varint(length)


def _read_varint(buf: WireBuffer, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: WireBuffer, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire_type, field_start, value_start, value_end)`` of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == 0:
            _, value_end = _read_varint(buf, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 5:
            value_end = pos + 4
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos, end)
            value_end = pos + length
        else:  # groups (3, 4) are not used by ONNX; 6, 7 do not exist
            raise WireError(f"unsupported wire type {wire}")
        if value_end > end:
            raise WireError("field runs past the end of its message")
        yield number, wire, field_start, pos, value_end
        pos = value_end


@dataclass(frozen=True)
class LazyRange:
    """Where a tensor's ``raw_data`` lies in the scanned buffer."""

    tensor: onnx.TensorProto
    offset: int
    length: int


def scan_model(buf: WireBuffer, min_bytes: int) -> tuple[onnx.ModelProto, list[LazyRange]]:
    """Parse a serialized ModelProto, leaving out the ``raw_data`` of main-graph initializers of at least
    ``min_bytes`` bytes; their ranges are returned with the (data-less) tensors, in order."""
    model = onnx.ModelProto()
    top: list[bytes] = []
    graphs: list[tuple[int, int]] = []
    for number, wire, field_start, start, end in _fields(buf, 0, len(buf)):
        if number == GRAPH_FIELD and wire == _LEN:
            graphs.append((start, end))
        else:
            top.append(bytes(buf[field_start:end]))
    model.MergeFromString(b"".join(top))
    lazy: list[LazyRange] = []
    for g_start, g_end in graphs:
        graph = model.graph
        graph.SetInParent()
        other: list[bytes] = []
        for number, wire, field_start, start, end in _fields(buf, g_start, g_end):
            if number == INITIALIZER_FIELD and wire == _LEN:
                found = _scan_tensor(buf, start, end, graph.initializer.add(), min_bytes)
                if found is not None:
                    lazy.append(found)
            else:
                other.append(bytes(buf[field_start:end]))
        graph.MergeFromString(b"".join(other))
    return model, lazy


def _scan_tensor(
    buf: WireBuffer, start: int, end: int, tensor: onnx.TensorProto, min_bytes: int
) -> LazyRange | None:
    parts: list[bytes] = []
    raw: tuple[int, int] | None = None
    for number, wire, field_start, v_start, v_end in _fields(buf, start, end):
        if number == RAW_DATA_FIELD and wire == _LEN:
            raw = (v_start, v_end)  # a repeated singular field: the last one wins
        else:
            parts.append(bytes(buf[field_start:v_end]))
    if raw is None or raw[1] - raw[0] < min_bytes:
        tensor.ParseFromString(bytes(buf[start:end]))
        return None
    tensor.ParseFromString(b"".join(parts))
    if tensor.data_location == onnx.TensorProto.EXTERNAL:  # inconsistent; keep it exactly as written
        tensor.ParseFromString(bytes(buf[start:end]))
        return None
    return LazyRange(tensor, raw[0], raw[1] - raw[0])


def copy_field(target: Message, fd: object, value: object) -> None:
    name = fd.name  # type: ignore[attr-defined]
    repeated = getattr(fd, "is_repeated", None)
    if repeated is None:  # protobuf < 6
        repeated = fd.label == fd.LABEL_REPEATED  # type: ignore[attr-defined]
    if repeated:
        getattr(target, name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:  # type: ignore[attr-defined]
        getattr(target, name).CopyFrom(value)
    else:
        setattr(target, name, value)


def unknown_bytes(message: Message) -> bytes:
    out = bytearray()
    for field in unknown_fields.UnknownFieldSet(message):
        number, wire, data = field.field_number, field.wire_type, field.data
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(data & (2**64 - 1))
        elif wire == 1:
            out += int(data).to_bytes(8, "little")
        elif wire == 5:
            out += int(data).to_bytes(4, "little")
        elif wire == _LEN:
            out += varint(len(data)) + bytes(data)
        else:
            raise WireError(f"cannot re-encode an unknown field of wire type {wire}")
    return bytes(out)


def split(message: Message, number: int, drop: frozenset[int] = frozenset()) -> tuple[bytes, bytes]:
    """``message`` serialized without field ``number`` (nor the fields in ``drop``), as the bytes before
    that field's place and the bytes after it (unknown fields last, as protobuf writes them). Nothing of
    field ``number`` is copied, however large it is."""
    head, tail = type(message)(), type(message)()
    for fd, value in message.ListFields():
        if fd.number == number or fd.number in drop:
            continue
        copy_field(head if fd.number < number else tail, fd, value)
    return head.SerializeToString(), tail.SerializeToString() + unknown_bytes(message)
