"""The fold pass: match everything (read-only), plan, apply, clean up, check.

``fold_model(model)`` folds a copy (or, ``copy=False``, a model nobody else holds, without copying it),
reading tensors stored on disk through a ``data`` reader and handing each accepted fold's new tensors
to ``keep`` (which may move them to disk), so that memory does not grow with the model. Rules only
read and compute; this pass is what changes the graph. Within one graph it runs rounds until nothing more
folds (``Conv -> BN -> BN`` folds in two rounds); within a round every normalization is matched
against a read-only :class:`~bnfold.ir.view.GraphView`, accepted folds that touch disjoint nodes are
applied together, and overlapping ones wait for the next round. Subgraphs (If / Loop / Scan bodies) are
folded the same way, with the enclosing graphs' constants visible.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import onnx

from bnfold.errors import BadInputError, BnfoldError, first_line
from bnfold.folding.cleanup import list_initializers_as_inputs, remove_orphans
from bnfold.folding.functions import fold_bodies, inline_for_folding, input_fed_norms
from bnfold.folding.order import sort_graph
from bnfold.folding.result import FoldedPair, FoldResult
from bnfold.folding.rules import PRODUCER_RULES, affine, constants, select_rules
from bnfold.folding.rules.base import Fold, FoldContext, FoldOptions, Norm, Skip
from bnfold.folding.rules.batchnorm import NEVER_FOLDABLE, bn_norm
from bnfold.folding.rules.blockers import forward_blocker
from bnfold.io.layout import checkable_copy
from bnfold.ir.names import NameAllocator
from bnfold.ir.nodes import is_op, subgraphs
from bnfold.ir.view import GraphView, TensorReader

__all__ = ["FoldOptions", "FoldResult", "FoldedPair", "Skip", "TensorSink", "count_nodes", "fold_model"]

log = logging.getLogger(__name__)

Source = Callable[[FoldContext, int], "Norm | Skip | None"]


def _bn_source(ctx: FoldContext, idx: int) -> Norm | Skip | None:
    node = ctx.view.node(idx)
    return bn_norm(ctx, idx) if is_op(node, "BatchNormalization") else None


SOURCES: tuple[Source, ...] = (_bn_source, affine.norm_source)
"""Where normalizations come from. Each returns a Norm to fold, a Skip to report, or None."""

_PRODUCERS = "Conv, ConvTranspose, Gemm, MatMul"


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes in ``graph`` and every nested subgraph."""
    return sum(1 + sum(count_nodes(g) for _, g in subgraphs(n)) for n in graph.node)


TensorSink = Callable[[onnx.TensorProto], onnx.TensorProto]
"""Where an accepted fold's new tensors go: the identity keeps them in memory; a
:meth:`bnfold.io.store.TensorStore.spill` moves large ones to a file so memory does not grow with the model."""


def fold_model(
    model: onnx.ModelProto,
    options: FoldOptions | None = None,
    *,
    copy: bool = True,
    data: TensorReader | None = None,
    keep: TensorSink | None = None,
) -> FoldResult:
    """Fold every foldable normalization of ``model``.

    ``copy`` (the default) folds a copy and leaves ``model`` untouched; ``copy=False`` folds ``model``
    itself (one nobody else holds, just loaded: no copy of a large model). ``data`` reads tensors stored
    as external data (a lazily loaded model); ``keep`` receives each new tensor of an accepted fold.
    ``options.check`` runs ``onnx.checker`` on the input (BadInputError) and the folded model. Nodes out of
    topological order are sorted first, and model-local functions are folded inside (:mod:`.functions`);
    ``notes`` say so.
    """
    options = options or FoldOptions()
    rules = select_rules(options.only, options.skip)
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    notes = _sort(out)
    benign = _check(out, "input model", BadInputError) if options.check else None
    nodes_before = count_nodes(out.graph)
    fn_notes, fn_reasons = inline_for_folding(out) if out.functions else ([], {})
    notes += fn_notes
    if 0 < out.ir_version < 4 and not options.initializers_as_constants:
        # IR < 4 lists every initializer as a graph input because that IR requires it, not to make it overridable
        options = dataclasses.replace(options, initializers_as_constants=True)
        if any(i.name in {t.name for t in out.graph.initializer} for i in out.graph.input):
            notes.append(f"IR version {out.ir_version}: initializers listed as graph inputs (as that IR requires) "
                         "are treated as constants; the folded tensors are listed as inputs too")
    names = NameAllocator(out)
    folded: list[FoldedPair] = []
    skipped: list[Skip] = []
    orphans: set[str] = set()
    original = frozenset(names.used)
    run = _Run(names, options, rules, folded, skipped, orphans, keep or (lambda t: t), data, original)
    run.fold_graph(out.graph, None, "")
    _fold_functions(out, run, fn_reasons)
    if folded:
        remove_orphans(out.graph, orphans, options.initializers_as_constants)
        if 0 < out.ir_version < 4:
            list_initializers_as_inputs(out.graph)
        if options.check:
            _check(out, "folded model", BnfoldError, benign)
    notes += _benign_note(benign)
    return FoldResult(tuple(folded), tuple(run.skipped), nodes_before, count_nodes(out.graph), tuple(notes), model=out)


