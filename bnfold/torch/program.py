"""``fold_exported_program``: a ``torch.export`` program (``.pt2`` archive or ExportedProgram) in, a folded
and verified program out.

1. ``torch.export.load`` (or a save/load round trip of a given program, so the caller's is never touched).
2. :func:`bnfold.torch.program_fold.fold_program_graph` decides every BatchNorm (reads only).
3. The accepted plans are applied to the graph: folded weights replace the producer's lifted tensors
   (a bias-less producer gets a new lifted bias of the weight's kind, or ``mm`` becomes ``addmm``), each
   BatchNorm's reader reads the producer, and the BatchNorm's parameters and buffers are dropped. The
   call signature, ``range_constraints`` (dynamic shapes) and module call graph are kept. Steps 2-3 repeat
   until nothing folds (a plan touching a weight another plan of the round rewrites waits for the next);
   before them, weight normalization of parameters becomes a plain parameter
   (:mod:`bnfold.torch.program_weights`).
4. ``torch.export.save``, then ``torch.export.load`` of those bytes: the result is what a user will load.
5. Verification: ``module()`` of the original and of the reloaded program on the same seeded inputs
   (shaped like the program's example inputs unless ``shapes`` is given), compared with
   :func:`bnfold.check.compare.compare_arrays` through :func:`bnfold.torch.compare.compare_modules`.
"""

from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnfold.errors import BadInputError, first_line
from bnfold.torch.archive import ArchiveSource, is_exported_program, quiet, require_torch
from bnfold.torch.inputs import ShapesArg, TorchInputs
from bnfold.torch.program_fold import bn_nodes, bn_output, drop_placeholder, fold_program_graph, rebuilt
from bnfold.torch.program_weights import materialize_weight_norms
from bnfold.torch.result import TorchFold, write_checked

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from bnfold.check.compare import Tolerances
    from bnfold.torch.export import TorchExportResult
    from bnfold.torch.program_fold import ProgramPlan

__all__ = [
    "ProgramFoldResult",
    "fold_exported_program",
    "fold_exported_program_to_onnx",
    "load_program",
    "make_program_inputs",
    "save_program",
]

log = logging.getLogger(__name__)


@dataclass
class ProgramFoldResult(TorchFold):
    """What ``fold_exported_program`` did: the account the report renders (see :class:`TorchFold`), the program."""

    program: ExportedProgram = field(kw_only=True)
    """The folded program, as loaded back from ``archive``."""
    archive: bytes = field(kw_only=True)
    """The ``torch.export.save`` bytes: what ``dst`` received."""


def load_program(source: ArchiveSource | ExportedProgram) -> ExportedProgram:
    """A private copy of a program: ``torch.export.load`` of a path or bytes, or a save/load round trip."""
    torch = require_torch("torch.export input")
    if not isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):  # an ExportedProgram
        return load_program(save_program(source))
    what = "the given bytes" if isinstance(source, bytes | bytearray | memoryview) else os.fspath(source)
    if not is_exported_program(source):
        raise BadInputError(f"{what}: not a torch.export archive (torch.export.save writes one)")
    try:
        with quiet():
            if isinstance(source, bytes | bytearray | memoryview):
                return torch.export.load(io.BytesIO(bytes(source)))
            return torch.export.load(os.fspath(source))
    except Exception as exc:
        raise BadInputError(f"{what}: torch.export.load failed: {first_line(exc)}") from exc


def save_program(program: ExportedProgram) -> bytes:
    """``torch.export.save`` to bytes."""
    torch = require_torch("torch.export output")
    buf = io.BytesIO()
    with quiet():
        torch.export.save(program, buf)
    return buf.getvalue()


def _count_nodes(program: Any) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function")


