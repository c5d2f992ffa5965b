"""Tensor shapes for the rules that must prove where a channel axis goes (affine, layout, bn_conv).

Shapes are propagated forward over one graph from what is certain: graph input types (onnxruntime
checks feeds against them), constants, and each op's own semantics (read from its attributes *and*
inputs, so no opset number is needed: ``Squeeze(axes=...)`` and ``Squeeze(x, axes)`` are both read).
``value_info`` is deliberately not trusted: nothing checks it at run time, and a stale entry must
never turn into a wrong fold. An op this module does not know gives an unknown shape (``None``), and
every rule treats unknown as "cannot prove": it refuses, it never guesses.

A dimension is a :class:`Dim`: a product ``coef * s1 * s2 * ...`` of a known integer and symbols
(one per tensor axis whose size is not known; a ``dim_param`` name is not trusted to mean the same
size in two tensors). Two dimensions are provably equal when their products are identical, which is
what a Reshape proof needs (``[N, C, H, W] -> [0, C, -1]``: the copied ``N`` is the same symbol on
both sides).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.ir.inferred import inferred_dims
from bnfold.ir.nodes import attr, is_op
from bnfold.ir.view import GraphView

__all__ = ["ONE", "Dim", "Shape", "const_dims", "int_list", "product", "rank_of", "reshape_dims", "shape_of",
           "sliced_shape"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dim:
    """``coef * prod(syms)``: a dimension as a product of a known integer and symbols."""

    coef: int
    syms: tuple[str, ...] = ()

    @property
    def value(self) -> int | None:
        """The integer value when the dimension is known."""
        return self.coef if not self.syms else None

    def __mul__(self, other: Dim) -> Dim:
        return Dim(self.coef * other.coef, tuple(sorted(self.syms + other.syms)))

    def divide(self, other: Dim) -> Dim | None:
        """``self / other`` when it is provably a whole product, else None."""
        if other.coef == 0 or self.coef % other.coef:
            return None
        rest = list(self.syms)
        for s in other.syms:
            if s not in rest:
                return None
            rest.remove(s)
        return Dim(self.coef // other.coef, tuple(rest))

    def __str__(self) -> str:
        if not self.syms:
            return str(self.coef)
        text = "*".join(self.syms)
        return text if self.coef == 1 else f"{self.coef}*{text}"


Shape = tuple[Dim, ...]
ONE = Dim(1)
MEMO_KEY = "shapes"
"""Where a view keeps the shapes propagated over its graph (:meth:`GraphView.memo`)."""


def product(dims: Sequence[Dim]) -> Dim:
    out = ONE
    for d in dims:
        out = out * d
    return out


def const_dims(view: GraphView, name: str) -> tuple[int, ...] | None:
    """Dimensions of a constant (or an initializer listed as an input) without decoding big data."""
    v: GraphView | None = view
    while v is not None:
        if name in v.initializers:
            return tuple(int(d) for d in v.initializers[name].dims)
        if name in v.producer:
            dims = _constant_node_dims(v.node(v.producer[name]))
            if dims is not None:
                return dims
            break
        if name in v.graph_inputs:
            break
        v = v.parent
    value = view.constant(name).value
    return tuple(int(d) for d in value.shape) if value is not None else None


def _constant_node_dims(node: onnx.NodeProto) -> tuple[int, ...] | None:
    """The dims of a ``Constant`` node's value, read from the attribute without decoding the data."""
    if not is_op(node, "Constant"):
        return None
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return tuple(int(d) for d in a.t.dims)
        if a.name in ("value_float", "value_int"):
            return ()
        if a.name == "value_floats":
            return (len(a.floats),)
        if a.name == "value_ints":
            return (len(a.ints),)
    return None


PARTIAL_KEY = "shapes.partial"
"""The view memo holding the shapes propagated so far (complete once ``shape_of`` has returned)."""


