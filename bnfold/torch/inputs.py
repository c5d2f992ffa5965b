"""Inputs and outputs of a TorchScript module: shapes, seeded example inputs, flattened outputs, ranks.

Shapes come from the caller (positional ``[(1, 3, 224, 224)]`` or named ``{"x": (1, 3, 224, 224)}``;
on the command line ``--shape 1,3,224,224`` or ``--shape x=1,3,224,224``) or are inferred from the first
operation each input feeds: a convolution gives ``[2, C_in, 32, ...]`` (16 per axis for 3-D), a Linear
``[2, in_features]``. Inputs are standard normal from a seeded generator, in the weight's dtype.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import BadInputError

if TYPE_CHECKING:
    import torch

__all__ = ["ShapesArg", "TorchInputs", "flatten_outputs", "make_inputs", "parse_shapes", "probe_ranks"]

log = logging.getLogger(__name__)

ShapesArg = Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | None
"""One shape per forward() argument, in order or by name; a single flat shape means one input."""

_CONV_KINDS = frozenset(
    {f"aten::conv{k}d" for k in (1, 2, 3)}
    | {f"aten::conv_transpose{k}d" for k in (1, 2, 3)}
    | {"aten::_convolution", "aten::convolution"}
)


@dataclass(frozen=True)
class TorchInputs:
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    source: str  # "given" or "inferred"
    seed: int


def parse_shapes(specs: Sequence[str]) -> list[tuple[int, ...]] | dict[str, tuple[int, ...]]:
    """``["1,3,224,224"]`` -> positional shapes; ``["x=1,3,224,224", ...]`` -> named. ValueError if mixed.
    The syntax is the ONNX ``--shape``'s (:func:`bnfold.check.options.parse_shape_option`)."""
    from bnfold.check.options import parse_shape_option

    named: dict[str, tuple[int, ...]] = {}
    positional: list[tuple[int, ...]] = []
    for text in specs:
        try:
            name, dims = parse_shape_option(text, allow_bare=True)
        except ValueError:
            if "=" in text:
                raise
            raise ValueError(f"expected DIMS such as 1,3,224,224 or NAME=DIMS, got {text!r}") from None
        if name:
            named[name] = dims
        else:
            positional.append(dims)
    if named and positional:
        raise ValueError("give every --shape with a name (x=1,3,224,224) or none of them")
    return named if named else positional


def input_names(graph: Any) -> list[str]:
    """forward()'s argument names (without ``self``), with TorchScript's ``.N`` suffixes removed."""
    values = list(graph.inputs())[1:]
    return [re.sub(r"\.\d+$", "", v.debugName()) for v in values]


def normalize_shapes(shapes: ShapesArg, names: list[str]) -> list[tuple[int, ...]]:
    if shapes is None:
        raise ValueError("no shapes")
    if isinstance(shapes, Mapping):
        unknown = sorted(set(shapes) - set(names))
        if unknown:
            raise BadInputError(f"--shape names {unknown} are not inputs of forward() (inputs: {names})")
        missing = [n for n in names if n not in shapes]
        if missing:
            raise BadInputError(f"no shape given for input(s) {missing} of forward()")
        return [tuple(int(d) for d in shapes[n]) for n in names]
    items: list[Any] = list(shapes)
    flat = bool(items) and all(isinstance(d, int) for d in items)
    seq: list[Sequence[int]] = [items] if flat else items  # a single flat shape: one input
    if len(seq) != len(names):
        raise BadInputError(f"forward() takes {len(names)} input(s) {names}, but {len(seq)} shape(s) were given")
    return [tuple(int(d) for d in s) for s in seq]


def _const_tensor(value: Any) -> Any:
    if value.node().kind() != "prim::Constant":
        return None
    t = value.toIValue()
    return t if hasattr(t, "dim") else None


