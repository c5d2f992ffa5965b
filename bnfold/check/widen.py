"""bfloat16 models on a CPU without bfloat16 kernels: check them widened, exactly, to float32.

onnxruntime's CPU provider has no bfloat16 Conv, Gemm, MatMul or BatchNormalization. Every bfloat16
value is exactly a float32 value, so a model whose bfloat16 tensors, types and casts all become float32
computes, on the very same weights, what the bfloat16 model computes up to the arithmetic's own
rounding. Widening the original and the folded model the same way and comparing them at bfloat16
tolerances therefore checks what a fold can get wrong (the folded weights and biases), though not the
runtime's bfloat16 arithmetic; the result says so.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.ir.nodes import subgraphs

__all__ = ["WIDENED_NOTE", "has_bfloat16", "widen_bfloat16"]

_BF16 = onnx.TensorProto.BFLOAT16
_F32 = onnx.TensorProto.FLOAT

WIDENED_NOTE = (
    "bfloat16 checked widened exactly to float32 (onnxruntime's CPU provider has no bfloat16 kernels for "
    "these ops): the folded weights are checked at bfloat16 tolerances, bfloat16 arithmetic is not"
)


def has_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any tensor, declared type or cast of ``model``'s main graph is bfloat16."""
    graph = model.graph
    typed = [*graph.input, *graph.output, *graph.value_info]
    return any(t.data_type == _BF16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == _BF16 for v in typed
    )


def widen_bfloat16(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``model`` with every bfloat16 made float32, or None when it cannot be done exactly
    (a tensor stored as external data that was not loaded)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out if _widen_graph(out.graph) else None


def _widen_graph(graph: onnx.GraphProto) -> bool:
    for tensor in graph.initializer:
        if not _widen_tensor(tensor):
            return False
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == _BF16:
            value.type.tensor_type.elem_type = _F32
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and not _widen_tensor(attr.t):
                return False
            if attr.name == "to" and attr.type == onnx.AttributeProto.INT and attr.i == _BF16:
                attr.i = _F32
        for _, sub in subgraphs(node):
            if not _widen_graph(sub):
                return False
    return True


def _widen_tensor(tensor: onnx.TensorProto) -> bool:
    if tensor.data_type != _BF16:
        return True
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    wide = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
    tensor.CopyFrom(wide)
    return True
