"""What every rule shares: the values passed between matching and applying, and common checks.

A *normalization* (:class:`Norm`) is a fixed per-channel affine map found in the graph (a
BatchNormalization in inference mode, or a ``Mul``/``Add`` by a constant). A *rule* reads the graph
through a :class:`FoldContext` and turns a ``Norm`` into a :class:`Fold` (every new tensor already
computed and rounded, every new node already built) or a :class:`Skip` (a sentence naming the tensor or
node), or returns ``None`` when the pattern is not its own. Rules never mutate anything but the name
allocator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.folding.math import Affine, RoundingError, round_to
from bnfold.folding.options import FoldOptions
from bnfold.folding.result import Skip
from bnfold.io.dtypes import is_float, np_dtype
from bnfold.ir.names import NameAllocator
from bnfold.ir.nodes import is_op
from bnfold.ir.view import GraphView

__all__ = [
    "FLOAT_TYPES",
    "Fold",
    "FoldContext",
    "FoldOptions",
    "Norm",
    "RuleInfo",
    "Skip",
    "by_blocking",
    "clone_refusal",
    "constant_or_skip",
    "copy_node",
    "float_constant",
    "new_tensor",
    "non_float_skip",
    "producer_fold",
    "producer_index",
    "rounding_skip",
    "sole_consumer_skip",
    "unique_node_name",
    "weight_and_bias",
]


def _writable_float(elem: int) -> bool:
    """A floating-point type of 16 bits or more (not float8/6/4): what a folded weight is rounded to."""
    dtype = np_dtype(elem)
    return dtype is not None and is_float(dtype) and dtype.itemsize >= 2


FLOAT_TYPES: frozenset[int] = frozenset(t for t in onnx.TensorProto.DataType.values() if _writable_float(t))
"""ONNX element types a weight may have to be folded: FLOAT16, BFLOAT16, FLOAT, DOUBLE."""


@dataclass(frozen=True)
class Norm:
    """A fixed per-channel affine map ``output = scale * input + shift`` on axis ``channel_axis``.

    ``nodes`` are the indices (in the view's graph) of the nodes that compute it; a fold removes them.
    """

    nodes: tuple[int, ...]
    input: str
    output: str
    affine: Affine
    channel_axis: int
    op_type: str


@dataclass(frozen=True)
class Fold:
    """An accepted fold, fully decided: applying it cannot fail.

    ``replace`` maps node indices to their new NodeProtos (the producer rewritten with folded weights and
    the normalization's output name); ``remove`` are node indices deleted; ``insert_before`` maps a node
    index to new nodes placed just before it (clones); ``tensors`` are new initializers.
    """

    rule: str
    producer_op: str
    norm: Norm
    replace: dict[int, onnx.NodeProto]
    remove: tuple[int, ...]
    tensors: tuple[onnx.TensorProto, ...]
    insert_before: dict[int, tuple[onnx.NodeProto, ...]] = field(default_factory=dict)

    @property
    def touched(self) -> frozenset[int]:
        return frozenset(self.replace) | frozenset(self.remove) | frozenset(self.insert_before)

    def new_nodes(self) -> list[onnx.NodeProto]:
        return [*self.replace.values(), *(n for nodes in self.insert_before.values() for n in nodes)]

    def reads(self) -> frozenset[str]:
        """Tensors the fold's new nodes read."""
        return frozenset(name for node in self.new_nodes() for name in node.input if name)

    def drops(self, graph: onnx.GraphProto) -> frozenset[str]:
        """Tensors of ``graph`` whose value the fold may change or remove: every output of the nodes it
        replaces or removes, but for the one it keeps computing by design (``norm.output``: a backward fold's
        producer writes the normalization's output; a forward fold's first consumer its own). Conservative:
        a fold that conflicts with another only waits for the next round."""
        old = [graph.node[i] for i in (*self.replace, *self.remove)]
        return frozenset(name for node in old for name in node.output if name and name != self.norm.output)


@dataclass
class FoldContext:
    """What a rule may read (the view, the options) and the one thing it may change (fresh names)."""

    view: GraphView
    names: NameAllocator
    options: FoldOptions
    opset: int = 0
    """The model's default-domain (``ai.onnx``) opset version; 0 when unknown."""
    rules: tuple[ModuleType, ...] = ()
    """The rules the pass runs, in order (``--only`` / ``--skip`` applied): ``bnfold.folding.rules.select_rules``."""
    producer_rules: tuple[ModuleType, ...] = ()
    """Every rule that folds into a producer, selected or not (``bnfold.folding.rules.PRODUCER_RULES``): the
    pattern rules hand the normalizations they find to these."""

    def skip(self, norm_output: str, op_type: str, reason: str) -> Skip:
        return Skip(output=norm_output, op_type=op_type, reason=reason, graph=self.view.path)

    def runs(self, rule: str) -> bool:
        """Whether the pass runs the rule named ``rule`` itself."""
        return rule in {r.NAME for r in self.rules}


@dataclass(frozen=True)
class RuleInfo:
    """A rule as the CLI lists it: its name, summary and documentation (its module header)."""

    name: str
    summary: str
    doc: str


def constant_or_skip(ctx: FoldContext, name: str, role: str, norm: Norm) -> np.ndarray | Skip:
    """The value of constant ``name`` or a Skip saying why it is not one (``role``: 'weight', ...)."""
    found = ctx.view.constant(name)
    if found.value is None:
        return ctx.skip(norm.output, norm.op_type, f"{role} '{name}' {found.why_not}")
    return found.value


def weight_and_bias(
    ctx: FoldContext, norm: Norm, node: onnx.NodeProto, desc: str, roles: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray | None] | Skip:
    """Inputs 1 and 2 of an ``op(X, W, B?)`` producer as constants: the weight (floating point) and the
    optional bias, or the Skip naming the one that is missing, not a float, or not a constant.
    ``roles`` names them in messages: ("weight", "bias") for Conv, ("B", "C") for Gemm."""
    w_role, b_role = roles
    if len(node.input) < 2 or not node.input[1]:
        return ctx.skip(norm.output, norm.op_type, f"{desc} has no {w_role} input")
    weight = float_constant(ctx, norm, node.input[1], w_role, desc)
    if isinstance(weight, Skip):
        return weight
    if len(node.input) < 3 or not node.input[2]:
        return weight, None
    bias = constant_or_skip(ctx, node.input[2], f"{b_role} of {desc}", norm)
    return bias if isinstance(bias, Skip) else (weight, bias)


def float_constant(ctx: FoldContext, norm: Norm, name: str, role: str, owner: str) -> np.ndarray | Skip:
    """Constant ``name``, input ``role`` ("weight", "B") of node ``owner``, as a floating-point array; or the
    Skip saying that its element type is not a float, or that it is not a constant (and why)."""
    not_float = non_float_skip(ctx, norm, name, f"{role} '{name}' of {owner}")
    if not_float is not None:
        return not_float
    return constant_or_skip(ctx, name, f"{role} of {owner}", norm)


def producer_index(ctx: FoldContext, name: str, op: str) -> int | None:
    """The index of the default-domain ``op`` node writing tensor ``name``; None when another node (or
    none) writes it: the pattern is then not this rule's."""
    producer = ctx.view.producer_of(name)
    return producer if producer is not None and is_op(ctx.view.node(producer), op) else None


def sole_consumer_skip(ctx: FoldContext, producer: int, norm: Norm) -> Skip | None:
    """A Skip if the producer's output feeds anything besides the normalization, or is a graph output."""
    view = ctx.view
    out = view.node(producer).output[0]
    if view.is_graph_output(out):
        return ctx.skip(
            norm.output,
            norm.op_type,
            f"output '{out}' of {view.describe(producer)} is also a graph output, so it must keep its "
            "unnormalized values",
        )
    others = by_blocking(view, out, [i for i in view.consumers_of(out) if i not in norm.nodes])
    if others:
        return ctx.skip(
            norm.output,
            norm.op_type,
            f"output '{out}' of {view.describe(producer)} also feeds {view.describe(others[0])}"
            + (f" and {len(others) - 1} more" if len(others) > 1 else ""),
        )
    return None


_TYPE_READERS = {"Shape": 0, "Size": 0, "CastLike": 1}
"""Ops that read an input (at this position) for its shape or element type only, never its values."""


def by_blocking(view: GraphView, name: str, readers: Sequence[int]) -> list[int]:
    """``readers`` of ``name`` with those that read its values first (a residual Add, a Relu), those that
    read only its shape or type (``Shape``, ``Size``, ``CastLike``'s target) last: a message names the
    real blocker first."""
    def type_only(idx: int) -> bool:
        node = view.node(idx)
        pos = _TYPE_READERS.get(node.op_type) if not node.domain or node.domain == "ai.onnx" else None
        return pos is not None and [i for i, n in enumerate(node.input) if n == name] == [pos]

    return sorted(readers, key=type_only)


def non_float_skip(ctx: FoldContext, norm: Norm, name: str, role: str) -> Skip | None:
    """A Skip when constant ``name`` (``role``: "weight 'W' of Conv 'c'") is known to have an element
    type other than :data:`FLOAT_TYPES`; None when it is a float or its type is not known yet."""
    elem = ctx.view.constant_dtype(name)
    if elem is None or elem in FLOAT_TYPES:
        return None
    return ctx.skip(norm.output, norm.op_type, f"{role} has element type "
                    f"{onnx.TensorProto.DataType.Name(elem)}, not a floating-point type")


def clone_refusal(ctx: FoldContext, norm: Norm, conflict: Skip, extra_bytes: int) -> Skip | None:
    """Whether a producer that has other users (``conflict``, from :func:`sole_consumer_skip`) may be
    cloned: None when it may (``options.clone`` and ``extra_bytes`` within ``options.max_clone_bytes``),
    else the Skip to report. The clone carries the folded weights and writes the normalization's output;
    the original keeps its other users, so ``extra_bytes`` is the data size of the new folded tensors (what
    the file grows by, less a few bytes of header); rules call this before computing them."""
    if not ctx.options.clone:
        return ctx.skip(norm.output, norm.op_type, f"{conflict.reason}; cloning it is turned off")
    limit = ctx.options.max_clone_bytes
    if extra_bytes > limit:
        return ctx.skip(
            norm.output, norm.op_type,
            f"{conflict.reason}; a clone carrying the folded weights would add {extra_bytes} bytes, more "
            f"than the {limit} allowed (max_clone_bytes)",
        )
    return None


def copy_node(
    node: onnx.NodeProto,
    *,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    name: str | None = None,
) -> onnx.NodeProto:
    """A copy of ``node`` (attributes, domain, doc string and all) with new inputs, outputs or name."""
    new = onnx.NodeProto()
    new.CopyFrom(node)
    if inputs is not None:
        del new.input[:]
        new.input.extend(inputs)
    if outputs is not None:
        del new.output[:]
        new.output.extend(outputs)
    if name is not None:
        new.name = name
    return new


def producer_fold(
    ctx: FoldContext,
    rule: str,
    producer: int,
    norm: Norm,
    new_node: onnx.NodeProto,
    tensors: tuple[onnx.TensorProto, ...],
    *,
    clone: bool,
) -> Fold:
    """The Fold writing ``new_node`` (the producer with folded weights, writing ``norm.output``): in the
    producer's place, or with ``clone`` (the producer keeps other users) as a clone just before it."""
    op = ctx.view.node(producer).op_type
    if clone:
        return Fold(rule=rule, producer_op=op, norm=norm, replace={}, remove=norm.nodes, tensors=tensors,
                    insert_before={producer: (new_node,)})
    return Fold(rule=rule, producer_op=op, norm=norm, replace={producer: new_node}, remove=norm.nodes,
                tensors=tensors)


def unique_node_name(view: GraphView, node: onnx.NodeProto) -> str:
    """A name for a clone of ``node``: empty if the original has none, else one no node here uses."""
    if not node.name:
        return ""
    taken = {n.name for n in view.graph.node}
    base = f"{node.name}_bnfold_clone"
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


_BNFOLD_SUFFIX = re.compile(r"(_bnfold(_bias)?(_\d+)?)+(?=_bnfold(_bias)?$)")


def new_tensor(
    ctx: FoldContext, values64: np.ndarray, dtype: np.dtype, base: str, what: str
) -> onnx.TensorProto:
    """Round ``values64`` once to ``dtype`` and wrap it in a TensorProto with a fresh name.

    Raises ``RoundingError`` (the caller turns it into a Skip) on overflow or non-finite values.
    """
    rounded = round_to(values64, dtype, what)
    return numpy_helper.from_array(rounded, ctx.names.fresh(_BNFOLD_SUFFIX.sub("", base)))


def rounding_skip(ctx: FoldContext, norm: Norm, exc: RoundingError) -> Skip:
    return ctx.skip(norm.output, norm.op_type, str(exc))
