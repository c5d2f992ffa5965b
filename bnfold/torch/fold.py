"""``fold_torchscript``: a TorchScript archive in, a folded and verified TorchScript archive out.

1. ``torch.jit.load`` on the CPU. Training flags are kept as saved: a module saved in training mode
   folds nothing (every BatchNorm is reported) unless ``eval_mode=True`` puts it in eval mode first.
2. ``torch.jit.freeze(optimize_numerics=False)``: inlines submodules and turns parameters and buffers
   into graph constants, without torch's own Conv/Linear+BN folding (stored-dtype arithmetic, and wrong
   for a Linear on a 3-D input). Exported methods are preserved.
3. :func:`bnfold.torch.jit_fold.fold_graph` on each method graph (ranks observed on example inputs).
4. ``torch.jit.save``, then ``torch.jit.load`` of those bytes: the result is what a user will load.
   BatchNorms are counted in the original (inlined) and in the reloaded graphs.
5. Verification: the original and the reloaded archive run on the same seeded inputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnfold.errors import BadInputError, first_line
from bnfold.folding.result import FoldedPair, Skip
from bnfold.torch.archive import (
    ArchiveSource,
    load_archive,
    quiet,
    read_source,
    require_torch,
    save_archive,
)
from bnfold.torch.inputs import ShapesArg, make_inputs, probe_ranks
from bnfold.torch.jit_fold import bn_nodes, count_nodes, fold_graph
from bnfold.torch.result import TorchFold, write_checked

if TYPE_CHECKING:
    import torch

    from bnfold.check.compare import Tolerances

__all__ = ["TorchFoldResult", "count_batch_norms", "fold_torchscript"]

log = logging.getLogger(__name__)


@dataclass
class TorchFoldResult(TorchFold):
    """What ``fold_torchscript`` did: the account the report renders (see :class:`TorchFold`), the archive."""

    module: torch.jit.ScriptModule = field(kw_only=True)
    """The folded module, as loaded back from ``archive``."""
    archive: bytes = field(kw_only=True)
    """The TorchScript archive (``torch.jit.save`` bytes): what ``dst`` received."""


def _inlined_graphs(module: Any) -> list[tuple[str, Any]]:
    import torch

    graphs = []
    for name in module._c._method_names():
        g = module._c._get_method(name).graph.copy()
        torch._C._jit_pass_inline(g)
        graphs.append((name, g))
    return graphs


def count_batch_norms(module: Any) -> int:
    """BatchNorm ops in every method of a ScriptModule, submodules inlined."""
    return sum(len(bn_nodes(g)) for _, g in _inlined_graphs(module))


def _label(method: str) -> str:
    return "" if method == "forward" else method


_PARAMETRIZED = "Parametrization is not working with scripting"
"""torch's error for a scripted module with parametrizations (raised when it runs, not when scripted)."""


