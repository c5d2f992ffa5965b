"""Fold BatchNorm into the Conv / ConvTranspose / Linear before it: a pass over a frozen TorchScript graph.

Before::

    %y = aten::conv2d(%x, %W, %b, ...)        # conv{1,2,3}d, conv_transpose{1,2,3}d, _convolution,
                                               # convolution or linear
    %t = aten::transpose(%y, 1, 2)             # optional layout-only steps: transpose, permute, contiguous
    %z = aten::batch_norm(%t, %gamma, %beta, %mean, %var, False, %momentum, %eps, %cudnn)

After::

    %y = aten::conv2d(%x, %W', %b', ...)       # %W', %b' new constants; every reader of %z reads %t

Conditions (each failing one is a Skip naming the BatchNorm):

* an inference BatchNorm: ``training`` is the constant False, running statistics are constant tensors
  (``track_running_stats=True``), weight/bias constant or None, eps constant, extra outputs unused;
* its input comes from a supported producer, directly or through layout-only steps; the producer's weight
  is a constant floating-point tensor, its bias a constant or None, ``groups``/``transposed`` constants;
* the producer's output and every step's output feed only the next step (shape queries such as
  ``aten::dim`` are allowed, since folding keeps shapes);
* the axis BatchNorm normalizes (axis 1) is the producer's output-channel axis: axis 1 of a batched
  convolution, the last axis of a Linear -- proven with the observed rank of the BatchNorm input (a
  Linear is refused when the rank is unknown);
* channel counts agree, and the folded tensors are finite in the weight's dtype.

Formula (:mod:`bnfold.folding.math`, float64, each tensor rounded once to its dtype)::

    scale = gamma / sqrt(var + eps), shift = beta - mean * scale
    W' = W * scale on the output-channel axis (axis 0; ConvTranspose [C_in, C_out/g, k...]: axis 1 per group)
    b' = b * scale + shift   (a missing bias is zero)

``torch.jit.freeze``'s own Conv/Linear + BN folding is not used: it computes in the stored dtype and folds
a Linear on a 3-D input into the BatchNorm1d that normalizes axis 1 (wrong numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bnfold.folding.result import FoldedPair, Skip
from bnfold.torch.concat import CatPlan, plan_concat
from bnfold.torch.forward import plan_forward
from bnfold.torch.ir import const, describe, floating, other_uses, walk
from bnfold.torch.producers import PRODUCERS, BnStats, Plan, plan_fold

__all__ = ["BN_KINDS", "GraphFold", "RankProbe", "bn_nodes", "count_nodes", "fold_graph"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _BnLayout:
    input: int
    weight: int
    bias: int
    mean: int
    var: int
    training: int | None
    eps: int


BN_OPS: dict[str, _BnLayout] = {
    "aten::batch_norm": _BnLayout(0, 1, 2, 3, 4, 5, 7),
    "aten::native_batch_norm": _BnLayout(0, 1, 2, 3, 4, 5, 7),
    "aten::_batch_norm_impl_index": _BnLayout(0, 1, 2, 3, 4, 5, 7),
    "aten::_native_batch_norm_legit": _BnLayout(0, 1, 2, 3, 4, 5, 7),
    "aten::_native_batch_norm_legit_no_training": _BnLayout(0, 1, 2, 3, 4, None, 6),
    "aten::cudnn_batch_norm": _BnLayout(0, 1, 2, 3, 4, 5, 7),
    "aten::miopen_batch_norm": _BnLayout(0, 1, 2, 3, 4, 5, 7),
    # InstanceNorm with running statistics in eval (use_input_stats False): the same per-channel map
    "aten::instance_norm": _BnLayout(0, 1, 2, 3, 4, 5, 7),
}
BN_KINDS = frozenset(BN_OPS)


_LAYOUT_OPS = frozenset({"aten::transpose", "aten::permute", "aten::contiguous", "aten::flatten"})


@dataclass
class GraphFold:
    folded: list[FoldedPair]
    skipped: list[Skip]


RankProbe = Callable[[list[Any]], dict[int, int]]
"""Given BatchNorm input values, the rank each had when the model ran (keyed by ``Value.unique()``)."""


def bn_nodes(graph: Any) -> list[Any]:
    """Every BatchNorm node of ``graph``, nested blocks included, in order."""
    return [n for n, _ in walk(graph) if n.kind() in BN_KINDS]


_BOOKKEEPING = frozenset({"prim::Constant", "prim::ListConstruct"})


def count_nodes(graph: Any) -> int:
    """Nodes of ``graph``, nested blocks included, without constants and list constructions (a saved and
    reloaded graph spells a constant ``int[]`` as a ``prim::ListConstruct`` of constants)."""
    return sum(1 for n, _ in walk(graph) if n.kind() not in _BOOKKEEPING)


def _match(node: Any, graph_label: str, ranks: dict[int, int]) -> Plan | CatPlan | Skip:
    kind = node.kind()
    layout = BN_OPS[kind]
    name = node.outputsAt(0).debugName()
    desc = describe(node)

    def skip(reason: str) -> Skip:
        return Skip(output=name, op_type=kind, reason=f"{desc}: {reason}", graph=graph_label)

    inputs = list(node.inputs())
    if kind == "aten::_native_batch_norm_legit" and len(inputs) == 6:
        return skip("no running statistics: it normalizes with the statistics of each batch")
    ok_m, mean = const(inputs[layout.mean])
    ok_v, var = const(inputs[layout.var])
    if ok_m and ok_v and mean is None and var is None:
        return skip(
            "no running statistics (track_running_stats=False): it normalizes with the statistics of "
            "each batch, so it is not a fixed per-channel affine map"
        )
    if layout.training is not None:
        ok, training = const(inputs[layout.training])
        if not ok:
            return skip("its training flag is computed at run time, not a constant")
        if training:
            return skip(
                "in training mode: it normalizes with the statistics of each batch (call .eval() on the "
                "module before saving it)"
            )
    if not (ok_m and ok_v and floating(mean) and floating(var)):
        return skip("its running mean/variance are not constant tensors")
    ok_g, gamma = const(inputs[layout.weight])
    ok_b, beta = const(inputs[layout.bias])
    if not (ok_g and (gamma is None or floating(gamma)) and ok_b and (beta is None or floating(beta))):
        return skip("its weight/bias are not constants")
    ok_e, eps = const(inputs[layout.eps])
    if not ok_e or not isinstance(eps, float | int):
        return skip("its eps is not a constant")
    extra = [o for o in list(node.outputs())[1:] if o.uses()]
    if extra:
        return skip(f"its extra output %{extra[0].debugName()} is used")
    channels = mean.numel()
    if var.numel() != channels or any(t is not None and t.numel() != channels for t in (gamma, beta)):
        return skip("its weight/bias/mean/var have different lengths")

    # Walk up through layout-only steps, tracking which axis of each value BatchNorm's axis 1 is.
    rank = ranks.get(inputs[layout.input].unique())
    stats = BnStats(gamma=gamma, beta=beta, mean=mean, var=var, eps=float(eps))
    axis, value, reader = 1, inputs[layout.input], node
    while True:
        bad_use = other_uses(value, reader)
        if bad_use:
            return _or_forward(node, stats, rank, skip, graph_label, bad_use)
        producer = value.node()
        if producer.kind() not in _LAYOUT_OPS:
            break
        mapped: int | None
        if producer.kind() == "aten::flatten":
            flat = _map_flatten(producer, axis, rank)
            if isinstance(flat, str):
                return skip(flat)
            mapped, rank = flat
        else:
            mapped = _map_axis(producer, axis, rank)
        if mapped is None:
            return skip(f"cannot map its channel axis through {describe(producer)} (rank unknown)")
        axis, value, reader = mapped, producer.inputsAt(0), producer

    pkind = producer.kind()
    if pkind == "aten::cat" and value is inputs[layout.input]:
        joined = plan_concat(node, stats, rank, skip, graph_label)
        if isinstance(joined, CatPlan):
            return joined
        return _or_forward(node, stats, rank, skip, graph_label, joined.reason.split(": ", 1)[-1])
    if pkind not in PRODUCERS:
        source = "a graph input" if pkind == "prim::Param" else describe(producer)
        return _or_forward(node, stats, rank, skip, graph_label,
                           f"its input comes from {source}, not from a Conv, ConvTranspose or Linear")
    return plan_fold(node, producer, stats, axis, rank, skip, graph_label)


def _or_forward(
    node: Any, stats: BnStats, rank: int | None, skip: Callable[[str], Skip], graph_label: str, why: str
) -> Plan | Skip:
    """No backward fold (``why``): the forward fold into the Linear / convolution after it, else the Skip."""
    forward = plan_forward(node, stats, rank, skip, graph_label)
    if isinstance(forward, Plan):
        return forward
    if isinstance(forward, Skip):
        return skip(f"{why}; {forward.reason.split(': ', 1)[-1]}")
    users = [u.user for u in node.outputsAt(0).uses() if u.user.kind() != "prim::Return"]
    if users:
        return skip(f"{why}; no forward fold either: its output goes to {describe(users[0])}, not a Linear "
                    "or convolution it could be folded into")
    return skip(why)


def _map_flatten(step: Any, axis: int, rank: int | None) -> tuple[int, int | None] | str:
    """``aten::flatten(x, start, end)`` (LeViT's ``x.flatten(0, 1)`` before a BatchNorm1d): the input axis
    that output ``axis`` is, and the input's rank; a phrase when the channel axis would be merged."""
    ok_s, start = const(step.inputsAt(1))
    ok_e, end = const(step.inputsAt(2))
    if not (ok_s and ok_e and isinstance(start, int) and isinstance(end, int)) or start < 0 or end < 0:
        return f"cannot map its channel axis through {describe(step)} (non-constant or negative dims)"
    merged = end - start
    if axis == start and merged > 0:
        return f"{describe(step)} merges its channel axis {axis} with other axes"
    return (axis if axis < start else axis + merged), (rank + merged if rank is not None else None)


def _map_axis(step: Any, axis: int, rank: int | None) -> int | None:
    """Which axis of ``step``'s input becomes ``axis`` of its output (None if unknown)."""
    kind = step.kind()
    if kind == "aten::contiguous":
        return axis
    if kind == "aten::transpose":
        ok0, d0 = const(step.inputsAt(1))
        ok1, d1 = const(step.inputsAt(2))
        if not (ok0 and ok1):
            return None
        if min(d0, d1) < 0:
            if rank is None:
                return None
            d0, d1 = d0 % rank, d1 % rank
        return d1 if axis == d0 else d0 if axis == d1 else axis
    ok, dims = const(step.inputsAt(1))  # permute
    if not ok or rank is None:
        return None
    return [d % rank for d in dims][axis]


def _apply(graph: Any, plan: Plan | CatPlan) -> None:
    for part in plan.parts if isinstance(plan, CatPlan) else [plan]:
        _rewrite(graph, part)
    bn = plan.bn
    bn.outputsAt(0).replaceAllUsesWith(bn.inputsAt(BN_OPS[bn.kind()].input))
    bn.destroy()


def _rewrite(graph: Any, plan: Plan) -> None:
    """The producer (or, folding forward, the consumer) reads the folded weight and bias."""
    producer = plan.producer
    base = producer.inputsAt(1).debugName()
    with graph.insert_point_guard(producer):
        w = graph.insertConstant(plan.weight)
        b = graph.insertConstant(plan.bias)
    w.setDebugName(f"{base}_bnfold")
    b.setDebugName(f"{base.rsplit('.', 1)[0]}.bias_bnfold" if base.endswith(".weight") else f"{base}_bias_bnfold")
    producer.replaceInput(1, w)
    producer.replaceInput(2, b)


def fold_graph(graph: Any, *, label: str = "", probe: RankProbe | None = None) -> GraphFold:
    """Fold every BatchNorm of ``graph`` (in place) that the conditions allow; a Skip for each one left.

    Runs to a fixed point, so ``Conv -> BN -> BN`` folds both. ``probe`` gives observed ranks (re-run each
    round); without it, Linear folds are refused and convolutions are assumed batched.
    """
    import torch

    folded: list[FoldedPair] = []
    while True:
        bns = [(n, nested) for n, nested in walk(graph) if n.kind() in BN_KINDS]
        ranks = probe([n.inputsAt(BN_OPS[n.kind()].input) for n, _ in bns]) if probe and bns else {}
        results = [_match(n, _label(label, nested), ranks) for n, nested in bns]
        plans = [r for r in results if isinstance(r, Plan | CatPlan)]
        skipped = [r for r in results if isinstance(r, Skip)]
        if not plans:
            break
        rewritten: set[int] = set()
        for plan in plans:  # decided above; applying cannot fail
            keys = {p.producer.outputsAt(0).unique() for p in (plan.parts if isinstance(plan, CatPlan) else [plan])}
            if keys & rewritten:  # a forward and a backward fold into one node: the next round
                continue
            rewritten |= keys
            _apply(graph, plan)
            folded.append(plan.record)
            log.debug("folded %s into %s", plan.record.output, plan.record.producer_op)
        torch._C._jit_pass_dce(graph)
    return GraphFold(folded=folded, skipped=skipped)


def _label(method_label: str, nested: bool) -> str:
    return f"{method_label}/block" if nested else method_label