def _store(spec: Any, tensor: Any, state: dict[str, Any], constants: dict[str, Any], old: Any) -> None:
    import torch
    from torch.export.graph_signature import InputKind

    if spec.kind == InputKind.PARAMETER:
        state[spec.target] = torch.nn.Parameter(tensor, requires_grad=bool(getattr(old, "requires_grad", False)))
    elif spec.kind == InputKind.BUFFER and spec.persistent:
        state[spec.target] = tensor
    else:
        constants[spec.target] = tensor


def _unique_target(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_bnfold{i if i > 1 else ''}", i + 1
    return name


def _apply(program: Any, plans: list[ProgramPlan]) -> Any:
    """A new ExportedProgram with ``plans`` applied to ``program``'s graph (which it takes over)."""
    import torch
    from torch.export.graph_signature import InputSpec, TensorArgument

    gm = program.graph_module
    graph = gm.graph
    old_sig = program.graph_signature
    specs = [copy.copy(s) for s in old_sig.input_specs]
    outputs = copy.deepcopy(old_sig.output_specs)
    by_name = {s.arg.name: s for s in specs if hasattr(s.arg, "name")}
    state, constants = dict(program.state_dict), dict(program.constants)
    taken = set(state) | set(constants)
    stat_nodes: list[Any] = []
    for plan in plans:
        wspec = by_name[plan.weight_node.name]
        _store(wspec, plan.weight, state, constants, program.state_dict.get(wspec.target))
        producer = plan.producer
        if plan.bias_node is not None:
            bspec = by_name[plan.bias_node.name]
            _store(bspec, plan.bias, state, constants, program.state_dict.get(bspec.target))
        else:
            prefix = wspec.target.rsplit(".", 1)[0] if "." in wspec.target else wspec.target
            target = _unique_target(f"{prefix}.bias", taken)
            taken.add(target)
            with graph.inserting_after(plan.weight_node):
                ph = graph.placeholder(f"{plan.weight_node.name}_bias_bnfold")
            fake = plan.weight_node.meta["val"]
            ph.meta["val"] = fake.fake_mode.from_tensor(plan.bias)
            spec = InputSpec(kind=wspec.kind, arg=TensorArgument(name=ph.name), target=target,
                             persistent=wspec.persistent)
            specs.insert(specs.index(wspec) + 1, spec)
            by_name[ph.name] = spec
            _store(spec, plan.bias, state, constants, program.state_dict.get(wspec.target))
            if plan.mm_to_addmm:
                with graph.inserting_before(producer):
                    addmm = graph.call_function(torch.ops.aten.addmm.default, (ph, *producer.args))
                addmm.meta = dict(producer.meta)
                for o in outputs:
                    if getattr(o.arg, "name", None) == producer.name:
                        o.arg.name = addmm.name
                producer.replace_all_uses_with(addmm)
                graph.erase_node(producer)
                producer = addmm
            elif "bias" in producer.kwargs:
                producer.kwargs = {**producer.kwargs, "bias": ph}
            else:
                args = list(producer.args)
                args[2:3] = [ph]
                producer.args = tuple(args)
        if not plan.remove_bn:
            continue
        bn = plan.bn
        out = bn_output(bn)
        stat_nodes += [a for a in bn.args[1:] if isinstance(a, torch.fx.Node) and a.op == "placeholder"]
        replacement = producer if plan.replacement is None else plan.replacement
        for o in outputs:
            if getattr(o.arg, "name", None) == out.name:
                o.arg.name = replacement.name
        out.replace_all_uses_with(replacement)
        for unused in list(bn.users):  # getitem(bn, 0) and the unread getitem(bn, 1|2) a reload adds
            graph.erase_node(unused)
        graph.erase_node(bn)

    # The folded BatchNorms' parameters and buffers (num_batches_tracked too) are no longer read.
    prefixes = {by_name[n.name].target.rsplit(".", 1)[0] for n in stat_nodes if n.name in by_name}
    dead = [n for n in graph.nodes if n.op == "placeholder" and not n.users and n.name in by_name
            and (n in stat_nodes or by_name[n.name].target in {f"{p}.num_batches_tracked" for p in prefixes})]
    mutated = {o.target for o in outputs if getattr(o, "target", None)}
    for node in dict.fromkeys(dead):
        spec = by_name[node.name]
        if spec.target in mutated:
            continue
        drop_placeholder(graph, node, spec, specs, state, constants)
    return rebuilt(program, gm, specs, outputs, state, constants)


def _user_inputs(program: Any) -> tuple[list[str], list[Any]]:
    """Names of the user inputs, and the example tensors saved with the program (or [])."""
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    example = program.example_inputs
    args = list(example[0]) if example is not None else []
    if example is not None and example[1]:
        args = []  # keyword inputs: shapes must be given
    return names, args


def _grown(program: Any, dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """``dims`` with every dynamic dimension (a plain symbol of ``range_constraints``) one larger, where the
    range allows: a second shape to check a program exported with ``torch.export.Dim``."""
    import torch
    from torch.export.graph_signature import InputKind

    users = {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in users]
    out = []
    for val, shape in zip(vals, dims, strict=False):
        new = list(shape)
        for i, d in enumerate(getattr(val, "shape", ())[: len(shape)]):
            vr = program.range_constraints.get(d.node.expr) if isinstance(d, torch.SymInt) else None
            if vr is not None and shape[i] + 1 <= vr.upper:
                new[i] = shape[i] + 1
        out.append(tuple(new))
    return out + list(dims[len(out):])


def make_program_inputs(program: Any, shapes: ShapesArg, seed: int, grow: bool = False) -> TorchInputs | None:
    """Seeded standard-normal inputs: ``shapes`` (in order or by name) or the example inputs' shapes and
    dtypes; ``grow``: dynamic dimensions one larger (see :func:`_grown`). None when no shape is known."""
    import torch

    names, example = _user_inputs(program)
    if shapes is not None:
        from bnfold.torch.inputs import normalize_shapes

        dims = normalize_shapes(shapes, names)
        dtypes = [t.dtype if isinstance(t, torch.Tensor) else torch.float32 for t in example]
        if len(dtypes) != len(dims):
            dtypes = [torch.float32] * len(dims)
        source = "given"
    elif example and len(example) == len(names) and all(isinstance(t, torch.Tensor) for t in example):
        dims = [tuple(t.shape) for t in example]
        dtypes = [t.dtype for t in example]
        source = "example"
    else:
        return None
    if grow:
        dims = _grown(program, list(dims))
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape, dtype in zip(dims, dtypes, strict=True):
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype))
        else:
            tensors.append(torch.randint(0, 2, shape, generator=gen).to(dtype))
    return TorchInputs(names=tuple(names), tensors=tuple(tensors), source=source, seed=seed)