def _benign_note(message: str | None) -> list[str]:
    if message is None:
        return []
    return [f"the input fails onnx.checker only for a reason the fold does not touch ({message}); folded anyway, "
            "and the output fails it for the same reason only"]


def _sort(model: onnx.ModelProto) -> list[str]:
    """Nodes out of topological order (onnxruntime runs them; onnx.checker refuses) are sorted first."""
    n = sort_graph(model.graph)
    if not n:
        return []
    log.info("nodes were out of topological order in %d graph(s); sorted", n)
    return [f"the input's nodes were out of topological order in {n} graph(s); the output has them sorted"]


def _fold_functions(model: onnx.ModelProto, run: _Run, reasons: dict[tuple[str, str], str]) -> None:
    """Fold inside model-local function bodies (see :mod:`bnfold.folding.functions`); every normalization
    left there gets a reason naming the function."""
    first_skip = len(run.skipped)

    def fold_body(graph: onnx.GraphProto, path: str) -> None:
        body = dataclasses.replace(run, orphans=set(), data=None)
        body.fold_graph(graph, None, path)
        remove_orphans(graph, body.orphans, False)

    def with_norms(f: onnx.FunctionProto) -> bool:
        return any(is_op(n, "BatchNormalization") or is_op(n, NEVER_FOLDABLE) for n in f.node)

    fold_bodies(model, fold_body, with_norms)
    by_path = {f"function {d}:{n}": why for (d, n), why in reasons.items()}
    fed = {(f"function {f.domain}:{f.name}", out) for f in model.functions for out, _ in input_fed_norms(f)}
    for i in range(first_skip, len(run.skipped)):
        skip = run.skipped[i]
        if skip.graph in by_path and (skip.graph, skip.output) in fed:
            run.skipped[i] = dataclasses.replace(skip, reason=by_path[skip.graph])
        elif skip.graph.startswith("function ") and "model-local function" not in skip.reason:
            name = skip.graph.removeprefix("function ")
            run.skipped[i] = dataclasses.replace(skip, reason=f"inside model-local function '{name}': {skip.reason}")


_BENIGN = (re.compile(r"Field 'shape' of 'type' is required but missing"),)
"""onnx.checker complaints that say nothing about what a fold reads or writes (a declared type without a
shape): an input failing only these is folded, with a note, when the output fails them identically."""


