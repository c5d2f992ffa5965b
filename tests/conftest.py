"""Shared test helpers: build small ONNX graphs, run them on onnxruntime with its own fusions off, and
compare an original with its fold."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, settings
from onnx import helper, numpy_helper

from bnfold.check.compare import Tolerances, compare_arrays

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ort.set_default_logger_severity(3)

IR_VERSION = 8  # onnxruntime 1.31 accepts IR <= 13; 8 suits opsets 7..21 models built here


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    return with_output_shapes(model)


def with_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fill graph outputs declared without a shape from shape inference (onnx.checker wants one)."""
    if all(o.type.tensor_type.HasField("shape") for o in model.graph.output):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return model
    shapes = {o.name: o for o in inferred.graph.output}
    shapes.update({v.name: v for v in inferred.graph.value_info})
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in shapes:
            out.type.CopyFrom(shapes[out.name].type)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` on the CPU provider with every onnxruntime graph optimization off."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def runs_on_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> bool:
    """False when onnxruntime's CPU provider has no kernel for this op/dtype/opset combination
    (for example fp64 Conv-1); such cases say nothing about bnfold and are skipped."""
    try:
        run_ort(model, feeds)
    except Exception as exc:  # onnxruntime raises its own classes: Fail, NotImplemented, InvalidArgument
        if type(exc).__module__.startswith("onnxruntime"):
            return False
        raise
    return True


def assert_arrays_close(
    expected: Sequence[np.ndarray], got: Sequence[np.ndarray], *, label: str = "", names: Sequence[str] = ()
) -> None:
    """Assert each array of ``got`` matches the one of ``expected`` (the reference) by the product's own rule
    and tolerance table, ``bnfold.check.compare.compare_arrays`` with the default ``Tolerances`` (what
    ``bnfold verify`` judges a fold by): same shape and dtype, same non-finite positions, and
    ``|got - expected| <= atol + rtol * |expected|`` per element."""
    assert len(expected) == len(got), f"{label}{len(expected)} outputs expected, got {len(got)}"
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        name = names[i] if i < len(names) else f"output {i}"
        result = compare_arrays(name, np.asarray(e), np.asarray(g), Tolerances())
        assert result.passed, f"{label}{name}: {result.reason}"


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Run both models on onnxruntime (optimizations off) and compare with ``assert_arrays_close``."""
    names = [o.name for o in original.graph.output]
    assert_arrays_close(run_ort(original, feeds), run_ort(folded, feeds), names=names)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
