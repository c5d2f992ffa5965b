"""Dynamic input sizes the ORIGINAL model accepts: from what the model says, then a short ladder of tries.

A dynamic dim (``dim_param``, a dim with no value, ``dim_value`` 0 or negative, or an input with no shape
at all) gets a value in this order:

1. what the user gave: ``--shape`` (a full input shape or a symbol's value) and ``--inputs`` arrays
   (the symbols they bind); these always win and are never second-guessed;
2. what the model says: an input that feeds a ``Reshape`` with a constant target (the element count
   fixes the one unknown dim, or two equal ones of a square image), and metadata properties whose value
   is a shape of the input's rank (``image_shape: 3,640,640``);
3. a ladder of sizes for every dynamic dim but the first (the batch, 1): ``32, 64, 128, 224, 256, 320,
   640`` (multiples of 32 first: detection heads that upsample and concatenate need them), then ``16, 8,
   1``; cheapest first. An input without a shape tries the rank its consumer proves (a Conv's weight
   rank) and then ranks 4, 2, 3, 1, 0.

Each candidate is tried by running the original model alone once on onnxruntime (CPU, optimizations
off, seed 0); the first that runs is used, within a time budget (:data:`DEFAULT_BUDGET_S`). Where each
input's shape came from goes into the report (``InputInfo.shape_source``). A model that runs on none of
them raises :class:`UnrunnableModelError`: the model's limit, not a failed fold; its message names the
options that help (``--shape``, ``--inputs``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx
from numpy import typing as npt
from onnx import numpy_helper

from bnfold.check.feeds import Dim, FeedPlan, InputsArg, InputSpec, load_npz, plan_feeds
from bnfold.check.runtime import clean_ort_message
from bnfold.errors import BadInputError

__all__ = [
    "DEFAULT_BUDGET_S",
    "LADDER",
    "UnrunnableModelError",
    "choose_plan",
    "dynamic_inputs",
    "model_hints",
    "short_error",
]

logger = logging.getLogger(__name__)

LADDER: tuple[int, ...] = (32, 64, 128, 224, 256, 320, 640, 16, 8, 1)
"""Sizes tried for every dynamic non-batch dim, in order."""
FALLBACK_RANKS: tuple[int, ...] = (4, 2, 3, 1, 0)
"""Ranks tried for an input declared without any shape, after the rank its consumers prove."""
MAX_ELEMENTS = 1 << 24
"""A ladder step that would give one input more elements than this is skipped (64 MiB of float32)."""
DEFAULT_BUDGET_S = 60.0
"""Seconds the ladder may spend running the original (the first try always runs)."""

Runner = Callable[[Mapping[str, np.ndarray]], None]
"""Runs the original model once on these feeds; raises on failure (its message is kept for the report)."""
Shapes = dict[str, tuple[int, ...]]


class UnrunnableModelError(BadInputError):
    """The original model runs on none of the synthesised inputs: the model's limit, not the fold's."""

    def __init__(self, message: str, tried: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.tried = tuple(tried)


_NODE_PREFIX = re.compile(r"^(\w+ node(?: '[^']*')?: )(.*)$")


def short_error(exc: BaseException | str) -> str:
    """onnxruntime's message on one line, the C++ location after a ``Reshape node:`` prefix removed too."""
    text = clean_ort_message(exc)
    m = _NODE_PREFIX.match(text)
    return m[1] + clean_ort_message(m[2]) if m else text