def _infer_one(value: Any) -> tuple[tuple[int, ...], Any] | None:
    """(shape, dtype) from the first convolution or Linear reading ``value`` directly."""
    for use in value.uses():
        user = use.user
        kind = user.kind()
        if use.offset != 0 or (kind not in _CONV_KINDS and kind != "aten::linear"):
            continue
        w = _const_tensor(user.inputsAt(1))
        if w is None:
            continue
        if kind == "aten::linear":
            return (2, int(w.shape[1])), w.dtype
        transposed = "transpose" in kind
        flags: list[object] = []
        if kind in {"aten::_convolution", "aten::convolution"}:
            flags = [user.inputsAt(6).toIValue(), user.inputsAt(8).toIValue()]
        elif transposed:
            flags = [True, user.inputsAt(6).toIValue()]
        if any(f is None for f in flags):
            continue  # ``transposed`` or ``groups`` computed at run time: no shape follows from this weight
        if flags:
            transposed, groups = bool(flags[0]), int(flags[1])  # type: ignore[call-overload]
        else:
            groups = 1
        c_in = int(w.shape[0]) if transposed else int(w.shape[1]) * groups
        spatial = w.dim() - 2
        side = 16 if spatial >= 3 else 32
        return (2, c_in, *([side] * spatial)), w.dtype
    return None


def make_inputs(graph: Any, shapes: ShapesArg, seed: int = 0) -> TorchInputs | None:
    """Seeded standard-normal inputs for ``graph`` (a frozen forward graph); None if no shapes are known."""
    import torch

    names = input_names(graph)
    inferred = [_infer_one(v) for v in list(graph.inputs())[1:]]
    if shapes is not None:
        dims = normalize_shapes(shapes, names)
        source = "given"
    elif inferred and all(i is not None for i in inferred):
        dims = [i[0] for i in inferred if i is not None]
        source = "inferred"
        log.info("inferred input shapes %s", dict(zip(names, dims, strict=True)))
    else:
        return None
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape, inf in zip(dims, inferred, strict=True):
        dtype = inf[1] if inf is not None else torch.float32
        tensors.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype))
    return TorchInputs(names=tuple(names), tensors=tuple(tensors), source=source, seed=seed)


def flatten_outputs(out: Any, name: str = "output") -> dict[str, np.ndarray]:
    """Tensors of a (nested tuple/list/dict) result as ``{"output[0]": array, ...}``."""
    import torch

    if isinstance(out, torch.Tensor):
        t = out.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return {name: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)}
        return {name: t.numpy()}
    flat: dict[str, np.ndarray] = {}
    if isinstance(out, tuple | list):
        for i, item in enumerate(out):
            flat.update(flatten_outputs(item, f"{name}[{i}]"))
    elif isinstance(out, dict):
        for key, item in out.items():
            flat.update(flatten_outputs(item, f"{name}[{key!r}]"))
    elif isinstance(out, bool | int | float):
        flat[name] = np.asarray(out)
    return flat


def probe_ranks(module: Any, graph: Any, values: list[Any], inputs: TorchInputs) -> dict[int, int]:
    """Run a copy of ``graph`` that also returns ``aten::dim`` of each of ``values`` (node outputs of the
    top-level block; others are left out). Their ranks, keyed by ``Value.unique()``.

    Each ``aten::dim`` sits right after the value's producer, so no activation lives longer than in a
    normal run.
    """
    import torch

    copy = graph.copy()
    mapping: dict[int, Any] = {}
    for na, nb in zip(graph.nodes(), copy.nodes(), strict=True):
        for a, b in zip(na.outputs(), nb.outputs(), strict=True):
            mapping[a.unique()] = b
    # graph inputs (after ``self``): their rank is the example tensor's
    params = {v.unique(): t for v, t in zip(list(graph.inputs())[1:], inputs.tensors, strict=False)}
    given = {v.unique(): int(params[v.unique()].dim()) for v in values
             if v.unique() in params and hasattr(params[v.unique()], "dim")}
    wanted = [v for v in values if v.unique() in mapping]
    if not wanted:
        return given
    dims = []
    for v in wanted:
        target = mapping[v.unique()]
        node = copy.create("aten::dim", [target], 1)
        node.insertAfter(target.node())
        node.output().setType(torch._C.IntType.get())
        dims.append(node.output())
    outs = [*copy.outputs(), *dims]
    while len(list(copy.outputs())):
        copy.eraseOutput(0)
    node = copy.create("prim::TupleConstruct", outs, 1)
    copy.appendNode(node)
    node.output().setType(torch._C.TupleType([o.type() for o in outs]))
    copy.registerOutput(node.output())
    fn = torch._C._create_function_from_graph("bnfold_rank_probe", copy)
    with torch.no_grad():
        result = fn(module._c, *inputs.tensors)
    return {**given, **{v.unique(): int(rank) for v, rank in zip(wanted, result[1:], strict=True)}}
