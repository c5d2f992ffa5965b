"""The fold pass: match everything (read-only), plan, apply to a copy, clean up, check.

``fold_onnx(model)`` never mutates ``model``; ``fold_in_place(model)`` folds a model nobody else holds
(one just loaded from a file) without copying it, reading tensors stored on disk through a
:class:`~bnfold.tensor_store.TensorStore` and spilling the new large tensors to it, so that memory does
not grow with the model. Within one graph it runs rounds until nothing more
folds (``Conv -> BN -> BN`` folds in two rounds); within a round every normalization is matched
against a read-only :class:`~bnfold.graph.GraphView`, accepted folds that touch disjoint nodes are
applied together, and overlapping ones wait for the next round. Subgraphs (If / Loop / Scan bodies) are
folded the same way, with the enclosing graphs' constants visible.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

import onnx

from bnfold.const_eval import is_pure
from bnfold.errors import BadInputError, BnfoldError, first_line
from bnfold.graph import GraphView, subgraphs, used_names
from bnfold.nodes import is_op
from bnfold.onnx_io import NameAllocator, StagedModel, checkable_copy
from bnfold.results import FoldedPair
from bnfold.rules import PRODUCER_RULES, affine, constants, select_rules
from bnfold.rules.base import Fold, FoldContext, FoldOptions, Norm, Skip
from bnfold.rules.batchnorm import NEVER_FOLDABLE, bn_norm
from bnfold.rules.blockers import forward_blocker
from bnfold.tensor_store import TensorStore

__all__ = ["FoldOptions", "FoldResult", "FoldedPair", "Skip", "count_nodes", "fold_in_place", "fold_onnx"]

log = logging.getLogger(__name__)

Source = Callable[[FoldContext, int], "Norm | Skip | None"]


def _bn_source(ctx: FoldContext, idx: int) -> Norm | Skip | None:
    node = ctx.view.node(idx)
    return bn_norm(ctx, idx) if is_op(node, "BatchNormalization") else None


SOURCES: tuple[Source, ...] = (_bn_source, affine.norm_source)
"""Where normalizations come from. Each returns a Norm to fold, a Skip to report, or None."""

_PRODUCERS = "Conv, ConvTranspose, Gemm, MatMul"


@dataclass
class FoldResult:
    """The folded model and an account of every normalization: folded, or left with a reason."""

    model: onnx.ModelProto
    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    staged: StagedModel | None = None
    """Set by ``bnfold.fold(..., output=PATH)``: the written model (``staged.path``, ``staged.data_files``,
    ``staged.nbytes``), committed to PATH unless ``commit=False`` was passed. ``model`` is then the model
    as written, its large tensors external-data references relative to ``staged.path``'s folder."""

    @property
    def changed(self) -> bool:
        return bool(self.folded)

    @property
    def bn_before(self) -> int:
        return sum(1 for p in self.folded if p.norm_op == "BatchNormalization") + self.bn_after

    @property
    def bn_after(self) -> int:
        return sum(1 for s in self.skipped if s.op_type == "BatchNormalization")


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes in ``graph`` and every nested subgraph."""
    return sum(1 + sum(count_nodes(g) for _, g in subgraphs(n)) for n in graph.node)


def fold_onnx(model: onnx.ModelProto, options: FoldOptions | None = None, *, check: bool = True) -> FoldResult:
    """Fold every foldable normalization of ``model`` into a copy; ``model`` is not modified."""
    options = options or FoldOptions()
    rules = _rules(options)
    if check:
        _check(model, "input model", BadInputError)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return _fold(out, options, rules, check, None)


def fold_in_place(
    model: onnx.ModelProto,
    options: FoldOptions | None = None,
    *,
    check: bool = True,
    store: TensorStore | None = None,
) -> FoldResult:
    """Fold ``model`` itself, for a model nobody else holds (``result.model is model``).

    ``store`` reads the tensors stored as external data (a model from ``onnx_io.load_lazily``); when it
    has a spill file, every new large tensor goes there as soon as its fold is accepted.
    """
    options = options or FoldOptions()
    rules = _rules(options)
    if check:
        _check(model, "input model", BadInputError)
    return _fold(model, options, rules, check, store)


def _rules(options: FoldOptions) -> tuple[ModuleType, ...]:
    """The selected rules; an unknown name is a caller's ValueError (the CLI checks names earlier)."""
    return select_rules(options.only, options.skip)