def _ints(text: str) -> list[int]:
    return [int(t) for t in re.findall(r"-?\d+", text)]


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Small integer constants by name: initializers and Constant nodes (only what a target could be)."""
    out: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(t.dims) <= 1 and not t.data_location:
            out[t.name] = numpy_helper.to_array(t)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                    out[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_ints":
                    out[node.output[0]] = np.array(list(a.ints), np.int64)
    return out


def dynamic_inputs(
    specs: Sequence[InputSpec], symbols: Mapping[str, int], fixed: Mapping[str, tuple[int, ...]]
) -> list[InputSpec]:
    """Inputs with a dim nothing fixes: not in ``fixed`` (user shapes, supplied arrays), and a dim that is
    unknown, or a symbol absent from ``symbols``; an input with no shape at all counts."""
    out = []
    for s in specs:
        if s.name in fixed:
            continue
        if s.dims is None or any(d is None or (isinstance(d, str) and d not in symbols) for d in s.dims):
            out.append(s)
    return out


def _fill(spec: InputSpec, dims: Sequence[Dim], size: int, symbols: Mapping[str, int]) -> tuple[int, ...]:
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, str) and d in symbols:
            out.append(symbols[d])
        else:
            out.append(1 if i == 0 and len(dims) > 1 else size)
    return tuple(out)


def _consumer_dims(graph: onnx.GraphProto, name: str) -> tuple[Dim, ...] | None:
    """The dims a Conv consumer proves for ``name``: its weight's rank, and the channels (weight dim 1 x group;
    ConvTranspose: weight dim 0); None when no Conv with a constant weight reads it."""
    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.input and node.input[0] == name and len(node.input) > 1:
            w = weights.get(node.input[1])
            if w is None or len(w) < 3:
                continue
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            channels = w[1] * group if node.op_type == "Conv" else w[0]
            return (None, int(channels), *([None] * (len(w) - 2)))
    return None


def model_hints(
    model: onnx.ModelProto, specs: Sequence[InputSpec], symbols: Mapping[str, int]
) -> list[tuple[str, Shapes]]:
    """(label, {input: full shape}) that the model itself states, best first (see the module docstring)."""
    graph = model.graph
    consts = _constants(graph)
    hints: list[tuple[str, Shapes]] = []
    for spec in specs:
        if spec.dims is None:
            continue
        rank = len(spec.dims)
        for node in graph.node:
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[0] != spec.name:
                continue
            target = consts.get(node.input[1])
            if target is None or (target < 0).any():
                continue
            shape = _solve_reshape(spec, target, symbols)
            if shape is not None:
                label = f"model: Reshape {node.name or node.output[0]!r} target {target.tolist()}"
                hints.append((label, {spec.name: shape}))
        for prop in model.metadata_props:
            if "shape" not in prop.key.lower() and "size" not in prop.key.lower():
                continue
            values = _ints(prop.value)
            if len(values) == rank - 1:
                values = [1, *values]
            if len(values) != rank or any(v <= 0 for v in values):
                continue
            if all(not isinstance(d, int) or d == v for d, v in zip(spec.dims, values, strict=True)):
                hints.append((f"model metadata {prop.key!r} = {prop.value!r}", {spec.name: tuple(values)}))
    return hints


def _solve_reshape(
    spec: InputSpec, target: npt.NDArray[np.integer], symbols: Mapping[str, int]
) -> tuple[int, ...] | None:
    assert spec.dims is not None
    if len(target) and (target == 0).any():  # 0 copies the input's dim: equal positions cancel out
        if len(target) > len(spec.dims):
            return None
        total = math.prod(int(t) for t in target if t != 0)
        dims = [d for i, d in enumerate(spec.dims) if not (i < len(target) and target[i] == 0)]
    else:
        total = math.prod(int(t) for t in target)
        dims = list(spec.dims)
    known, unknown = 1, []
    for i, d in enumerate(dims):
        v = d if isinstance(d, int) else symbols.get(d) if isinstance(d, str) else None
        if v is None and i == 0 and spec.dims[0] is d and len(spec.dims) > 1:
            v = 1
        if v is None:
            unknown.append(i)
        else:
            known *= v
    if not unknown or total % known:
        return None
    rest = total // known
    if len(unknown) == 1:
        value = rest
    elif len(unknown) == 2 and math.isqrt(rest) ** 2 == rest:
        value = math.isqrt(rest)
    else:
        return None
    if value <= 0:
        return None
    return _fill(spec, spec.dims, value, symbols)


def _ladder(
    model: onnx.ModelProto, dynamic: Sequence[InputSpec], symbols: Mapping[str, int]
) -> Iterator[tuple[str, Shapes]]:
    layouts: dict[str, list[tuple[tuple[Dim, ...], str]]] = {}
    for spec in dynamic:
        if spec.dims is None:
            proved = _consumer_dims(model.graph, spec.name)
            options: list[tuple[tuple[Dim, ...], str]] = [((None,) * r, f"rank {r}, tried") for r in FALLBACK_RANKS]
            if proved is not None:
                options = [(proved, f"rank {len(proved)} from its Conv's weight"), *options]
            layouts[spec.name] = options
    sized = bool(layouts) or any(
        d is None or (isinstance(d, str) and d not in symbols)
        for s in dynamic for i, d in enumerate(s.dims or ()) if i > 0 or len(s.dims or ()) == 1
    )
    if not sized:  # only batch dims are dynamic: the ladder has nothing to vary
        yield "default: batch 1", {s.name: _fill(s, s.dims or (), 1, symbols) for s in dynamic}
        return
    picks = [0] if not layouts else range(max(len(r) for r in layouts.values()))
    for pick in picks:
        for size in LADDER:
            shapes: Shapes = {}
            labels = []
            for spec in dynamic:
                if spec.dims is None:
                    options = layouts[spec.name]
                    dims, why = options[min(pick, len(options) - 1)]
                    shapes[spec.name] = _fill(spec, dims, size, symbols)
                    labels.append(f"{spec.name}: {why}")
                else:
                    shapes[spec.name] = _fill(spec, spec.dims, size, symbols)
            if any(math.prod(s) > MAX_ELEMENTS for s in shapes.values()):
                continue
            extra = f" ({', '.join(labels)})" if labels else ""
            yield f"ladder: size {size}{extra}", shapes


def _user_bindings(
    specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int] | int] | None, supplied: Mapping[str, np.ndarray]
) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    by_name = {s.name: s for s in specs}
    symbols: dict[str, int] = {}
    fixed: dict[str, tuple[int, ...]] = {}
    user = dict(shapes or {})
    if "" in user and len(specs) == 1:
        user[specs[0].name] = user.pop("")
    for key, value in user.items():
        dims = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
        if key in by_name:
            fixed[key] = dims
        elif len(dims) == 1:
            symbols[key] = dims[0]
    for name, arr in supplied.items():
        if name in by_name:
            fixed[name] = tuple(np.shape(arr))
    for name, dims in fixed.items():
        for d, v in zip(by_name[name].dims or (), dims, strict=False):
            if isinstance(d, str):
                symbols.setdefault(d, v)
    return symbols, fixed


def choose_plan(
    model: onnx.ModelProto,
    specs: Sequence[InputSpec],
    run: Runner | None,
    *,
    shapes: Mapping[str, Sequence[int] | int] | None = None,
    inputs: InputsArg = None,
    input_ranges: Mapping[str, tuple[float, float]] | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
) -> FeedPlan:
    """A :class:`FeedPlan` whose generated inputs the original model runs on.

    ``run`` runs the original once (None: no runs, the first candidate is taken untried). Without dynamic
    dims this is :func:`plan_feeds` as is. Raises :class:`UnrunnableModelError` when no candidate runs,
    BadInputError for options that contradict the model (as :func:`plan_feeds`).
    """
    supplied: Mapping[str, np.ndarray]
    if isinstance(inputs, (str, os.PathLike)):
        supplied = load_npz(inputs)
    else:
        supplied = {k: np.asarray(v) for k, v in (inputs or {}).items()}
    symbols, fixed = _user_bindings(specs, shapes, supplied)
    dynamic = dynamic_inputs(specs, symbols, fixed)
    if not dynamic:
        return plan_feeds(specs, shapes=shapes, inputs=supplied or None, input_ranges=input_ranges)
    user_shapes = dict(shapes or {})
    candidates = [*model_hints(model, dynamic, symbols), *_ladder(model, dynamic, symbols)]
    start = time.monotonic()
    tried: list[str] = []
    last_error = ""
    plan: FeedPlan | None = None
    for label, cand in candidates:
        if tried and time.monotonic() - start > budget_s:
            tried.append(f"(stopped after {budget_s:g} s)")
            break
        merged = {**user_shapes, **cand}
        try:
            plan = plan_feeds(specs, shapes=merged, inputs=supplied or None, input_ranges=input_ranges)
        except BadInputError as exc:  # a hint that contradicts a fixed dim: not a candidate
            logger.debug("candidate %s refused: %s", label, exc)
            continue
        shown = ", ".join(f"{n}[{','.join(map(str, s))}]" for n, s in cand.items())
        if run is not None:
            try:
                run(plan.feeds(0))
            except Exception as exc:  # the original's own failure at this size: try the next
                last_error = short_error(exc) or type(exc).__name__
                tried.append(shown)
                logger.info("the original does not run at %s (%s): %s", shown, label, last_error)
                continue
        before = f" after {len(tried)} size(s) the original rejected" if tried else ""
        source = f"{label}{before}"
        defaulted = {s.name: _dynamic_positions(s, symbols) for s in dynamic}
        return replace(
            plan,
            defaulted={**plan.defaulted, **defaulted},
            shape_sources={s.name: source for s in dynamic},
        )
    names = ", ".join(s.name for s in dynamic)
    ranged = set(input_ranges or {}) | set(supplied)
    ints = [s.name for s in specs if s.dtype.kind in "iu" and s.name not in ranged]
    int_hint = f", the range of integer inputs ({', '.join(ints)}) with --input-range NAME=LO,HI" if ints else ""
    listing = "; ".join(tried[:6]) + (f"; ... {len(tried) - 6} more" if len(tried) > 6 else "")
    raise UnrunnableModelError(
        f"the original model runs on none of the synthesised inputs (tried {listing or 'nothing'}; last error: "
        f"{last_error.rstrip('.') or 'none'}): this is the model's limit, not the fold's; give its real sizes with "
        f"--shape NAME=DIMS for {names}{int_hint}, or real data with --inputs FILE.npz",
        tried,
    )


def _dynamic_positions(spec: InputSpec, symbols: Mapping[str, int]) -> tuple[int, ...]:
    if spec.dims is None:
        return ()
    return tuple(i for i, d in enumerate(spec.dims) if d is None or (isinstance(d, str) and d not in symbols))
