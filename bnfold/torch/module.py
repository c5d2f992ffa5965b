"""``fold_module``: an eager ``nn.Module`` in, a folded copy out (eval mode; the input is never touched).

Before (as ``torch.fx.symbolic_trace`` sees ``forward``, whatever the order the modules were declared in;
where fx cannot trace it, as ``torch.export`` does on the example inputs: :mod:`bnfold.torch.module_graph`)::

    %y = call_module[conv](%x)          # Conv1d/2d/3d, ConvTranspose1d/2d/3d (any groups, output_padding,
                                        # dilation), Linear -- these exact classes, not subclasses
    %z = call_module[bn](%y)            # BatchNorm1d/2d/3d

After: in the copy, ``conv.weight`` / ``conv.bias`` hold the folded tensors (a bias is added where there was
none) and ``bn`` is an ``nn.Identity``; ``forward`` is unchanged.

Conditions (each failing one is a Skip naming the BatchNorm; torch's ``fuse_conv_bn_eval`` and
``torch.fx.experimental.optimization.fuse`` check none of the starred ones):

* the BatchNorm has running statistics (``track_running_stats=True``);
* \\* the producer is called exactly once in ``forward`` (a reused module would fold into the other calls
  too) and its weight and bias are not shared with another module; a BatchNorm called several times is
  folded only when every call folds (into a producer of its own);
* the producer's output is read by the BatchNorm only, and nothing in ``forward`` reads the parameters of
  either directly (``get_attr``);
* \\* the axis BatchNorm normalizes (1) is the producer's output-channel axis: for a Linear it must be the
  last axis, so the output must be 2-D -- proven only from ``example_inputs`` (a Linear on a 3-D input
  feeding a BatchNorm1d normalizes a sequence axis; torch's utilities fold it anyway, wrongly);
* \\* channel counts agree (a grouped ConvTranspose has ``out_channels = weight.shape[1] * groups``; torch's
  ``fuse_conv_bn_eval(transpose=True)`` raises on it) and the folded tensors are finite in their dtype.

Formula: :mod:`bnfold.folding` in float64 (through :mod:`bnfold.torch.producers`), each tensor rounded once.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import BadInputError, first_line
from bnfold.folding.math import RoundingError, fold_bias, scale_axis, scale_grouped_axis1
from bnfold.folding.result import FoldedPair, Skip
from bnfold.torch.archive import require_torch
from bnfold.torch.inputs import TorchInputs
from bnfold.torch.module_graph import ModuleGraph, export_graph, fx_graph
from bnfold.torch.producers import BnStats, bn_stats_affine, from64, to64
from bnfold.torch.result import TorchFold

if TYPE_CHECKING:
    import torch

    from bnfold.check.compare import Tolerances

__all__ = ["ModuleFoldResult", "fold_module", "fold_module_result"]

log = logging.getLogger(__name__)


@dataclass
class ModuleFoldResult(TorchFold):
    """What ``fold_module_result`` did: the account the report renders (see :class:`TorchFold`), the module."""

    module: torch.nn.Module = field(kw_only=True)
    """The folded copy, in eval mode."""

    def to_report(self) -> dict[str, Any]:
        """The ``bnfold.report/1`` JSON object, input format ``"nn_module"`` (no paths, no bytes)."""
        from bnfold.report import fold_report

        report = fold_report(self, input_path=None, output_path=None, written=False, input_bytes=None,
                             output_bytes=None, input_format="nn_module")
        report["verification"] = None if self.comparison is None else self.comparison.to_dict()
        report["exit_code"] = 0 if self.comparison is None or self.comparison.passed else 4
        return report


def _classes() -> dict[type, str]:
    from torch import nn

    rules: dict[type, str] = {c: "conv" for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
    rules.update({c: "conv_transpose" for c in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)})
    rules[nn.Linear] = "linear"
    return rules


def _is_bn(mod: Any) -> bool:
    from torch import nn

    return isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)


@dataclass(eq=False)
class ProgramPlan:
    bn_target: str
    producer: Any
    weight: Any
    bias: Any
    record: FoldedPair


def _plan(node: Any, graph: ModuleGraph, root: Any, calls: Counter[str], shared: set[int]) -> ProgramPlan | str:
    ranks = graph.ranks
    bn = root.get_submodule(node.target)
    name = type(bn).__name__
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return (f"{name} {node.target} has no running statistics (track_running_stats=False): it normalizes "
                "with each batch's statistics")
    source: Any = node.args[0] if node.args else None
    if getattr(source, "op", None) != "call_module":
        return f"its input %{getattr(source, 'name', source)} is not the output of a module call"
    producer = root.get_submodule(source.target)
    rule = _classes().get(type(producer))
    if rule is None:
        return f"its input comes from {type(producer).__name__} {source.target}, not a Conv, ConvTranspose or Linear"
    if calls[source.target] > 1:
        return (f"{type(producer).__name__} {source.target} is called {calls[source.target]} times in forward(): "
                "folding its weights would change the other calls")
    others = [u for u in source.users if u is not node]
    if others:
        return f"the output of {source.target} also feeds %{others[0].name}"
    reads = [r for r in graph.attr_reads if any(r.startswith(f"{t}.") for t in (node.target, source.target))]
    if reads:
        return f"forward() reads {reads[0]} directly"
    if any(id(p) in shared for p in (producer.weight, producer.bias) if p is not None):
        return f"the weight or bias of {source.target} is shared with another module"
    weight = producer.weight
    if rule == "linear":
        rank = ranks.get(source.name)
        if rank is None:
            return (f"the rank of the output of Linear {source.target} is unknown, so it is not proven that "
                    f"{name}'s axis 1 is its feature axis (give example_inputs)")
        channel_axis, out_channels = rank - 1, weight.shape[0]
    else:
        rank = ranks.get(source.name, weight.dim())  # unknown: a batched convolution
        channel_axis = 1 if rank == weight.dim() else 0
        groups = producer.groups
        out_channels = weight.shape[1] * groups if rule == "conv_transpose" else weight.shape[0]
    if channel_axis != 1:
        return (f"{name} {node.target} normalizes axis 1 of the output of {source.target}, whose channel axis is "
                f"{channel_axis}")
    if out_channels != bn.num_features:
        return f"{source.target} has {out_channels} output channels, {name} {node.target} {bn.num_features}"
    stats = BnStats(gamma=bn.weight, beta=bn.bias, mean=bn.running_mean, var=bn.running_var, eps=float(bn.eps))
    affine = bn_stats_affine(stats)
    w64 = to64(weight)
    new_w = (scale_grouped_axis1(w64, affine.scale, producer.groups) if rule == "conv_transpose"
             else scale_axis(w64, affine.scale, 0))
    new_b = fold_bias(to64(producer.bias) if producer.bias is not None else None, affine)
    try:
        w_t = from64(np.ascontiguousarray(new_w), weight, f"weight of {source.target}").to(weight.device)
        like = producer.bias if producer.bias is not None else weight
        b_t = from64(new_b, like, f"bias of {source.target}").to(weight.device)
    except RoundingError as exc:
        return str(exc)
    record = FoldedPair(rule=rule, producer_op=type(producer).__name__, output=node.name, norm_op=name)
    return ProgramPlan(bn_target=node.target, producer=producer, weight=w_t, bias=b_t, record=record)


def _whole_modules(
    plans: list[ProgramPlan], skipped: list[Skip], calls: Counter[str], root: Any
) -> tuple[list[ProgramPlan], list[Skip]]:
    """A BatchNorm called several times becomes an Identity only when every call folds (each into its own
    producer); otherwise each of its calls is left with a reason."""
    folded_calls = Counter(p.bn_target for p in plans)
    kept: list[ProgramPlan] = []
    for plan in plans:
        n = calls[plan.bn_target]
        if folded_calls[plan.bn_target] == n:
            kept.append(plan)
            continue
        name = type(root.get_submodule(plan.bn_target)).__name__
        skipped.append(Skip(output=plan.record.output, op_type=name,
                            reason=f"{name} {plan.bn_target} is called {n} times in forward() and not every call "
                                   "can be folded (it must stay for the others)"))
    return kept, skipped


def _count(graph: ModuleGraph, root: Any) -> tuple[int, int]:
    bns = len(graph.functional_bn) + sum(1 for n in graph.nodes if n.op == "call_module"
                                         and _is_bn(root.get_submodule(n.target)))
    nodes = sum(1 for n in graph.nodes if n.op in ("call_module", "call_function", "call_method"))
    return bns, nodes


def _graph(work: Any, args: tuple[Any, ...] | None) -> ModuleGraph:
    """torch.fx's graph; torch.export's where fx cannot trace and example inputs are given."""
    try:
        return fx_graph(work, args)
    except BadInputError:
        raise
    except Exception as exc:
        if not args:
            raise BadInputError(f"torch.fx.symbolic_trace cannot trace {type(work).__name__} "
                                f"({first_line(exc)}); give example_inputs to read it through torch.export") from exc
        log.info("torch.fx cannot trace %s (%s): reading torch.export's graph", type(work).__name__, first_line(exc))
        return export_graph(work, args)


def fold_module_result(
    module: torch.nn.Module,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    tolerances: Tolerances | None = None,
) -> ModuleFoldResult:
    """Fold every BatchNorm1d/2d/3d of ``module`` that follows a Conv, ConvTranspose or Linear, in a copy.

    The pairs come from the graph ``torch.fx.symbolic_trace`` records of ``forward`` (not from the order
    of the submodules), or, where fx cannot trace it, the graph ``torch.export`` records on
    ``example_inputs``. ``example_inputs`` (a tensor or a tuple) prove ranks (needed for Linear) and, with
    ``verify``, run the original and the folded copy (``result.comparison``).
    """
    torch = require_torch("fold_module")
    work = copy.deepcopy(module).eval()
    args: tuple[Any, ...] | None = None
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    graph = _graph(work, args)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    shared = Counter(id(p) for _, p in work.named_parameters(remove_duplicate=False))
    shared_ids = {k for k, v in shared.items() if v > 1}
    bn_before, nodes_before = _count(graph, work)
    plans: list[ProgramPlan] = []
    skipped: list[Skip] = []
    for node in graph.nodes:
        if node.op == "call_module" and _is_bn(work.get_submodule(node.target)):
            planned = _plan(node, graph, work, calls, shared_ids)
            if isinstance(planned, str):
                skipped.append(Skip(output=node.name, op_type=type(work.get_submodule(node.target)).__name__,
                                    reason=planned))
            else:
                plans.append(planned)
        elif node.name in graph.functional_bn:
            skipped.append(Skip(output=node.name, op_type="batch_norm", reason=(
                f"%{node.name} calls torch.nn.functional.batch_norm: fold_module folds BatchNorm modules "
                "(export the module and fold the program or its ONNX export)")))
    plans, skipped = _whole_modules(plans, skipped, calls, work)
    for plan in plans:  # all decided: applying cannot fail
        p = plan.producer
        p.weight = torch.nn.Parameter(plan.weight, requires_grad=p.weight.requires_grad)
        p.bias = torch.nn.Parameter(plan.bias, requires_grad=p.weight.requires_grad)
        work.set_submodule(plan.bn_target, torch.nn.Identity())
    after = (fx_graph(work, None) if graph.source == "torch.fx" else export_graph(work, args or ())) if plans else graph
    bn_after, nodes_after = _count(after, work)
    result = ModuleFoldResult(module=work, folded=[p.record for p in plans], skipped=skipped, bn_before=bn_before,
                              bn_after=bn_after, nodes_before=nodes_before, nodes_after=nodes_after)
    if bn_after != len(skipped):
        raise AssertionError(f"internal: {bn_after} BatchNorm(s) left but {len(skipped)} reason(s)")
    if verify and args is not None:
        from bnfold.torch.compare import compare_modules

        original = copy.deepcopy(module).eval()
        names = tuple(f"input_{i}" for i in range(len(args))) if len(args) > 1 else ("input",)
        inputs = TorchInputs(names=names, tensors=args, source="supplied", seed=0)
        result.comparison = compare_modules(original, work, [inputs], tolerances)
    return result


def fold_module(module: torch.nn.Module, example_inputs: Any = None) -> torch.nn.Module:
    """A folded deep copy of ``module`` in eval mode (``module`` untouched): every BatchNorm that follows
    a Conv, ConvTranspose or Linear folded into it (see :func:`fold_module_result` for what was folded,
    what was left and why, and the check on ``example_inputs``)."""
    return fold_module_result(module, example_inputs, verify=False).module