def _accepted(module: Any, inputs: TorchInputs | None) -> TorchInputs | None:
    """``inputs`` when ``module`` runs on them (a grown shape may break a guard on a derived dimension)."""
    import torch

    if inputs is None:
        return None
    try:
        with quiet(), torch.no_grad():
            module(*inputs.tensors)
    except Exception:
        return None
    return inputs


def fold_exported_program(
    src: ArchiveSource | ExportedProgram,
    dst: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    shapes: ShapesArg = None,
    seeds: Sequence[int] | None = None,
    tolerances: Tolerances | None = None,
    force: bool = False,
) -> ProgramFoldResult:
    """Fold every inference BatchNorm of a ``torch.export`` program into the op before it.

    ``src``: a ``.pt2`` path, its bytes, or an ``ExportedProgram`` (never modified). ``verify`` runs the
    original and the folded program on the same inputs, one standard-normal set per seed (default 0, 1, 2),
    shaped like the program's example inputs unless ``shapes`` is given; when it fails nothing is written
    and ``VerificationFailedError`` is raised (``.result`` holds this result) unless ``force``.
    ``dst``: where to write the folded ``.pt2``.
    """
    torch = require_torch("torch.export input")
    if isinstance(src, torch.export.ExportedProgram):
        original, work = src, load_program(src)  # the caller's program is only read (counted, run)
    else:
        original, work = load_program(src), load_program(src)
    bn_before = len(bn_nodes(original.graph))
    nodes_before = _count_nodes(original)
    folded_program, folded = materialize_weight_norms(work)
    for _ in range(bn_before + 1):  # rounds: a fold may enable another (BN -> Conv -> BN, BN -> BN)
        decided = fold_program_graph(folded_program)
        folded += decided.folded
        if not decided.plans:
            break
        with quiet():  # torch's own deprecation chatter (deep-copying the module call graph's tree specs)
            folded_program = _apply(folded_program, decided.plans)
    archive = save_program(folded_program)
    reloaded = load_program(archive)
    result = ProgramFoldResult(
        program=reloaded,
        archive=archive,
        folded=folded,
        skipped=decided.skipped,
        bn_before=bn_before,
        bn_after=len(bn_nodes(reloaded.graph)),
        nodes_before=nodes_before,
        nodes_after=_count_nodes(reloaded),
    )
    if result.bn_after != len(result.skipped):  # every BatchNorm left must have exactly one reason
        raise AssertionError(f"internal: {result.bn_after} BatchNorm(s) left but {len(result.skipped)} reason(s)")
    if original.range_constraints:
        result.notes.append(f"dynamic shapes kept: {len(original.range_constraints)} range constraint(s)")
    if verify:
        from bnfold.torch.compare import compare_modules

        seeds = (0, 1, 2) if seeds is None else tuple(int(x) for x in seeds)
        # Seeds after the first run with each dynamic dimension one larger (where the original accepts it).
        per_seed = [make_program_inputs(original, shapes, s, grow=i > 0) for i, s in enumerate(seeds)]
        first = per_seed[0] if per_seed else None
        if first is None:
            raise BadInputError("the program has no example inputs (or keyword inputs); give the input shapes")
        result.inputs = first
        runner = original.module()
        checked = [first] + [_accepted(runner, i) or make_program_inputs(original, shapes, i.seed)
                             for i in per_seed[1:] if i is not None]
        shapes_seen = {tuple(tuple(t.shape) for t in i.tensors) for i in checked if i is not None}
        if len(shapes_seen) > 1:
            result.notes.append(f"checked at input shapes {sorted(shapes_seen)} (dynamic dimensions varied)")
        with quiet():
            result.comparison = compare_modules(runner, reloaded.module(), [i for i in checked if i is not None],
                                                tolerances)
    return write_checked(result, result.archive, dst, force)


def fold_exported_program_to_onnx(
    src: ArchiveSource | ExportedProgram,
    dst: str | os.PathLike[str] | None = None,
    *,
    opset: int | None = None,
    verify: bool = True,
    force: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    seeds: Sequence[int] | None = None,
) -> TorchExportResult:
    """A ``torch.export`` program in, folded and verified ONNX out (``bnfold model.pt2 -o out.onnx``).

    Exported with the dynamo exporter (``optimize=False``: BatchNormalization kept, dynamic shapes kept);
    where that fails, the legacy exporter on ``program.module()`` with the saved example inputs.
    """
    from bnfold.torch.dynamo_export import export_dynamo
    from bnfold.torch.export import export_keep_bn, fold_and_check

    program = load_program(src)
    why: str | None = None
    try:
        exported, used = export_dynamo(program, (), opset=opset), "dynamo"
    except BadInputError as exc:
        why = str(exc)
        inputs = make_program_inputs(program, None, 0)
        if inputs is None:
            raise
        with quiet():
            exported = export_keep_bn(program.module(), inputs.tensors, opset=opset or 17,
                                      dynamic_batch=bool(program.range_constraints))
        used = "legacy"
    return fold_and_check(exported, dst, verify, force, rtol, atol, seeds, used, why)
