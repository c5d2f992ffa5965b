"""Each fold checked alone: the ops it rewrote, cut out of both models into a small graph and compared.

A fold keeps the name of the tensor it rewrites (the normalization's output). In the folded model that
tensor's producer reads some live tensors (not constants): those are the cut. From the tensor back to the
cut, the original's nodes (producer, the ops between, the normalization) and the folded model's nodes
(the rewritten producer) become two small models with the cut as inputs and the tensor as the output.
Both run on onnxruntime (CPU, optimizations off) on the same random inputs per seed, and are compared at
the output dtype's tolerance (:mod:`bnfold.check.compare`).

The cut's types and shapes come from the model's value_info and onnx shape inference with data
propagation. A dim still unknown is the batch (1) when it comes first, else tried from a short ladder on
the ORIGINAL subgraph (:data:`SUB_LADDER`) until it runs. A fold is "not covered" (``passed`` None, with
a reason naming what was missing) when its cut has an unknown dtype or rank, its subgraph reads a tensor
nothing can supply, it sits in a subgraph or a function body, or the original subgraph runs at no size.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from bnfold.check.compare import OutputComparison, Tolerances, compare_arrays
from bnfold.check.runner import RunError, check_session, run_session
from bnfold.check.runtime import CPU, ModelHandle, ModelSource, SessionError, open_model
from bnfold.check.sizes import short_error
from bnfold.io.dtypes import is_float

__all__ = ["SUB_LADDER", "FoldVerdict", "PerFoldResult", "check_folds"]

logger = logging.getLogger(__name__)

SUB_LADDER: tuple[int, ...] = (16, 32, 8, 64, 1)
"""Values tried for an unknown non-batch dim of a fold's cut (small: a fold's ops are local)."""
MAX_NODES = 64
"""A fold whose original subgraph back to the cut needs more nodes than this is not covered."""


@dataclass(frozen=True)
class FoldVerdict:
    """One fold checked alone. ``passed`` None: not covered (``note`` says why)."""

    output: str
    rule: str
    passed: bool | None
    comparisons: tuple[OutputComparison, ...] = ()
    inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """The cut: (tensor, shape fed)."""
    note: str = ""

    @property
    def worst(self) -> OutputComparison | None:
        return max(self.comparisons, key=lambda c: c.severity) if self.comparisons else None

    def to_dict(self) -> dict[str, object]:
        w = self.worst
        return {
            "output": self.output,
            "rule": self.rule,
            "passed": self.passed,
            "inputs": [{"name": n, "shape": list(s)} for n, s in self.inputs],
            "note": self.note,
            "worst": None if w is None else w.to_dict(),
        }


@dataclass(frozen=True)
class PerFoldResult:
    """Every fold's isolated check."""

    verdicts: tuple[FoldVerdict, ...]
    seeds: tuple[int, ...]

    @property
    def failed(self) -> tuple[FoldVerdict, ...]:
        return tuple(v for v in self.verdicts if v.passed is False)

    @property
    def uncovered(self) -> tuple[FoldVerdict, ...]:
        return tuple(v for v in self.verdicts if v.passed is None)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def summary(self) -> str:
        n = len(self.verdicts)
        ok = sum(bool(v.passed) for v in self.verdicts)
        text = f"{ok} of {n} fold(s) verified alone"
        if self.failed:
            v = self.failed[0]
            w = v.worst
            text += f"; {len(self.failed)} differ, first {v.output!r}: {w.reason if w else v.note}"
        if self.uncovered:
            v = self.uncovered[0]
            text += f"; {len(self.uncovered)} not covered, first {v.output!r}: {v.note}"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "summary": self.summary,
            "seeds": list(self.seeds),
            "folds": [v.to_dict() for v in self.verdicts],
        }


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(n.output[0] for n in graph.node if n.op_type == "Constant" and n.output)
    return names


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {o: i for i, n in enumerate(graph.node) for o in n.output if o}


def _region(graph: onnx.GraphProto, output: str, stop: set[str]) -> tuple[list[int], list[str]] | None:
    """(node indexes in graph order, tensors read from outside) from ``output`` back to ``stop``.
    None when more than MAX_NODES are needed."""
    prod = _producers(graph)
    inits = {t.name for t in graph.initializer}
    seen: set[int] = set()
    outside: list[str] = []
    stack = [output]
    visited: set[str] = set()
    while stack:
        name = stack.pop()
        if name in visited or not name:
            continue
        visited.add(name)
        if name in stop or name not in prod:
            if name not in inits and name not in outside:
                outside.append(name)
            continue
        index = prod[name]
        if index in seen:
            continue
        seen.add(index)
        if len(seen) > MAX_NODES:
            return None
        node = graph.node[index]
        stack.extend(i for i in node.input if i)
        for attr in node.attribute:  # names a subgraph reads from this scope
            if attr.type == onnx.AttributeProto.GRAPH:
                stack.extend(_outer_names(attr.g))
    return sorted(seen), outside


def _outer_names(g: onnx.GraphProto) -> list[str]:
    local = {t.name for t in g.initializer} | {i.name for i in g.input}
    local.update(o for n in g.node for o in n.output)
    return [i for n in g.node for i in n.input if i and i not in local]


