"""The wire-format shortcuts bnfold/io/wire.py takes, proven against protobuf itself.

Streaming a model (``split`` around one field, tensor bytes written in between) and reading one without
its tensor bytes (``scan_model``) rely on protobuf's serialization order: known fields in field-number
order, then unknown fields. These tests pin that reliance: if a protobuf release ever changed the order,
they fail before a streamed model could differ from ``SerializeToString``. (The memory this buys is
measured in benchmarks/fold_speed.py: a 3 GB model folds at a fraction of its size; loading it whole
with onnx would hold it all.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.io.wire import GRAPH_FIELD, INITIALIZER_FIELD, field_header, scan_model, split


def _rich_model() -> onnx.ModelProto:
    """A model with fields on both sides of the graph, several initializers, metadata and doc strings."""
    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(16, 256), "W")
    b = numpy_helper.from_array(np.ones(16, np.float32), "B")
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1, name="g")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])], [w, b],
                              doc_string="graph doc")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="p",
                              doc_string="model doc")
    helper.set_model_props(model, {"k": "v"})
    return model


def _with_unknown_field(message: onnx.ModelProto, number: int = 99) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.ParseFromString(message.SerializeToString() + field_header(number, 3) + b"abc")
    return out


def test_split_around_the_graph_is_protobufs_own_order() -> None:
    for model in (_rich_model(), _with_unknown_field(_rich_model())):
        head, tail = split(model, GRAPH_FIELD)
        graph = model.graph.SerializeToString()
        assert head + field_header(GRAPH_FIELD, len(graph)) + graph + tail == model.SerializeToString()


def test_split_around_the_initializers_is_protobufs_own_order() -> None:
    graph = _rich_model().graph
    head, tail = split(graph, INITIALIZER_FIELD)
    inits = b"".join(field_header(INITIALIZER_FIELD, t.ByteSize()) + t.SerializeToString() for t in graph.initializer)
    assert head + inits + tail == graph.SerializeToString()


def test_scan_leaves_out_large_tensor_bytes_and_says_where_they_are() -> None:
    model = _with_unknown_field(_rich_model())
    data = model.SerializeToString()
    scanned, lazy = scan_model(data, min_bytes=1024)
    assert [r.tensor.name for r in lazy] == ["W"]
    w = model.graph.initializer[0]
    assert data[lazy[0].offset:lazy[0].offset + lazy[0].length] == w.raw_data
    assert not scanned.graph.initializer[0].raw_data and scanned.graph.initializer[1] == model.graph.initializer[1]
    scanned.graph.initializer[0].raw_data = w.raw_data
    assert scanned.SerializeToString() == data  # every other field, unknown ones included, round-trips
