"""Evaluating deterministic ops on constant inputs at fold time: exporters' constant subgraphs.

Exporters often write a parameter as a small subgraph over constants instead of one initializer: the
torch dynamo exporter gives every bias-free Conv a zero bias ``Expand(CastLike(0, x), Shape(W)[:1])``;
paddle2onnx, tf2onnx and older torch exporters Reshape, Unsqueeze, Transpose, Cast or Concat their
parameters. A tensor computed by one of :data:`PURE_OPS` (default domain, deterministic, no side effects,
nothing random) from constants is a constant too: :class:`bnfold.ir.view.GraphView` asks :func:`evaluate`
for its value, one node at a time, and :mod:`bnfold.folding.passes` removes such nodes once a fold leaves them
unused.

Some inputs are read for their type alone (:data:`TYPE_ONLY`): ``Shape`` and ``Size`` need the input's
shape, ``CastLike``'s second input only its element type. The view passes those as placeholders: a
zero-stride array of the right shape (no memory behind it) or an empty array of the right dtype.

Safety:
  - nothing is evaluated whose result would exceed :data:`MAX_RESULT_BYTES` (bounded before evaluating
    for the ops that can grow their inputs: Expand, ConstantOfShape, Tile, Range, Gather, broadcasts);
  - onnx's reference evaluator computes the node (numpy directly for Shape, Size, Identity) under the
    model's opset, and each result must have the element type (and static shape, where known) that ONNX
    type inference gives for the node: a disagreement is refused, never guessed around;
  - every failure is an :class:`EvaluationError` with a phrase for the refusal message.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import defs, helper, shape_inference

from bnfold.ir.nodes import attr, is_op

__all__ = ["MAX_RESULT_BYTES", "PURE_OPS", "TYPE_ONLY", "EvaluationError", "evaluate", "is_pure", "placeholder"]

MAX_RESULT_BYTES = 64 << 20
"""Largest result evaluated (per output); a larger one stays "computed at run time"."""

_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Cast", "CastLike", "Clip",
})
"""Output shape: the inputs broadcast together (CastLike: its first input's)."""
_FIRST_BOUNDED = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Split", "ReduceSum",
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ArgMax", "ArgMin", "CumSum",
    "ReduceL1", "ReduceL2", "ReduceSumSquare",
})
"""Output no larger than the first input (ReduceL2 and friends: the norms of weight normalization)."""
_REARRANGE = _FIRST_BOUNDED | {"Concat", "Shape", "Size", "GatherElements"}
"""Output no larger than the inputs (Concat: together; GatherElements: its indices)."""
_GROWING = frozenset({"Expand", "ConstantOfShape", "Tile", "Range", "Gather"})
"""Output size computed from the inputs before evaluating."""

PURE_OPS: frozenset[str] = _ELEMENTWISE | _REARRANGE | _GROWING
"""Default-domain ops evaluated on constant inputs: deterministic, side-effect free, nothing random."""

TYPE_ONLY: dict[tuple[str, int], str] = {("Shape", 0): "shape", ("Size", 0): "shape", ("CastLike", 1): "dtype"}
"""``(op, input position) -> what is read``: inputs whose values are never read, only their shape or
element type."""

_EXACT_BOUND = frozenset({"Expand", "ConstantOfShape", "Tile", "Range", "Gather", "Identity", "Reshape",
                          "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Shape", "Size",
                          "GatherElements"} | (_ELEMENTWISE - {"Where", "Clip"}))
"""Ops whose size bound above is their exact output size (for the refusal message)."""
_BOOL_OUT = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not"})


class EvaluationError(Exception):
    """A node that cannot be evaluated at fold time; ``str(exc)`` is a phrase for the refusal message."""