def _fold(
    out: onnx.ModelProto,
    options: FoldOptions,
    rules: tuple[ModuleType, ...],
    check: bool,
    store: TensorStore | None,
) -> FoldResult:
    names = NameAllocator(out)
    result = FoldResult(model=out, nodes_before=count_nodes(out.graph))
    orphans: set[str] = set()
    _fold_graph(out.graph, None, "", names, options, rules, result, orphans, store)
    result.skipped.extend(_in_functions(out))
    if result.folded:
        _remove_orphans(out.graph, orphans, options.initializers_as_constants)
        if 0 < out.ir_version < 4:
            _list_initializers_as_inputs(out.graph)
        if check:
            _check(out, "folded model", BnfoldError)
    result.nodes_after = count_nodes(out.graph)
    return result


def _in_functions(model: onnx.ModelProto) -> Iterator[Skip]:
    """Normalizations inside model-local functions: reported, not folded (a function's weights arrive as
    its inputs, so they are not constants of the function body)."""
    for f in model.functions:
        for node in f.node:
            if is_op(node, "BatchNormalization") or is_op(node, NEVER_FOLDABLE):
                yield Skip(output=node.output[0] if node.output else "", op_type=node.op_type,
                           reason=f"inside model-local function '{f.domain}:{f.name}': bnfold does not fold "
                           "inside function bodies", graph=f"function {f.domain}:{f.name}")