def fold_torchscript(
    src: ArchiveSource,
    dst: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    shapes: ShapesArg = None,
    seeds: Sequence[int] | None = None,
    eval_mode: bool = False,
    tolerances: Tolerances | None = None,
    force: bool = False,
) -> TorchFoldResult:
    """Fold BatchNorm into the Conv / ConvTranspose / Linear before it in a TorchScript archive.

    ``src`` is a path or the archive's bytes. ``shapes`` (one per forward() input, in order or by name)
    are needed when they cannot be inferred from the first layer. ``verify`` runs the original and the
    folded archive in torch on the same inputs, one standard-normal set per seed (default 0, 1, 2, as
    the ONNX check); when it fails, nothing is written and ``VerificationFailedError`` is raised (its
    ``result`` holds this result) unless ``force``.
    ``eval_mode=True`` puts a module saved in training mode into eval mode first (this changes what it
    computes).
    """
    torch = require_torch()
    what = os.fspath(src) if not isinstance(src, bytes | bytearray | memoryview) else "the given bytes"
    data = read_source(src)
    original = load_archive(data, str(what))
    if eval_mode:
        original.eval()
    before = _inlined_graphs(original)
    bn_before = sum(len(bn_nodes(g)) for _, g in before)
    nodes_before = sum(count_nodes(g) for _, g in before)

    if original.training:
        return _finish_unfolded(original, data, before, bn_before, nodes_before, dst)

    work = load_archive(data, str(what))
    if eval_mode:
        work.eval()
    methods = [m for m in work._c._method_names() if m != "forward"]
    try:
        with quiet():
            frozen = torch.jit.freeze(work, preserved_attrs=methods, optimize_numerics=False)
    except Exception as exc:
        raise BadInputError(f"{what}: torch.jit.freeze failed: {first_line(exc)}") from exc

    seeds = (0, 1, 2) if seeds is None else tuple(int(x) for x in seeds)
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    inputs = make_inputs(frozen.graph, shapes, seeds[0])
    if inputs is None and verify:
        raise BadInputError(
            f"{what}: cannot infer the input shapes (forward() does not start with a Conv or Linear); "
            "give them with --shape 1,3,224,224 (one per input, or NAME=DIMS)"
        )

    def probe(values: list[Any]) -> dict[int, int]:
        assert inputs is not None
        try:
            return probe_ranks(frozen, frozen.graph, values, inputs)
        except Exception as exc:
            if _PARAMETRIZED in str(exc):
                raise BadInputError(
                    f"{what}: torch cannot run this scripted module: it has parametrizations (such as "
                    "torch.nn.utils.parametrizations.weight_norm), which do not work with scripting; save it "
                    "with torch.jit.trace, or call torch.nn.utils.parametrize.remove_parametrizations(module, "
                    "'weight') on each layer before torch.jit.script"
                ) from exc
            shapes_seen = [tuple(t.shape) for t in inputs.tensors]
            hint = "give them with --shape" if inputs.source == "inferred" else "check --shape"
            raise BadInputError(
                f"{what}: the model fails on {inputs.source} input shapes {shapes_seen} ({hint}): "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
            ) from exc

    graphs = {m: frozen._c._get_method(m).graph for m in ["forward", *methods]}
    nodes_before = sum(count_nodes(g) for g in graphs.values())  # frozen, before folding: comparable
    folded: list[FoldedPair] = []
    skipped: list[Skip] = []
    for method in graphs:
        graph = graphs[method]
        outcome = fold_graph(graph, label=_label(method), probe=probe if method == "forward" and inputs else None)
        folded += outcome.folded
        skipped += outcome.skipped

    archive = save_archive(frozen)
    reloaded = load_archive(archive, "the folded archive")
    after = _inlined_graphs(reloaded)
    result = TorchFoldResult(
        module=reloaded,
        archive=archive,
        folded=folded,
        skipped=skipped,
        bn_before=bn_before,
        bn_after=sum(len(bn_nodes(g)) for _, g in after),
        nodes_before=nodes_before,
        nodes_after=sum(count_nodes(g) for _, g in after),
        inputs=inputs,
    )
    gone = result.bn_before - result.bn_after - len(folded)
    if gone > 0:
        result.notes.append(f"{gone} BatchNorm(s) whose output was unused were removed by torch.jit.freeze")
    if result.bn_after != len(skipped):  # every BatchNorm left must have exactly one reason
        raise AssertionError(f"internal: {result.bn_after} BatchNorm(s) left but {len(skipped)} reason(s)")
    if verify:
        from bnfold.torch.compare import compare_modules

        assert inputs is not None
        per_seed = [inputs] + [make_inputs(frozen.graph, shapes, seed) for seed in seeds[1:]]
        result.comparison = compare_modules(original, reloaded, [i for i in per_seed if i is not None], tolerances)
    return _write(result, dst, force)


def _finish_unfolded(
    original: Any, data: bytes, graphs: list[tuple[str, Any]], bn_before: int, nodes_before: int, dst: Any
) -> TorchFoldResult:
    """A module saved in training mode: nothing is folded; each BatchNorm gets the reason."""
    reason = (
        "the archive was saved in training mode (module.training is True), so every BatchNorm normalizes "
        "with batch statistics; call .eval() before saving, or pass eval_mode=True (--eval)"
    )
    skipped = [
        Skip(output=n.outputsAt(0).debugName(), op_type=n.kind(), reason=reason, graph=_label(method))
        for method, g in graphs
        for n in bn_nodes(g)
    ]
    result = TorchFoldResult(
        module=original,
        archive=data,
        skipped=skipped,
        bn_before=bn_before,
        bn_after=bn_before,
        nodes_before=nodes_before,
        nodes_after=nodes_before,
        notes=["saved in training mode: nothing folded, the archive is unchanged"],
    )
    return _write(result, dst, force=False)


def _write(result: TorchFoldResult, dst: str | os.PathLike[str] | None, force: bool) -> TorchFoldResult:
    return write_checked(result, result.archive, dst, force)
