"""Ranks (and the dims it proves) from onnx shape inference, for tensors the hand-written propagation of
:mod:`bnfold.ir.shapes` leaves unknown.

onnx's shape inference reads each op's schema (default domain and ``ai.onnx.ml``) under the model's opset,
with data propagation (a Reshape target computed from ``Shape`` ops is followed). Its input is the main
graph with every ``value_info`` and every graph output's declared shape removed, so nothing the exporter
wrote unchecked is trusted; what remains is the graph inputs' declared types (onnxruntime enforces them),
the initializers' dims and the ops' semantics. A dim inference cannot prove stays unknown. Large
initializers are passed as typed graph inputs (their dims, not their bytes), so a model of any size costs
no copy of its weights.
"""

from __future__ import annotations

import logging

import onnx
from onnx import helper

from bnfold.ir.view import GraphView

__all__ = ["inferred_dims"]

log = logging.getLogger(__name__)

_MEMO_KEY = "onnx_inferred_dims"
_INLINE_LIMIT = 4096
"""Initializers up to this many bytes stay inline (shape targets, axes); larger ones become typed inputs."""
_ML_OPSET = 3


def inferred_dims(view: GraphView, name: str) -> tuple[int | None, ...] | None:
    """The dims onnx shape inference proves for ``name`` in ``view``'s (main) graph: a tuple of the rank's
    length, an int where proved, None where not; None when not even the rank is proved. The output of a
    custom-domain node (no schema onnx knows) takes the rank its ``value_info`` declares, dims unknown."""
    found = view.memo(_MEMO_KEY, _infer).get(name)
    if found is None:
        found = view.memo(_CUSTOM_KEY, _custom_ranks).get(name)
    return found


_CUSTOM_KEY = "custom_domain_ranks"
_KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def _custom_ranks(view: GraphView) -> dict[str, tuple[int | None, ...]]:
    custom = {o for n in view.graph.node if n.domain not in _KNOWN_DOMAINS for o in n.output if o}
    out: dict[str, tuple[int | None, ...]] = {}
    for vi in view.graph.value_info:
        t = vi.type.tensor_type
        if vi.name in custom and vi.type.HasField("tensor_type") and t.HasField("shape"):
            out[vi.name] = (None,) * len(t.shape.dim)
    return out


def _infer(view: GraphView) -> dict[str, tuple[int | None, ...]]:
    if view.parent is not None or not view.opset:
        return {}  # a subgraph's outer names, or an unknown opset: nothing sound to infer under
    src = view.graph
    inputs = list(src.input)
    listed = {i.name for i in inputs}
    inits = []
    for t in src.initializer:
        small = t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= _INLINE_LIMIT
        if small:
            inits.append(t)
        elif t.name not in listed:
            inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    outputs = [helper.make_value_info(o.name, onnx.TypeProto()) for o in src.output]
    graph = helper.make_graph(list(src.node), "inference", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", view.opset),
                                                    helper.make_opsetid("ai.onnx.ml", _ML_OPSET)])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is a help: any failure leaves the propagation as it was
        log.debug("onnx shape inference failed: %s", exc)
        return {}
    out: dict[str, tuple[int | None, ...]] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            out[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                                 for d in t.shape.dim)
    return out