def _check(model: onnx.ModelProto, what: str, error: type[BnfoldError]) -> None:
    """onnx.checker on the graph: tensor bytes are left out (see ``onnx_io.checkable_copy``), so the
    check costs the same for a 10 GB model as for its structure alone."""
    try:
        onnx.checker.check_model(checkable_copy(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = first_line(exc)
        raise error(f"{what} fails onnx.checker: {first}") from exc


def _fold_graph(
    graph: onnx.GraphProto,
    parent: GraphView | None,
    path: str,
    names: NameAllocator,
    options: FoldOptions,
    rules: tuple[ModuleType, ...],
    result: FoldResult,
    orphans: set[str],
    store: TensorStore | None = None,
) -> None:
    keep = _spiller(store)
    if constants in rules:  # weights computed from constants become initializers before any matching
        first = GraphView(graph, parent=parent, path=path, opset=names.opset,
                          initializers_as_constants=options.initializers_as_constants, data=store)
        result.folded.extend(constants.materialize(
            FoldContext(first, names, options, opset=names.opset, rules=rules, producer_rules=PRODUCER_RULES),
            orphans))
    while True:
        view = GraphView(graph, parent=parent, path=path, opset=names.opset,
                         initializers_as_constants=options.initializers_as_constants, data=store)
        ctx = FoldContext(view, names, options, opset=names.opset, rules=rules, producer_rules=PRODUCER_RULES)
        accepted, skips, deferred = _plan(ctx, keep)
        if not accepted:
            break
        _apply(graph, accepted, orphans)
        result.folded.extend(
            FoldedPair(rule=f.rule, producer_op=f.producer_op, output=f.norm.output,
                       norm_op=f.norm.op_type, graph=path)
            for f in accepted
        )
        log.debug("%s: folded %d, deferred %d", path or "main graph", len(accepted), deferred)
    result.skipped.extend(skips)
    result.skipped.extend(_never_foldable(view))
    for idx, node in enumerate(graph.node):
        for attr_name, sub in subgraphs(node):
            sub_path = f"{path}/" if path else ""
            sub_path += f"{view.describe(idx)}.{attr_name}"
            _fold_graph(sub, view, sub_path, names, options, rules, result, orphans, store)


def _spiller(store: TensorStore | None) -> Callable[[Fold], Fold]:
    """What ``_plan`` does with an accepted fold: with a spill file, its new large tensors move to disk."""
    if store is None or store.spill_path is None:
        return lambda fold: fold

    def spill(fold: Fold) -> Fold:
        return dataclasses.replace(fold, tensors=tuple(store.spill(t) for t in fold.tensors))

    return spill


_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Deterministic ops a fold may leave unread (the original of a clone whose other readers only took its
shape, as the dynamo exporter's ``Shape(conv_out)`` for a computed BN scale): removed like pure ops."""

_MALFORMED = (ArithmeticError, ValueError, IndexError, KeyError, TypeError)
"""What reading a malformed node can raise. Matching only reads, so turning these into a refusal is safe."""


def _plan(ctx: FoldContext, keep: Callable[[Fold], Fold] = lambda fold: fold) -> tuple[list[Fold], list[Skip], int]:
    """Match every normalization against ``ctx.rules``; accept folds whose nodes do not overlap an earlier
    accepted fold. ``keep`` receives each accepted fold as it is accepted (and may move its new tensors to disk)."""
    accepted: list[Fold] = []
    skips: list[Skip] = []
    claimed: set[int] = set()
    deferred = 0
    for idx in range(len(ctx.view.graph.node)):
        for source in SOURCES:
            try:
                norm = source(ctx, idx)
            except _MALFORMED as exc:
                node = ctx.view.node(idx)
                log.warning("reading %s failed: %r", ctx.view.describe(idx), exc)
                if node.op_type != "BatchNormalization":
                    continue
                norm = ctx.skip(node.output[0] if node.output else "", node.op_type,
                                f"{ctx.view.describe(idx)} could not be read ({type(exc).__name__}: {exc})")
            if norm is None:
                continue
            if isinstance(norm, Skip):
                skips.append(norm)
                break
            outcome = _match(ctx, norm)
            if isinstance(outcome, Fold):
                if outcome.touched & claimed:
                    deferred += 1
                else:
                    accepted.append(keep(outcome))
                    claimed |= outcome.touched
            elif isinstance(outcome, Skip):
                skips.append(outcome)
            break
    return accepted, skips, deferred


def _match(ctx: FoldContext, norm: Norm) -> Fold | Skip | None:
    first_skip: Skip | None = None
    for rule in ctx.rules:
        try:
            outcome = rule.match(ctx, norm)
        except _MALFORMED as exc:
            # A malformed node (group=0, stride 0, inconsistent shapes) that a rule did not anticipate:
            # matching only reads, so refusing this one fold is always safe. Logged for the bug report.
            log.warning("rule %s failed on %s: %r", rule.NAME, norm.output, exc)
            outcome = ctx.skip(norm.output, norm.op_type,
                               f"rule '{rule.NAME}' could not analyse this pattern ({type(exc).__name__}: "
                               f"{exc}); left unfolded")
        if isinstance(outcome, Fold):
            return outcome
        if isinstance(outcome, Skip) and first_skip is None:
            first_skip = outcome
    if first_skip is not None:
        return first_skip
    if norm.op_type != "BatchNormalization":
        return None
    view = ctx.view
    producer = view.producer_of(norm.input)
    if producer is None:
        where = "a graph input" if norm.input in view.graph_inputs else "not produced by any node here"
        reason = f"its input '{norm.input}' is {where}: there is no producer to fold into"
    else:
        reason = (
            f"its input '{norm.input}' comes from {view.describe(producer)}, which is not a linear op "
            f"with constant weights that the enabled rules ({', '.join(r.NAME for r in ctx.rules) or 'none'}) "
            f"fold into ({_PRODUCERS})"
        )
    blocker = forward_blocker(ctx, norm)
    return ctx.skip(norm.output, norm.op_type, f"{reason}; {blocker}" if blocker else reason)


def _never_foldable(view: GraphView) -> Iterator[Skip]:
    for node in view.graph.node:
        if is_op(node, NEVER_FOLDABLE):
            yield Skip(output=node.output[0] if node.output else "", op_type=node.op_type,
                       reason=NEVER_FOLDABLE[node.op_type], graph=view.path)


def _apply(graph: onnx.GraphProto, folds: list[Fold], orphans: set[str]) -> None:
    """Write accepted folds into ``graph``. Every value was computed during matching: nothing here can fail."""
    replace: dict[int, onnx.NodeProto] = {}
    remove: set[int] = set()
    before: dict[int, tuple[onnx.NodeProto, ...]] = {}
    for f in folds:
        replace.update(f.replace)
        remove.update(f.remove)
        before.update(f.insert_before)
    for idx in list(replace) + list(remove):
        node = graph.node[idx]
        orphans.update(n for n in node.input if n)
        orphans.update(n for n in node.output if n)
    nodes: list[onnx.NodeProto] = []
    for idx, node in enumerate(graph.node):
        nodes.extend(before.get(idx, ()))
        if idx in remove:
            continue
        nodes.append(replace.get(idx, node))
    del graph.node[:]
    graph.node.extend(nodes)
    for f in folds:
        graph.initializer.extend(f.tensors)


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR < 4 requires every initializer to be a graph input too: list the folded tensors there."""
    listed = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    # main graph only: a Loop / Scan / If body's inputs are its signature, not a list of initializers


def _remove_orphans(graph: onnx.GraphProto, candidates: set[str], drop_inputs: bool) -> None:
    """Drop initializers, value_info, Constant nodes and nodes of evaluable ops (the constant subgraphs
    that computed a folded parameter, ``const_eval.PURE_OPS``) that folds left unused. Only those:
    ``candidates`` starts as the tensors of the nodes folds replaced or removed and grows by the inputs
    of each node dropped here, so what was dead before bnfold ran is not its business."""
    for node in graph.node:
        for _, sub in subgraphs(node):
            _remove_orphans(sub, candidates, drop_inputs)
    _remove_dead_nodes(graph, candidates)
    live = _reads(graph)
    inputs = {i.name for i in graph.input}
    dead_init = {
        t.name for t in graph.initializer
        if t.name in candidates and t.name not in live and (drop_inputs or t.name not in inputs)
    }
    if dead_init:  # deleted where they are: rebuilding the list would copy every tensor's bytes
        for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in dead_init]):
            del graph.initializer[i]
        if drop_inputs:
            keep_inputs = [i for i in graph.input if i.name not in dead_init]
            del graph.input[:]
            graph.input.extend(keep_inputs)
    defined = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    defined |= {t.name for t in graph.initializer}
    stale = [v for v in graph.value_info if v.name in candidates and v.name not in defined]
    if stale:
        keep_vi = [v for v in graph.value_info if not (v.name in candidates and v.name not in defined)]
        del graph.value_info[:]
        graph.value_info.extend(keep_vi)


def _remove_dead_nodes(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop Constant and evaluable-op nodes none of whose outputs is read, one of them a candidate,
    consumers before producers (so a whole dead chain goes in one sweep); ``candidates`` grows by the
    tensors of every node dropped."""
    readers: Counter[str] = Counter(o.name for o in graph.output)
    for node in graph.node:
        readers.update({n for n in node.input if n})
        for _, sub in subgraphs(node):
            readers.update(used_names(sub))
    dead: set[int] = set()
    changed = True
    while changed:  # one sweep suffices for a topologically sorted graph; more only for an unsorted one
        changed = False
        for idx in range(len(graph.node) - 1, -1, -1):
            node = graph.node[idx]
            outs = [o for o in node.output if o]
            if idx in dead or not outs or not (is_op(node, "Constant") or is_pure(node) or is_op(node, _LINEAR)):
                continue
            if any(readers[o] for o in outs):
                continue
            if not any(o in candidates for o in outs):
                continue
            dead.add(idx)
            changed = True
            ins = {n for n in node.input if n}
            readers.subtract(ins)
            candidates.update(ins)
            candidates.update(outs)
    if dead:
        keep = [n for i, n in enumerate(graph.node) if i not in dead]
        del graph.node[:]
        graph.node.extend(keep)


def _reads(graph: onnx.GraphProto) -> set[str]:
    reads = {o.name for o in graph.output}
    for node in graph.node:
        reads.update(n for n in node.input if n)
        for _, sub in subgraphs(node):
            reads |= used_names(sub)
    return reads
