"""What a graph declares about a tensor, read without evaluating anything: a ``Constant`` node's tensor, a
graph input's declared dims, the element type an op gives its output. Used by :mod:`bnfold.ir.view`."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.ir.nodes import attr, is_op

__all__ = ["constant_node_tensor", "declared_dims", "to_array", "type_source"]


def constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
        if a.name == "value_float":
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
        if a.name == "value_int":
            return numpy_helper.from_array(np.array(a.i, dtype=np.int64))
        if a.name == "value_ints":
            return numpy_helper.from_array(np.array(list(a.ints), dtype=np.int64))
    return None


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


def declared_dims(vi: onnx.ValueInfoProto) -> tuple[int, ...] | str:
    """A graph input's declared shape when every dimension is a number, else why it is not fixed."""
    if not vi.type.HasField("tensor_type"):
        return f"graph input '{vi.name}' is not a tensor"
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return f"the shape of graph input '{vi.name}' is not declared"
    for i, d in enumerate(tt.shape.dim):
        if not d.HasField("dim_value"):
            what = f"'{d.dim_param}'" if d.dim_param else "unknown"
            return f"the shape of graph input '{vi.name}' is not fixed: dimension {i} is {what}"
    return tuple(int(d.dim_value) for d in tt.shape.dim)


_SAME_TYPE_AS_INPUT0 = frozenset({
    "Identity", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Clip", "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min",
    "Sum", "Mean", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Floor", "Ceil", "Round", "Sign", "Conv",
    "ConvTranspose", "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Gemm", "MatMul",
    "Softmax", "LogSoftmax", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice",
    "Split", "Gather", "GatherElements", "Expand", "Tile", "Pad", "Resize", "Upsample", "DepthToSpace",
    "SpaceToDepth", "Dropout", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "CumSum",
})
"""Ops whose first output has the element type of their first input (one type variable T for both)."""
_INT64_OUT = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})
_BOOL_OUT = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not",
                       "IsNaN", "IsInf"})


def type_source(node: onnx.NodeProto, output: str) -> int | str | None:
    """Where ``output`` of ``node`` gets its element type: an ONNX type, the name of the input that has
    the same type, or None when this does not know."""
    if not is_op(node, node.op_type):
        return None
    op = node.op_type
    if op == "Constant":
        tensor = constant_node_tensor(node)
        return tensor.data_type if tensor is not None else None
    if op in _INT64_OUT:
        return onnx.TensorProto.INT64
    if op in _BOOL_OUT:
        return onnx.TensorProto.BOOL
    if op == "Cast":
        to = attr(node, "to")
        return None if to is None else int(to)
    if op == "ConstantOfShape":
        value = attr(node, "value")
        if value is None:
            return onnx.TensorProto.FLOAT  # its default value is a float32 zero
        return value.data_type if isinstance(value, onnx.TensorProto) else None
    first_output = bool(node.output) and node.output[0] == output
    if op == "CastLike" and first_output and len(node.input) > 1:
        return node.input[1]
    if op == "Where" and first_output and len(node.input) > 1:
        return node.input[1]
    if op in _SAME_TYPE_AS_INPUT0 and node.input and node.input[0] and (first_output or op == "Split"):
        return node.input[0]
    return None