def is_pure(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is one of :data:`PURE_OPS` in the default domain."""
    return is_op(node, PURE_OPS)


def placeholder(shape: Sequence[int] | None, dtype: np.dtype) -> np.ndarray:
    """An input read only for its shape (a zero-stride array, no memory behind it) or, ``shape`` None,
    only for its element type (an empty array)."""
    if shape is None:
        return np.empty((0,), dtype)
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def evaluate(node: onnx.NodeProto, inputs: Sequence[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """The outputs of ``node`` (one of :data:`PURE_OPS`) on ``inputs`` (None for an absent optional input),
    under default-domain ``opset``; one array per output, read-only. Raises :class:`EvaluationError`."""
    if not is_pure(node):
        raise EvaluationError(f"{node.op_type} is not an op bnfold evaluates")
    if opset <= 0:
        raise EvaluationError("the model's opset is unknown")
    op = node.op_type
    try:
        elements = _max_elements(node, inputs)
    except Exception as exc:  # malformed inputs: the reference evaluator would fail on them too
        raise EvaluationError(f"its inputs are inconsistent ({type(exc).__name__}: {exc})") from exc
    itemsize = _out_itemsize(node, inputs)
    if elements * itemsize > MAX_RESULT_BYTES:
        raise EvaluationError(_too_large(elements * itemsize, bound=op not in _EXACT_BOUND))
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            outputs = _run(node, inputs, opset)
        _check_types(node, inputs, outputs, opset)
    except EvaluationError:
        raise
    except Exception as exc:  # the reference evaluator raises anything at all on a node it cannot run
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise EvaluationError(f"evaluating it failed ({type(exc).__name__}{': ' + first if first else ''})") from exc
    result = []
    for out in outputs:
        arr = np.asarray(out)
        if arr.nbytes > MAX_RESULT_BYTES:
            raise EvaluationError(_too_large(arr.nbytes))
        arr = arr.view()
        arr.flags.writeable = False  # may share memory with a cached constant: nobody writes to it
        result.append(arr)
    return result


def _too_large(nbytes: int, bound: bool = False) -> str:
    return (f"its value would take {'up to ' if bound else ''}{nbytes} bytes, more than the {MAX_RESULT_BYTES} "
            "bnfold evaluates at fold time")


def _run(node: onnx.NodeProto, inputs: Sequence[np.ndarray | None], opset: int) -> list[np.ndarray]:
    op = node.op_type
    if op == "Identity":
        return [_present(inputs, 0)]
    if op == "Shape":
        shape = _present(inputs, 0).shape
        start, end = int(attr(node, "start", 0)), attr(node, "end")
        end = None if end is None else int(end)
        return [np.array(shape[start:end], dtype=np.int64)]  # ONNX clamps start/end as slicing does
    if op == "Size":
        return [np.array(math.prod(_present(inputs, 0).shape), dtype=np.int64)]
    from onnx.reference import ReferenceEvaluator  # imported on first use: it loads every op

    plain = onnx.NodeProto()
    plain.CopyFrom(node)
    plain.domain = ""
    feeds = {name: value for name, value in zip(node.input, inputs, strict=False) if name and value is not None}
    if any(name and name not in feeds for name in node.input):
        raise EvaluationError("an input is missing")
    got = ReferenceEvaluator(plain, opsets={"": opset}).run(None, feeds)
    outputs = [np.asarray(g) for g in got]
    if len(outputs) < len([o for o in node.output if o]):
        raise EvaluationError("the reference evaluator returned fewer outputs than the node has")
    return outputs


def _check_types(
    node: onnx.NodeProto, inputs: Sequence[np.ndarray | None], outputs: list[np.ndarray], opset: int
) -> None:
    """Each result has the element type (and the static shape, where inferred) ONNX type inference gives."""
    schema = defs.get_schema(node.op_type, opset, "")
    types = {
        name: helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for name, v in zip(node.input, inputs, strict=False) if name and v is not None
    }
    plain = onnx.NodeProto()
    plain.CopyFrom(node)
    plain.domain = ""
    inferred = shape_inference.infer_node_outputs(schema, plain, types)
    for name, out in zip(node.output, outputs, strict=False):
        want = inferred.get(name) if name else None
        if want is None or not want.HasField("tensor_type"):
            continue
        tt = want.tensor_type
        got_type = helper.np_dtype_to_tensor_dtype(out.dtype)
        if tt.elem_type and tt.elem_type != got_type:
            raise EvaluationError(
                f"the reference evaluator returned {onnx.TensorProto.DataType.Name(got_type)} where ONNX type "
                f"inference gives {onnx.TensorProto.DataType.Name(tt.elem_type)}"
            )
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shape = tuple(d.dim_value for d in tt.shape.dim)
            if shape != out.shape:
                raise EvaluationError(
                    f"the reference evaluator returned shape {list(out.shape)} where ONNX shape inference "
                    f"gives {list(shape)}"
                )


def _present(inputs: Sequence[np.ndarray | None], i: int) -> np.ndarray:
    if i >= len(inputs) or inputs[i] is None:
        raise EvaluationError(f"input {i} is missing")
    value = inputs[i]
    assert value is not None
    return value


def _ints(value: np.ndarray) -> list[int]:
    if value.dtype.kind not in "iu":
        raise EvaluationError("a shape input is not integer")
    return [int(v) for v in value.reshape(-1)]


def _max_elements(node: onnx.NodeProto, inputs: Sequence[np.ndarray | None]) -> int:
    """An upper bound on the elements of any one output, computed without evaluating the node."""
    op = node.op_type
    present = [v for v in inputs if v is not None]
    if op == "CastLike":
        return int(_present(inputs, 0).size)
    if op in _ELEMENTWISE:
        return math.prod(np.broadcast_shapes(*(v.shape for v in present))) if present else 1
    if op in ("Shape", "Size"):
        return max(1, _present(inputs, 0).ndim)
    if op in _FIRST_BOUNDED:
        return int(_present(inputs, 0).size)
    if op == "GatherElements":
        return int(_present(inputs, 1).size)
    if op == "Concat":
        return sum(int(v.size) for v in present)
    if op == "Expand":
        target = tuple(max(d, 0) for d in _ints(_present(inputs, 1)))
        return math.prod(np.broadcast_shapes(_present(inputs, 0).shape, target))
    if op == "ConstantOfShape":
        return math.prod(max(d, 0) for d in _ints(_present(inputs, 0)))
    if op == "Tile":
        return int(_present(inputs, 0).size) * math.prod(max(r, 0) for r in _ints(_present(inputs, 1)))
    if op == "Range":
        start, limit, delta = (float(_present(inputs, i).reshape(-1)[0]) for i in range(3))
        if delta == 0 or not all(math.isfinite(v) for v in (start, limit, delta)):
            raise EvaluationError("Range with a zero or non-finite step")
        return max(math.ceil((limit - start) / delta), 0)
    if op == "Gather":
        data, indices = _present(inputs, 0), _present(inputs, 1)
        axis = int(attr(node, "axis", 0))
        along = data.shape[axis] if data.ndim else 1
        return int(indices.size) * (int(data.size) // max(along, 1))
    raise EvaluationError(f"{op} is not an op bnfold evaluates")


def _out_itemsize(node: onnx.NodeProto, inputs: Sequence[np.ndarray | None]) -> int:
    """Bytes per element of the widest output (an upper bound)."""
    op = node.op_type
    if op in ("Shape", "Size", "ArgMax", "ArgMin"):
        return 8
    if op in _BOOL_OUT:
        return 1
    if op == "Cast":
        to = int(attr(node, "to", onnx.TensorProto.FLOAT))
        try:
            return int(np.dtype(helper.tensor_dtype_to_np_dtype(to)).itemsize)
        except Exception:
            return 8
    if op == "ConstantOfShape":
        value = attr(node, "value")
        if isinstance(value, onnx.TensorProto):
            try:
                return int(np.dtype(helper.tensor_dtype_to_np_dtype(value.data_type)).itemsize)
            except Exception:
                return 8
        return 4
    if op in _FIRST_BOUNDED or op in ("Concat", "GatherElements", "Expand", "Tile", "Gather"):
        return int(_present(inputs, 0).dtype.itemsize)
    sizes = [v.dtype.itemsize for v in inputs if v is not None]
    return max(sizes, default=8)