def _check(model: onnx.ModelProto, what: str, error: type[BnfoldError], tolerated: str | None = None) -> str | None:
    """onnx.checker on the graph: tensor bytes are left out (see ``bnfold.io.staging.checkable_copy``), so the
    check costs the same for a 10 GB model as for its structure alone. Returns the message of a benign
    failure of the input model (``_BENIGN``) or, for the folded model, the same one as ``tolerated``."""
    try:
        onnx.checker.check_model(checkable_copy(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = " ".join(str(exc).split())[:400] or first_line(exc)  # the whole message, on one line
        benign = any(p.search(first) for p in _BENIGN)
        if benign and (error is BadInputError or first == tolerated):
            return first
        hint = "; --no-check folds it without this check" if error is BadInputError else ""
        raise error(f"{what} fails onnx.checker: {first}{hint}") from exc
    return None


@dataclass
class _Run:
    """One fold of one model: the switches, and the records every graph of the model adds to."""

    names: NameAllocator
    options: FoldOptions
    rules: tuple[ModuleType, ...]
    folded: list[FoldedPair]
    skipped: list[Skip]
    orphans: set[str]
    keep: TensorSink
    data: TensorReader | None
    original: frozenset[str] = frozenset()
    """Every tensor name of the model before folding: what a record may name (both models compute it)."""

    def fold_graph(self, graph: onnx.GraphProto, parent: GraphView | None, path: str) -> None:
        """Rounds of match -> accept -> apply on ``graph`` until nothing more folds, then its subgraphs."""
        if constants in self.rules:  # weights computed from constants become initializers before any matching
            first = GraphView(graph, parent=parent, path=path, opset=self.names.opset,
                              initializers_as_constants=self.options.initializers_as_constants, data=self.data)
            ctx = FoldContext(first, self.names, self.options, opset=self.names.opset, rules=self.rules,
                              producer_rules=PRODUCER_RULES)
            self.folded.extend(constants.materialize(ctx, self.orphans))
        while True:
            view = GraphView(graph, parent=parent, path=path, opset=self.names.opset,
                             initializers_as_constants=self.options.initializers_as_constants, data=self.data)
            ctx = FoldContext(view, self.names, self.options, opset=self.names.opset, rules=self.rules,
                              producer_rules=PRODUCER_RULES)
            accepted, skips, deferred = _plan(ctx, self._kept)
            if not accepted:
                break
            _apply(graph, accepted, self.orphans)
            self.folded.extend(
                FoldedPair(rule=f.rule, producer_op=f.producer_op, output=self._named(graph, f.norm.output),
                           norm_op=f.norm.op_type, graph=path)
                for f in accepted
            )
            log.debug("%s: folded %d, deferred %d", path or "main graph", len(accepted), deferred)
        self.skipped.extend(skips)
        self.skipped.extend(_never_foldable(view))
        for idx, node in enumerate(graph.node):
            for attr_name, sub in subgraphs(node):
                sub_path = f"{path}/" if path else ""
                sub_path += f"{view.describe(idx)}.{attr_name}"
                self.fold_graph(sub, view, sub_path)

    def _named(self, graph: onnx.GraphProto, name: str) -> str:
        """The tensor a fold's record names: ``name`` if the original model has it, else the first tensor
        downstream of it, through single readers, that the original has (a fold into a node an earlier
        fold wrote under a fresh name: both models compute that downstream tensor alike)."""
        seen = {name}
        while name not in self.original:
            readers = [n for n in graph.node if name in n.input]
            if len(readers) != 1 or not readers[0].output or readers[0].output[0] in seen:
                return name
            name = readers[0].output[0]
            seen.add(name)
        return name

    def _kept(self, fold: Fold) -> Fold:
        """An accepted fold with its new tensors handed to ``keep`` (rules never write: the pass does)."""
        return dataclasses.replace(fold, tensors=tuple(self.keep(t) for t in fold.tensors))



_MALFORMED = (ArithmeticError, ValueError, IndexError, KeyError, TypeError)
"""What reading a malformed node can raise. Matching only reads, so turning these into a refusal is safe."""


def _plan(ctx: FoldContext, keep: Callable[[Fold], Fold] = lambda fold: fold) -> tuple[list[Fold], list[Skip], int]:
    """Match every normalization against ``ctx.rules``; accept folds that overlap no earlier accepted fold: no
    node in common, and no new node reading a tensor another fold drops (a clone of a MatMul reading a BN's
    output while a forward fold removes that BN). The others wait for the next round. ``keep`` receives each
    accepted fold as it is accepted (and may move its new tensors to disk)."""
    accepted: list[Fold] = []
    skips: list[Skip] = []
    claimed: set[int] = set()
    read: set[str] = set()
    dropped: set[str] = set()
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
                reads, drops = outcome.reads(), outcome.drops(ctx.view.graph)
                if outcome.touched & claimed or reads & dropped or drops & read:
                    deferred += 1
                else:
                    accepted.append(keep(outcome))
                    claimed |= outcome.touched
                    read |= reads
                    dropped |= drops
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
