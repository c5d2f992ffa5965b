"""Damage for the loader fuzz: byte-level mutations of a serialized model (``mutate``) and structural ones
of its proto (``mutate_proto``: element types, dims, raw data, attributes, inputs, opsets, external data).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x1A, 0x22, 0x3A)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A damaged copy of ``data``: one to four random edits."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not buf:
            buf = bytearray(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes())
            continue
        kind = int(rng.integers(0, 7))
        pos = int(rng.integers(0, len(buf)))
        if kind == 0:  # bit flips
            for _ in range(int(rng.integers(1, 9))):
                p = int(rng.integers(0, len(buf)))
                buf[p] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # truncation
            del buf[pos:]
        elif kind == 2:  # insertion of random bytes
            buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
        elif kind == 3:  # deletion
            del buf[pos:pos + int(rng.integers(1, 33))]
        elif kind == 4:  # an interesting byte (varint continuation, tag bytes, 0 / 0xFF)
            buf[pos] = _INTERESTING[int(rng.integers(0, len(_INTERESTING)))]
        elif kind == 5:  # duplicate a run (repeated fields, doubled messages)
            n = int(rng.integers(1, 65))
            buf[pos:pos] = buf[pos:pos + n]
        else:  # zero or 0xFF a run
            n = int(rng.integers(1, 17))
            buf[pos:pos + n] = bytes([0 if rng.integers(0, 2) else 0xFF]) * len(buf[pos:pos + n])
    return bytes(buf)


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(onnx.external_data_helper._get_all_tensors(model))


def mutate_proto(data: bytes, rng: np.random.Generator) -> bytes:
    """A structurally plausible but damaged model: one to three field-level edits that keep the bytes
    parseable (element types, dims, raw data, attributes, node inputs and types, opsets, external data),
    so the damage reaches past the protobuf parser into the checker and bnfold."""
    model = onnx.ModelProto()
    model.ParseFromString(data)
    g = model.graph
    for _ in range(int(rng.integers(1, 4))):
        tensors = _tensors(model)
        kind = int(rng.integers(0, 12))
        if kind == 0 and tensors:
            t = tensors[int(rng.integers(0, len(tensors)))]
            t.data_type = int(rng.choice([0, 2, 3, 7, 8, 9, 10, 11, 16, 17, 23, 24, 99, 1000]))
        elif kind == 1 and tensors:
            t = tensors[int(rng.integers(0, len(tensors)))]
            if t.dims:
                t.dims[int(rng.integers(0, len(t.dims)))] = int(rng.choice([0, 1, -1, 3, 2**31, 2**40]))
            else:
                t.dims.append(int(rng.choice([0, 2, 2**33])))
        elif kind == 2 and tensors:
            t = tensors[int(rng.integers(0, len(tensors)))]
            if t.raw_data:
                t.raw_data = t.raw_data[: int(rng.integers(0, len(t.raw_data)))]
            else:
                t.raw_data = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        elif kind == 3 and g.node:
            node = g.node[int(rng.integers(0, len(g.node)))]
            if node.attribute:
                a = node.attribute[int(rng.integers(0, len(node.attribute)))]
                if a.type == onnx.AttributeProto.INTS and a.ints:
                    a.ints[int(rng.integers(0, len(a.ints)))] = int(rng.choice([-1, 0, 2**31, 7]))
                elif a.type == onnx.AttributeProto.INT:
                    a.i = int(rng.choice([-1, 0, 2, 2**31, -(2**40)]))
                elif a.type == onnx.AttributeProto.FLOAT:
                    a.f = float(rng.choice([np.nan, np.inf, -1.0, 0.0, 1e30]))
                else:
                    a.type = int(rng.integers(0, 15))
            else:
                node.attribute.append(helper.make_attribute(
                    str(rng.choice(["group", "epsilon", "transB", "axis", "training_mode", "spatial"])),
                    int(rng.integers(-2, 4))))
        elif kind == 4 and g.node:
            node = g.node[int(rng.integers(0, len(g.node)))]
            names = [t.name for t in g.initializer] + [i.name for i in g.input] + ["", "nope"]
            if node.input and rng.random() < 0.5:
                node.input[int(rng.integers(0, len(node.input)))] = str(rng.choice(names))
            elif node.input:
                del node.input[int(rng.integers(0, len(node.input)))]
            else:
                node.input.append(str(rng.choice(names)))
        elif kind == 5 and g.node:
            node = g.node[int(rng.integers(0, len(g.node)))]
            node.op_type = str(rng.choice(["Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
                                           "Relu", "Identity", "Constant", "If", "Foo"]))
            if rng.random() < 0.2:
                node.domain = str(rng.choice(["com.example", "ai.onnx", "ai.onnx.ml", "com.microsoft"]))
        elif kind == 6 and g.initializer:
            del g.initializer[int(rng.integers(0, len(g.initializer)))]
        elif kind == 7 and len(g.node) > 1:
            i, j = (int(v) for v in rng.choice(len(g.node), 2, replace=False))
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(g.node[i])
            b.CopyFrom(g.node[j])
            g.node[i].CopyFrom(b)
            g.node[j].CopyFrom(a)
        elif kind == 8 and model.opset_import:
            model.opset_import[0].version = int(rng.choice([1, 6, 7, 9, 14, 15, 22, 23, 30, 0, -1]))
        elif kind == 9:
            model.ir_version = int(rng.choice([0, 1, 2, 3, 4, 11, 12, 13, 99]))
        elif kind == 10 and tensors:
            t = tensors[int(rng.integers(0, len(tensors)))]
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", str(rng.choice(["w.bin", "../w.bin", "/etc/hostname", "", "."]))),
                               ("offset", str(rng.choice(["0", "-1", "abc", "99999999999"]))),
                               ("length", str(rng.choice(["4", "0", "-4", "x"])))):
                if rng.random() < 0.8:
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
        elif kind == 11 and g.node:
            node = g.node[int(rng.integers(0, len(g.node)))]
            dup = onnx.NodeProto()
            dup.CopyFrom(node)
            g.node.insert(int(rng.integers(0, len(g.node) + 1)), dup)
    return model.SerializeToString()