def _sub_model(
    model: onnx.ModelProto, nodes: Sequence[int], inputs: Sequence[onnx.ValueInfoProto], output: str,
    external_dir: object,
) -> onnx.ModelProto:
    graph = model.graph
    picked = [graph.node[i] for i in nodes]
    used = {i for n in picked for i in n.input} | {i for n in picked for a in n.attribute if a.type == a.GRAPH
                                                    for i in _outer_names(a.g)}
    inits = []
    for t in graph.initializer:
        if t.name in used:
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            if copy.data_location == onnx.TensorProto.EXTERNAL and external_dir is not None:
                onnx.external_data_helper.load_external_data_for_tensor(copy, str(external_dir))
                copy.data_location = onnx.TensorProto.DEFAULT
                del copy.external_data[:]
            inits.append(copy)
    out = helper.make_tensor_value_info(output, onnx.TensorProto.UNDEFINED, None)
    out.ClearField("type")
    g = helper.make_graph(picked, "fold_check", list(inputs), [out], inits)
    m = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


def _typed(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, onnx.ValueInfoProto]:
    """Every typed tensor of the main graph: declared, then onnx shape inference (data propagation), with
    the graph inputs fixed at ``input_shapes`` (the shapes a whole-model run used) when given."""
    known = {v.name: v for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    try:
        light = onnx.ModelProto()
        light.CopyFrom(model)
        for vi in light.graph.input:
            if input_shapes and vi.name in input_shapes and vi.type.HasField("tensor_type"):
                shape = vi.type.tensor_type.shape
                shape.Clear()
                for d in input_shapes[vi.name]:
                    shape.dim.add().dim_value = int(d)
        if input_shapes:  # concrete shapes beat the declared symbolic ones
            known.update({v.name: v for v in light.graph.input})
        for t in light.graph.initializer:  # shape inference needs no weights' values beyond small ones
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t.ClearField("external_data")
                t.data_location = onnx.TensorProto.DEFAULT
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
        for v in (*inferred.graph.value_info, *inferred.graph.output):
            if input_shapes or v.name not in known or not known[v.name].type.tensor_type.HasField("shape"):
                known[v.name] = v
    except Exception as exc:  # inference is a help, never required
        logger.info("shape inference failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
    return known


def _spec(vi: onnx.ValueInfoProto | None) -> tuple[int, list[int | None]] | str:
    """(elem_type, dims with None unknown) or the reason it is not known."""
    if vi is None or vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.elem_type:
        return "its dtype is unknown"
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return "its rank is unknown"
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
    return t.elem_type, dims


def _data(elem_type: int, shape: tuple[int, ...], seed: int, name: str) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if is_float(dtype):
        return np.asarray(rng.standard_normal(shape).astype(dtype))
    if dtype.kind == "O":
        return np.asarray(np.array([f"w{i}" for i in range(8)], object)[rng.integers(0, 8, size=shape)], object)
    return np.asarray(rng.integers(0, 8, size=shape).astype(dtype))


def check_folds(
    original: ModelSource,
    folded: ModelSource,
    folds: Sequence[object],
    *,
    seeds: Sequence[int] = (0, 1),
    tolerances: Tolerances | None = None,
    threads: int | None = 1,
    known_shapes: Mapping[str, tuple[int, ...]] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> PerFoldResult:
    """Check every fold in ``folds`` (``FoldResult.folded`` items, or tensor names) alone; never raises for a
    model problem (a fold that cannot be checked is a verdict with ``passed`` None and a reason).

    ``known_shapes``: tensor -> concrete shape seen in a real run (used before inference and the ladder).
    ``input_shapes``: graph input -> the shape a whole-model run used; shape inference then proves concrete
    shapes for the cut (what the fold saw in that run) instead of leaving dims to the ladder.
    """
    tolerances = tolerances or Tolerances()
    o_handle = open_model(original, "original")
    f_handle = open_model(folded, "folded")
    try:
        return _check_all(o_handle, f_handle, folds, tuple(seeds), tolerances, threads, dict(known_shapes or {}),
                          input_shapes)
    finally:
        for handle, source in ((o_handle, original), (f_handle, folded)):
            if handle is not source:
                handle.close()


def _check_all(
    o_handle: ModelHandle, f_handle: ModelHandle, folds: Sequence[object], seeds: tuple[int, ...],
    tolerances: Tolerances, threads: int | None, known_shapes: Mapping[str, tuple[int, ...]],
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> PerFoldResult:
    typed = _typed(o_handle.proto, input_shapes)
    f_prod = _producers(f_handle.proto.graph)
    o_graph = o_handle.proto.graph
    verdicts: list[FoldVerdict] = []
    absorbed: list[tuple[int, str, str]] = []  # folds whose tensor a later fold took over
    regions: dict[str, set[str]] = {}
    for fold in folds:
        name = fold if isinstance(fold, str) else str(getattr(fold, "output", ""))
        rule = "" if isinstance(fold, str) else str(getattr(fold, "rule", "") or "")
        graph = "" if isinstance(fold, str) else str(getattr(fold, "graph", "") or "")
        if graph:
            verdicts.append(FoldVerdict(name, rule, None, note=f"the fold is inside {graph}, which cannot be cut out"))
            continue
        if name not in f_prod:
            absorbed.append((len(verdicts), name, rule))
            verdicts.append(FoldVerdict(name, rule, None, note=f"tensor {name!r} is not produced in the folded "
                                        "model's main graph, and no other fold's check covers it"))
            continue
        verdict = _check_one(o_handle, f_handle, typed, name, rule, seeds, tolerances, threads, known_shapes)
        region = _region(o_graph, name, {n for n, _ in verdict.inputs})
        regions[name] = {o for i in (region[0] if region else ()) for o in o_graph.node[i].output}
        verdicts.append(verdict)
    by_name = {v.output: v for v in verdicts}
    for index, name, rule in absorbed:  # e.g. Conv -> Add (bias) -> BN: the Add's fold is inside the BN's
        cover = next((by_name[o] for o, outs in regions.items() if name in outs and by_name[o].passed is not None),
                     None)
        if cover is not None:
            verdicts[index] = FoldVerdict(name, rule, cover.passed, cover.comparisons, cover.inputs,
                                          note=f"checked within the fold of {cover.output!r}, which took it over")
    return PerFoldResult(tuple(verdicts), seeds)


def _check_one(
    orig: ModelHandle, fold: ModelHandle, typed: Mapping[str, onnx.ValueInfoProto], name: str, rule: str,
    seeds: tuple[int, ...], tolerances: Tolerances, threads: int | None, known: Mapping[str, tuple[int, ...]],
) -> FoldVerdict:
    f_graph, o_graph = fold.proto.graph, orig.proto.graph
    f_prod = _producers(f_graph)
    if name not in f_prod:
        return FoldVerdict(name, rule, None, note=f"tensor {name!r} is not produced in the folded model's main graph")
    f_consts = _constant_names(f_graph)
    cut = {i for i in f_graph.node[f_prod[name]].input if i and i not in f_consts}
    f_region = _region(f_graph, name, cut)
    o_region = _region(o_graph, name, cut)
    if f_region is None or o_region is None:
        return FoldVerdict(name, rule, None, note=f"more than {MAX_NODES} nodes lie between {name!r} and its inputs")
    outside = list(dict.fromkeys([*o_region[1], *f_region[1]]))
    specs: list[tuple[str, int, list[int | None]]] = []
    for t in outside:
        if t in known:
            vi = typed.get(t)
            spec = _spec(vi)
            if isinstance(spec, str):
                return FoldVerdict(name, rule, None, note=f"the fold's input {t!r}: {spec}")
            specs.append((t, spec[0], list(known[t])))
            continue
        spec = _spec(typed.get(t))
        if isinstance(spec, str):
            return FoldVerdict(name, rule, None, note=f"the fold's input {t!r}: {spec} (no value_info, and shape "
                               "inference does not reach it); give its model input's shape with --shape")
        specs.append((t, spec[0], spec[1]))
    vis = []
    for t, elem, dims in specs:
        vis.append(helper.make_tensor_value_info(t, elem, [d if d is not None else f"d{i}" for i, d in
                                                           enumerate(dims)]))
    try:
        o_model = open_model(_sub_model(orig.proto, o_region[0], vis, name, orig.external_dir), "original fold")
        f_model = open_model(_sub_model(fold.proto, f_region[0], vis, name, fold.external_dir), "folded fold")
        s_orig = check_session(o_model, CPU, threads)
        s_fold = check_session(f_model, CPU, threads)
    except (SessionError, ValueError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return FoldVerdict(name, rule, None, note=f"the fold's subgraph does not load on onnxruntime: {first}")
    unknown = any(d is None for _, _, dims in specs for d in dims)
    sizes: tuple[int, ...] = SUB_LADDER if unknown else (1,)
    last = ""
    for size in sizes:
        shapes: dict[str, tuple[int, ...]] = {
            t: tuple((1 if i == 0 and len(dims) > 1 else size) if d is None else d for i, d in enumerate(dims))
            for t, _, dims in specs
        }
        feeds0 = {t: _data(elem, shapes[t], seeds[0], t) for t, elem, _ in specs}
        try:
            run_session(s_orig, feeds0, [name])
        except RunError as exc:
            last = short_error(exc)
            continue
        comps: list[OutputComparison] = []
        for seed in seeds:
            feeds = {t: _data(elem, shapes[t], seed, t) for t, elem, _ in specs}
            try:
                ref = run_session(s_orig, feeds, [name])[name]
                got = run_session(s_fold, feeds, [name])[name]
            except RunError as exc:
                return FoldVerdict(name, rule, False, tuple(comps), tuple(shapes.items()),
                                   note=f"the folded subgraph fails where the original runs: {short_error(exc)}")
            comps.append(compare_arrays(name, ref, got, tolerances))
        return FoldVerdict(name, rule, all(c.passed for c in comps), tuple(comps), tuple(shapes.items()))
    return FoldVerdict(name, rule, None, note=f"the original subgraph runs at no tried size: {last}")