def shape_of(view: GraphView, name: str) -> Shape | None:
    """The shape of tensor ``name`` in ``view``'s graph (or an enclosing one), None when unknown. The
    shapes of a graph are propagated once, on first use, and kept with its view."""
    shapes = view.memo(MEMO_KEY, _propagate)
    if name in shapes:
        return shapes[name]
    if view.parent is not None and name not in view.producer and name not in view.graph_inputs:
        return shape_of(view.parent, name)
    return None


def rank_of(view: GraphView, name: str) -> int | None:
    """The rank of tensor ``name``, None when unknown."""
    shape = shape_of(view, name)
    return None if shape is None else len(shape)


# -- propagation -----------------------------------------------------------------------------------

def _unknown(tensor: str, axis: int) -> Dim:
    return Dim(1, (f"?{tensor}#{axis}",))


def _from_type(vi: onnx.ValueInfoProto) -> Shape | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:  # 0 and -1 (paddle2onnx) are dynamic
            dims.append(Dim(int(d.dim_value)))
        else:
            # a dim_param is not checked by onnxruntime across tensors: one symbol per tensor axis
            dims.append(_unknown(vi.name, i))
    return tuple(dims)


_SAME_SHAPE = frozenset({
    "Identity", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Cast", "CastLike", "Clip", "Dropout", "BatchNormalization",
    "InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax", "LogSoftmax",
    "Hardmax", "LpNormalization", "MeanVarianceNormalization", "Sin", "Cos", "Not", "IsNaN", "IsInf",
    "ThresholdedRelu", "Shrink", "Swish",
})
_BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
})
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOL = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


def _propagate(view: GraphView) -> dict[str, Shape | None]:
    shapes: dict[str, Shape | None] = {}
    view.memo(PARTIAL_KEY, lambda _: shapes)  # filled as it goes: what a Shape evaluated meanwhile reads
    graph = view.graph
    for vi in graph.input:
        if vi.name not in view.initializers:
            shapes[vi.name] = _from_type(vi)
    for t in graph.initializer:
        shapes[t.name] = tuple(Dim(int(d)) for d in t.dims)

    def get(name: str) -> Shape | None:
        if not name:
            return None
        if name in shapes:
            return shapes[name]
        return shape_of(view.parent, name) if view.parent is not None else None

    for idx, node in enumerate(graph.node):
        try:
            outs = _infer(view, node, get)
        except (ValueError, IndexError, TypeError, ZeroDivisionError) as exc:
            log.debug("no shape for %s: %s", view.describe(idx), exc)
            outs = {}
        for name in node.output:
            if name:
                shapes[name] = outs.get(name) or _seeded(view, name)
    return shapes


def _seeded(view: GraphView, name: str) -> Shape | None:
    """What onnx shape inference proves where the propagation knows nothing (see :mod:`.inferred`)."""
    dims = inferred_dims(view, name)
    if dims is None:
        return None
    return tuple(Dim(d) if d is not None else _unknown(name, i) for i, d in enumerate(dims))


def int_list(view: GraphView, node: onnx.NodeProto, name: str, input_pos: int) -> list[int] | None:
    """An int list given as attribute ``name`` (older opsets) or as constant input ``input_pos``."""
    value = attr(node, name)
    if value is not None:
        return [int(v) for v in value]
    if len(node.input) > input_pos and node.input[input_pos]:
        found = view.constant(node.input[input_pos]).value
        if found is None or found.dtype.kind not in "iu":
            raise ValueError("non-constant integer input")
        return [int(v) for v in np.asarray(found).reshape(-1)]
    return None


def _broadcast(shapes: list[Shape], out: str) -> Shape:
    rank = max(len(s) for s in shapes)
    padded = [(ONE,) * (rank - len(s)) + tuple(s) for s in shapes]
    dims = []
    for axis in range(rank):
        column = {p[axis] for p in padded} - {ONE}
        dims.append(column.pop() if len(column) == 1 else (ONE if not column else _unknown(out, axis)))
    return tuple(dims)


