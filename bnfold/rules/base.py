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
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.folding import Affine, RoundingError, round_to
from bnfold.graph import GraphView
from bnfold.onnx_io import NameAllocator

__all__ = [
    "Fold",
    "FoldContext",
    "FoldOptions",
    "Norm",
    "RuleInfo",
    "Skip",
    "clone_refusal",
    "constant_or_skip",
    "new_tensor",
    "sole_consumer_skip",
    "unique_node_name",
]


@dataclass(frozen=True)
class FoldOptions:
    """Switches that change what may be folded. Defaults are the safe choice."""

    initializers_as_constants: bool = False
    """Treat initializers that are also graph inputs (IR < 4 models) as constants."""
    only: frozenset[str] | None = None
    """Run only these rules (by name); None runs all."""
    skip: frozenset[str] = frozenset()
    """Rules not to run."""
    clone: bool = True
    """Allow cloning a producer whose output has other consumers (rules that support it)."""
    max_clone_bytes: int = 1 << 20
    """Largest extra weight a clone may add."""


@dataclass(frozen=True)
class Skip:
    """A normalization left in the graph, and why."""

    output: str
    op_type: str
    reason: str
    graph: str = ""


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


@dataclass
class FoldContext:
    """What a rule may read (the view, the options) and the one thing it may change (fresh names)."""

    view: GraphView
    names: NameAllocator
    options: FoldOptions
    opset: int = 0
    """The model's default-domain (``ai.onnx``) opset version; 0 when unknown."""

    def skip(self, norm_output: str, op_type: str, reason: str) -> Skip:
        return Skip(output=norm_output, op_type=op_type, reason=reason, graph=self.view.path)


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
    others = [i for i in view.consumers_of(out) if i not in norm.nodes]
    if others:
        return ctx.skip(
            norm.output,
            norm.op_type,
            f"output '{out}' of {view.describe(producer)} also feeds {view.describe(others[0])}"
            + (f" and {len(others) - 1} more" if len(others) > 1 else ""),
        )
    return None


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
    name = ctx.names.fresh(_BNFOLD_SUFFIX.sub("", base))
    spill = getattr(ctx.view.data, "spill_array", None)  # a large model's store writes it to disk at once
    spilled = spill(rounded, name) if spill is not None else None
    return spilled if spilled is not None else numpy_helper.from_array(rounded, name)


def rounding_skip(ctx: FoldContext, norm: Norm, exc: RoundingError) -> Skip:
    return ctx.skip(norm.output, norm.op_type, str(exc))
