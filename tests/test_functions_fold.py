"""BatchNormalization inside model-local functions: folded in the body where its parameters are Constant
nodes there, by inlining the one call site where they arrive as inputs, and otherwise left with a reason.
Each fold is proven against onnxruntime (the original and the folded model on the same inputs)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.check import verify

C = 3


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((C, 2, 3, 3)).astype(np.float32),
            "gamma": (rng.random(C) + 0.5).astype(np.float32), "beta": rng.standard_normal(C).astype(np.float32),
            "mean": rng.standard_normal(C).astype(np.float32), "var": (rng.random(C) + 0.5).astype(np.float32)}


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))


def _model(fn: onnx.FunctionProto, calls: list[onnx.NodeProto], inits: list[onnx.TensorProto],
           outputs: list[str]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", C, "H", "W"]) for o in outputs]
    g = helper.make_graph(calls, "g", [x], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)],
                          functions=[fn])
    m.ir_version = 8
    return m


def constants_in_body() -> onnx.ModelProto:
    """ConvBn(x) holds W and the statistics as Constant nodes; called twice."""
    a = _arrays(0)
    body = [*(_const(k, v) for k, v in a.items()),
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])]
    fn = helper.make_function("local", "ConvBn", ["x"], ["y"], body, [helper.make_opsetid("", 15)])
    calls = [helper.make_node("ConvBn", ["x"], ["y1"], domain="local"),
             helper.make_node("ConvBn", ["x"], ["y2"], domain="local")]
    return _model(fn, calls, [], ["y1", "y2"])


def inputs_fed(n_calls: int) -> onnx.ModelProto:
    """ConvBn(x, W, gamma, beta, mean, var): everything arrives as inputs, bound to initializers per call."""
    fn = helper.make_function("local", "ConvBn", ["x", "W", "gamma", "beta", "mean", "var"], ["y"],
                              [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])],
                              [helper.make_opsetid("", 15)])
    inits, calls = [], []
    for i in range(n_calls):
        names = []
        for k, v in _arrays(i).items():
            inits.append(numpy_helper.from_array(v, f"{k}{i}"))
            names.append(f"{k}{i}")
        calls.append(helper.make_node("ConvBn", ["x", *names], [f"y{i}"], domain="local"))
    return _model(fn, calls, inits, [f"y{i}" for i in range(n_calls)])


def _bn_count(m: onnx.ModelProto) -> int:
    main = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    return main + sum(n.op_type == "BatchNormalization" for f in m.functions for n in f.node)


def test_constants_in_the_body_fold_there_and_both_call_sites_stay():
    m = constants_in_body()
    result = bnfold.fold(m)
    assert [(p.output, p.graph) for p in result.folded] == [("y", "function local:ConvBn")]
    assert not result.skipped and _bn_count(result.model) == 0
    assert [n.op_type for n in result.model.graph.node] == ["ConvBn", "ConvBn"]  # call sites intact
    body = [n.op_type for n in result.model.functions[0].node]
    assert body.count("Conv") == 1 and "BatchNormalization" not in body and set(body) == {"Constant", "Conv"}
    onnx.checker.check_model(result.model)
    comparison = verify(m, result.model, threads=1, seeds=(0, 1))
    assert comparison.passed, comparison.summary
    assert comparison.worst is not None and comparison.worst.max_abs < 1e-4


def test_statistics_as_inputs_with_one_call_site_are_inlined_and_folded():
    m = inputs_fed(1)
    result = bnfold.fold(m)
    assert [p.output for p in result.folded] == ["y0"] and not result.skipped
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    notes = list(result.notes)
    assert notes == ["model-local function(s) 'local:ConvBn' inlined at their only call site so that the BN "
                            "statistics they receive as inputs could be folded; the model's inputs and outputs are "
                            "unchanged"]
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert [o.name for o in result.model.graph.output] == ["y0"]
    comparison = verify(m, result.model, threads=1, seeds=(0,))
    assert comparison.passed, comparison.summary


def test_statistics_as_inputs_with_two_call_sites_are_left_with_a_reason():
    m = inputs_fed(2)
    result = bnfold.fold(m)
    assert not result.folded and len(result.skipped) == 1
    skip = result.skipped[0]
    assert skip.graph == "function local:ConvBn"
    assert skip.reason == ("inside model-local function 'local:ConvBn', whose BN statistics ('gamma', 'beta', "
                           "'mean', 'var') arrive as function inputs; the function is called from 2 places (inlining "
                           "would rewrite them all), so it is not inlined")