def _conv_spatial(node: onnx.NodeProto, x: Shape, kernel: Sequence[int], out: str) -> list[Dim]:
    n = len(kernel)
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    pads = list(attr(node, "pads", [0] * (2 * n)))
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    dims: list[Dim] = []
    for i in range(n):
        size = x[2 + i].value
        if size is None or attr(node, "ceil_mode", 0):
            dims.append(_unknown(out, 2 + i))
            continue
        eff = (kernel[i] - 1) * dilations[i] + 1
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            dims.append(Dim(-(-size // strides[i])))
        elif auto == "VALID":
            dims.append(Dim((size - eff) // strides[i] + 1))
        else:
            dims.append(Dim((size + pads[i] + pads[i + n] - eff) // strides[i] + 1))
    return dims


def _infer(
    view: GraphView, node: onnx.NodeProto, get_shape: Callable[[str], Shape | None]
) -> dict[str, Shape | None]:
    op = node.op_type
    if not is_op(node, op) or not node.output:
        return {}
    out = node.output[0]
    x = get_shape(node.input[0]) if node.input else None
    if op == "Constant":
        dims = _constant_node_dims(node)
        return {out: tuple(Dim(d) for d in dims)} if dims is not None else {}
    if op in _SAME_SHAPE:
        return {out: x} if x is not None else {}
    if op in _BROADCAST:
        inputs = [get_shape(n) for n in node.input]
        known = [s for s in inputs if s is not None]
        if len(known) != len(inputs) or attr(node, "broadcast") is not None:
            return {}
        return {out: _broadcast(known, out)}
    if op in ("Conv", "ConvTranspose") and x is None:  # the weight proves the rank and the channels
        w = const_dims(view, node.input[1]) if len(node.input) > 1 else None
        if w is None or len(w) < 3:
            return {}
        channels = w[1] * int(attr(node, "group", 1)) if op == "ConvTranspose" else w[0]
        return {out: (_unknown(out, 0), Dim(channels), *(_unknown(out, i) for i in range(2, len(w))))}
    if x is None:
        return {}
    if op in ("Conv", "ConvTranspose"):
        w = const_dims(view, node.input[1]) if len(node.input) > 1 else None
        if w is None or len(w) != len(x) or len(w) < 3:
            return {}
        if op == "ConvTranspose":
            group = int(attr(node, "group", 1))
            return {out: (x[0], Dim(w[1] * group), *(_unknown(out, i) for i in range(2, len(w))))}
        kernel = list(attr(node, "kernel_shape", w[2:]))
        return {out: (x[0], Dim(w[0]), *_conv_spatial(node, x, kernel, out))}
    if op in _POOL:
        kernel = attr(node, "kernel_shape")
        if kernel is None or len(x) < 3:
            return {}
        return {out: (x[0], x[1], *_conv_spatial(node, x, list(kernel), out))}
    if op in _GLOBAL_POOL:
        return {out: (x[0], x[1], *([ONE] * (len(x) - 2)))} if len(x) >= 3 else {}
    if op == "Gemm":
        b = get_shape(node.input[1])
        if b is None or len(x) != 2 or len(b) != 2:
            return {}
        m = x[1] if attr(node, "transA", 0) else x[0]
        n = b[0] if attr(node, "transB", 0) else b[1]
        return {out: (m, n)}
    if op == "MatMul":
        b = get_shape(node.input[1])
        if b is None or not x or not b:
            return {}
        if len(x) == 1 and len(b) == 1:
            return {out: ()}
        if len(x) == 1:
            return {out: (*b[:-2], b[-1])}
        if len(b) == 1:
            return {out: x[:-1]}
        batch = _broadcast([x[:-2], b[:-2]], out) if (len(x) > 2 or len(b) > 2) else ()
        return {out: (*batch, x[-2], b[-1])}
    if op == "Transpose":
        perm = attr(node, "perm")
        order = [int(p) for p in perm] if perm is not None else list(range(len(x)))[::-1]
        if sorted(order) != list(range(len(x))):
            return {}
        return {out: tuple(x[p] for p in order)}
    if op == "Unsqueeze":
        axes = int_list(view, node, "axes", 1)
        if axes is None:
            return {}
        rank = len(x) + len(axes)
        norm = sorted(a + rank if a < 0 else a for a in axes)
        grown = list(x)
        for a in norm:
            grown.insert(a, ONE)
        return {out: tuple(grown)} if len(set(norm)) == len(norm) and all(0 <= a < rank for a in norm) else {}
    if op == "Squeeze":
        axes = int_list(view, node, "axes", 1)
        if axes == []:
            return {}  # an empty axes tensor: runtimes differ on what it means
        if axes is None:
            if any(d.value is None for d in x):
                return {}
            return {out: tuple(d for d in x if d.value != 1)}
        drop = {a + len(x) if a < 0 else a for a in axes}
        return {out: tuple(d for i, d in enumerate(x) if i not in drop)}
    if op == "Flatten":
        axis = int(attr(node, "axis", 1))
        axis = axis + len(x) if axis < 0 else axis
        return {out: (product(x[:axis]), product(x[axis:]))}
    if op == "Reshape":
        target = int_list(view, node, "shape", 1)
        if target is None:
            return {}
        return {out: reshape_dims(x, target, bool(attr(node, "allowzero", 0)), out)}
    if op == "Shape" and attr(node, "start") is None and attr(node, "end") is None:
        return {out: (Dim(len(x)),)}
    return {}


def reshape_dims(x: Shape, target: Sequence[int], allowzero: bool, out: str) -> Shape:
    """Reshape's output dims: ``0`` copies the input dim (unless ``allowzero``), ``-1`` is inferred."""
    if sum(1 for s in target if s == -1) > 1:
        raise ValueError(f"bad reshape target {list(target)}")
    dims: list[Dim | None] = []
    for i, s in enumerate(target):
        if s == 0 and not allowzero:
            dims.append(x[i])
        elif s == -1:
            dims.append(None)
        elif s < 0:
            raise ValueError(f"bad reshape target {list(target)}")
        else:
            dims.append(Dim(int(s)))
    if None in dims:
        known = product([d for d in dims if d is not None])
        inferred = product(x).divide(known)
        dims[dims.index(None)] = inferred if inferred is not None else _unknown(out, dims.index(None))
    return tuple(d for d in dims if d is not None)


def sliced_shape(view: GraphView, node: onnx.NodeProto, name: str) -> tuple[int, ...] | None:
    """The shape of ``name`` (a node's output) as far as ``Shape`` / ``Size`` of ``node`` reads it,
    from the shapes proven by each op's semantics (``bnfold.ir.shapes``, never ``value_info``):
    ``Shape(conv_out, start=1, end=2)`` needs only the channel count, which the weight fixes. Axes
    the slice does not read stand as 1. None when a dimension it reads is not known. Only for a
    ``Shape`` with ``start`` / ``end`` (opset 15+, as the dynamo exporter writes every Shape): a plain
    ``Shape(t)`` of a node's output stays a run-time value, as it always was here."""
    partial = view._memo.get(PARTIAL_KEY)
    in_progress = isinstance(partial, dict) and MEMO_KEY not in view._memo  # propagation reads constants
    dims = partial.get(name) if in_progress and isinstance(partial, dict) else shape_of(view, name)
    if dims is None:
        return None
    rank = len(dims)
    wanted = range(rank)
    if node.op_type == "Shape":
        start, end = int(attr(node, "start", 0)), attr(node, "end")
        wanted = range(rank)[start:None if end is None else int(end)]
    values = [d.value for d in dims]
    if any(values[i] is None for i in wanted):
        return None
    return tuple(int(v) if i in wanted and v is not None else 1 for i, v in enumerate(values))
