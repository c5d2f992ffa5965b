"""bnfold.verify: feeds, metrics, tolerances, providers, localisation, on hand-built originals and folds.

The folded models here are written by hand (correct, or broken on purpose), so these tests do not depend
on the fold passes: they prove that verification catches and localises what a broken pass would write.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.check import (
    Comparison,
    Tolerances,
    compare_arrays,
    fold_candidates,
    localise,
    parse_range_option,
    parse_shape_option,
    runtime,
    verify,
)
from bnfold.check.feeds import model_inputs, plan_feeds
from bnfold.check.runtime import clean_ort_message
from bnfold.errors import BadInputError, ExitCode, MissingDependencyError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
EPS = 1e-5
EPS64 = float(np.float32(EPS))  # the attribute is a float32: fold with what the runtime sees
FAST = {"threads": 1}


def _onnx_type(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _model(nodes, inputs, outputs, inits=(), opset: int = 17, ir: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


@dataclass
class Layer:
    w: np.ndarray
    b: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def folded(self, how: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Folded weight and bias in float64; ``how`` breaks it the way buggy tools did."""
        scale = self.gamma.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + EPS64)
        w = self.w.astype(np.float64)
        shift = (self.b.astype(np.float64) - self.mean) * scale + self.beta
        if how == "axis":  # scale on the input-channel axis instead of the output-channel axis
            return w * scale[None, :, None, None], shift
        if how == "bias":  # the BN shift dropped
            return w * scale[:, None, None, None], None
        return w * scale[:, None, None, None], shift


def conv_layer(rng: np.random.Generator, cin: int, cout: int) -> Layer:
    return Layer(
        w=rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin)),
        b=rng.standard_normal(cout) * 0.1,
        gamma=rng.uniform(0.5, 2.0, cout),
        beta=rng.standard_normal(cout),
        mean=rng.standard_normal(cout),
        var=rng.uniform(0.2, 3.0, cout),
    )


def two_convs(
    dtype: type = np.float32,
    *,
    broken: int | None = None,
    how: str | None = None,
    layers: tuple[Layer, Layer] | None = None,
    dims: tuple[object, ...] = ("N", 3, "H", "W"),
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x -> Conv -> BN(bn1) -> Relu -> Conv -> BN(bn2) -> Relu -> y, and its fold (layer ``broken`` broken)."""
    dt = np.dtype(dtype)
    et = _onnx_type(dt)
    rng = np.random.default_rng(7)
    layers = layers or (conv_layer(rng, 3, 4), conv_layer(rng, 4, 4))
    x = helper.make_tensor_value_info("x", et, list(dims))
    y = helper.make_tensor_value_info("y", et, None)
    nodes, inits, f_nodes, f_inits = [], [], [], []
    cur = "x"
    for i, layer in enumerate(layers, start=1):
        p = f"l{i}_"
        names = [p + n for n in ("w", "b", "g", "beta", "mean", "var")]
        values = (layer.w, layer.b, layer.gamma, layer.beta, layer.mean, layer.var)
        inits += [numpy_helper.from_array(v.astype(dt), n) for n, v in zip(names, values, strict=True)]
        nodes += [
            helper.make_node("Conv", [cur, names[0], names[1]], [f"conv{i}"], name=f"conv{i}", pads=[1] * 4),
            helper.make_node("BatchNormalization", [f"conv{i}", *names[2:]], [f"bn{i}"], name=f"bn{i}", epsilon=EPS),
            helper.make_node("Relu", [f"bn{i}"], [f"relu{i}" if i == 1 else "y"]),
        ]
        w, b = layer.folded(how if broken == i else None)
        with np.errstate(over="ignore"):  # the fp16 overflow test rounds a weight to inf on purpose
            f_inits.append(numpy_helper.from_array(w.astype(dt), p + "wf"))
        conv_in = [cur, p + "wf"]
        if b is not None:
            f_inits.append(numpy_helper.from_array(b.astype(dt), p + "bf"))
            conv_in.append(p + "bf")
        f_nodes += [
            helper.make_node("Conv", conv_in, [f"bn{i}"], name=f"conv{i}", pads=[1] * 4),
            helper.make_node("Relu", [f"bn{i}"], [f"relu{i}" if i == 1 else "y"]),
        ]
        cur = f"relu{i}"
    return _model(nodes, [x], [y], inits), _model(f_nodes, [x], [y], f_inits)


def mlp(dtype: type = np.float64, *, broken: bool = False) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x[N, 6] -> Gemm(transB) -> BN(bn1) -> y, and its fold (Gemm weight [out, in]: scale on axis 0)."""
    dt = np.dtype(dtype)
    et = _onnx_type(dt)
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((5, 6)), rng.standard_normal(5)
    gamma, beta, mean, var = (
        rng.uniform(0.5, 2, 5),
        rng.standard_normal(5),
        rng.standard_normal(5),
        rng.uniform(0.5, 2, 5),
    )
    scale = gamma / np.sqrt(var + EPS64)
    wf = w * (scale[::-1] if broken else scale)[:, None]  # broken: channels scaled in reverse order
    bf = (b - mean) * scale + beta
    x = helper.make_tensor_value_info("x", et, ["N", 6])
    y = helper.make_tensor_value_info("bn1", et, None)
    t = lambda a, n: numpy_helper.from_array(a.astype(dt), n)  # noqa: E731
    orig = _model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
            helper.make_node("BatchNormalization", ["g", "ga", "be", "me", "va"], ["bn1"], epsilon=EPS),
        ],
        [x],
        [y],
        [t(w, "w"), t(b, "b"), t(gamma, "ga"), t(beta, "be"), t(mean, "me"), t(var, "va")],
    )
    fold = _model(
        [helper.make_node("Gemm", ["x", "wf", "bf"], ["bn1"], transB=1)], [x], [y], [t(wf, "wf"), t(bf, "bf")]
    )
    return orig, fold


@dataclass(frozen=True)
class Pair:
    """Stands in for bnfold.folding.passes.FoldedPair."""

    rule: str
    producer_op: str
    output: str
    norm_op: str = "BatchNormalization"
    graph: str = ""


PAIRS = (Pair("conv", "Conv", "bn1"), Pair("conv", "Conv", "bn2"))


# ---------------------------------------------------------------- metrics


def test_compare_arrays_figures():
    ref = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    got = ref + np.array([0, 1e-3, 0, 0], np.float32)
    r = compare_arrays("y", ref, got)
    err = float(np.float32(2.001) - np.float32(2.0))  # the float32 rounding of 1e-3 at 2.0
    assert not r.passed and r.mismatched == 1 and r.worst_index == (1,)
    assert r.rtol == 1e-4 and r.atol == pytest.approx(4e-5)  # 1e-5 x max(1, max|ref| = 4)
    assert r.max_abs == pytest.approx(err) and r.mean_abs == pytest.approx(err / 4)
    assert r.max_rel == pytest.approx(err / 2)
    assert r.needed_atol == pytest.approx(err - 1e-4 * 2)
    assert r.needed_rtol == pytest.approx((err - 4e-5) / 2)
    assert r.cosine == pytest.approx(1.0, abs=1e-6)
    assert "1 of 4 elements exceed atol 4e-05" in r.reason
    # what it would have needed is exactly enough
    assert compare_arrays("y", ref, got, Tolerances(atol=r.needed_atol * 1.001)).passed
    assert not compare_arrays("y", ref, got, Tolerances(atol=r.needed_atol * 0.99)).passed


def test_compare_arrays_quantile_and_cosine():
    ref = np.ones(1000)
    got = ref.copy()
    got[17] += 5.0
    r = compare_arrays("y", ref, got)
    assert r.max_abs == 5.0 and r.mean_abs == pytest.approx(0.005)
    assert r.p999_abs == pytest.approx(0.001 * 5.0)  # linear interpolation between the two largest
    assert compare_arrays("y", np.array([1.0, 0.0]), np.array([0.0, 1.0])).cosine == pytest.approx(0.0)
    assert compare_arrays("y", np.array([1.0, -2.0]), np.array([-1.0, 2.0])).cosine == pytest.approx(-1.0)


def test_nonfinite_rules():
    ref = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert compare_arrays("y", ref, ref.copy()).passed  # same NaN / same inf are equal
    bad = compare_arrays("y", ref, np.array([np.nan, np.inf, -np.inf, np.inf], np.float32))
    assert not bad.passed and bad.nonfinite_mismatched == 1 and bad.needed_atol is None
    assert bad.reason == "folded has inf at 1 of 4 positions where the other model is finite"
    flipped = compare_arrays("y", ref, np.array([np.nan, -np.inf, -np.inf, 1.0], np.float32))
    assert not flipped.passed and "different non-finite" in flipped.reason
    nan = compare_arrays("y", np.zeros(3, np.float16), np.array([0, np.nan, 0], np.float16))
    assert nan.reason == "folded has NaN at 1 of 3 positions where the other model is finite"


def test_shape_dtype_and_integer_exactness():
    a = np.zeros((2, 3), np.float32)
    assert (
        compare_arrays("y", a, np.zeros((3, 2), np.float32)).reason == "shape differs: original [2, 3], folded [3, 2]"
    )
    assert compare_arrays("y", a, a.astype(np.float16)).reason == "dtype differs: original float32, folded float16"
    ints = np.array([3, 1, 4], np.int64)
    off = compare_arrays("idx", ints, np.array([3, 2, 4], np.int64), Tolerances(rtol=0.5, atol=5))
    assert not off.passed and (off.rtol, off.atol) == (0.0, 0.0) and off.max_abs == 1.0  # overrides: floats only
    assert compare_arrays("m", np.array([True, False]), np.array([True, False])).passed
    assert not compare_arrays("m", np.array([True, False]), np.array([True, True])).passed


def test_tolerance_table_scaling_and_override():
    t = Tolerances()
    assert t.resolve(np.dtype(np.float32), 1000.0) == (1e-4, pytest.approx(1e-2))
    assert t.resolve(np.dtype(np.float32), 0.5) == (1e-4, 1e-5)  # scale never below 1
    assert t.resolve(np.dtype(np.float16), 2.0) == (1e-2, 2e-2)
    assert t.resolve(np.dtype(np.float64), 1.0) == (1e-9, 1e-10)
    assert t.resolve(np.dtype(ml_dtypes.bfloat16), 1.0) == (8e-2, 8e-2)
    assert t.resolve(np.dtype(ml_dtypes.float8_e4m3fn), 1.0) == (1.25, 1.25)  # 10 x eps
    assert Tolerances(rtol=1e-3, atol=1e-3).resolve(np.dtype(np.float32), 1000.0) == (1e-3, 1e-3)  # literal
    with pytest.raises(ValueError, match="atol must be"):
        Tolerances(atol=-1.0)


# ---------------------------------------------------------------- correct folds pass


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_correct_conv_fold_passes(dtype):
    orig, fold = two_convs(dtype)
    result = verify(orig, fold, fold_outputs=PAIRS, **FAST)
    assert isinstance(result, Comparison) and result and result.passed, result.summary
    assert result.providers == (CPU,) and result.seeds == (0, 1, 2) and len(result.runs) == 3
    assert result.localisation is None
    out = result.runs[0].outputs[0]
    assert out.name == "y" and out.shape == (1, 4, 32, 32) and out.dtype == np.dtype(dtype).name
    assert out.max_abs is not None and out.needed_atol is not None and out.needed_atol <= out.atol
    limit = 1e-5 if dtype is np.float32 else 1e-2  # relative to the output's scale
    assert out.max_abs < limit * max(1.0, out.ref_max_abs) and out.cosine > 0.9999
    assert result.inputs[0].shape == (1, 3, 32, 32) and result.inputs[0].defaulted_dims == (0, 2, 3)
    assert result.inputs[0].source == "normal(0, 1)" and result.inputs[0].shape_source == "ladder: size 32"
    assert result.summary.startswith("verified on CPU, 3 seed(s), 1 output(s)")


def test_correct_gemm_fold_passes_in_float64():
    orig, fold = mlp(np.float64)
    result = verify(orig, fold, **FAST)
    assert result.passed, result.summary
    out = result.runs[0].outputs[0]
    assert out.dtype == "float64" and out.rtol == 1e-9 and out.max_abs < 1e-13


# ---------------------------------------------------------------- broken folds are caught and localised


@pytest.mark.parametrize("broken", [1, 2])
def test_bias_dropped_is_caught_and_localised(broken):
    orig, fold = two_convs(broken=broken, how="bias")
    result = verify(orig, fold, fold_outputs=PAIRS, **FAST)
    assert not result and len(list(result.failures())) == 3
    out = result.runs[0].outputs[0]
    assert out.max_abs > 0.1 and out.needed_atol > 100 * out.atol
    loc = result.localisation
    assert loc is not None and loc.provider == CPU and loc.seed == 0
    assert loc.first is not None and loc.first.output == f"bn{broken}"
    assert [c.output for c in loc.checks] == ["bn1", "bn2"]
    assert [c.diverges for c in loc.checks] == [broken == 1, True]  # downstream of a break diverges too
    assert loc.first.rule == "conv" and loc.first.folded_node == f"Conv 'conv{broken}'"
    assert loc.first.original_node == f"BatchNormalization 'bn{broken}'"
    # the fold's figures: the dropped shift is what it would have needed
    assert loc.first.comparison is not None and loc.first.comparison.max_abs > 0.1
    assert f"first diverging fold: 'bn{broken}' (conv)" in result.summary
    assert result.summary.startswith("verification failed on CPU seed 0, output 'y': ")


def test_wrong_axis_is_caught_and_localised():
    orig, fold = two_convs(broken=2, how="axis")
    result = verify(orig, fold, fold_outputs=PAIRS, seeds=(5,), **FAST)
    assert not result.passed and result.seeds == (5,)
    assert result.localisation is not None and result.localisation.first.output == "bn2"
    assert not result.localisation.checks[0].diverges  # bn1 is right
    assert result.runs[0].outputs[0].cosine < 0.999


def test_fp16_overflow_is_caught_and_localised():
    """A folded fp16 weight rounded to inf: the channel it scales reads only zeros, so the original stays
    finite while the folded model computes inf * 0 = NaN."""
    rng = np.random.default_rng(11)
    l1, l2 = conv_layer(rng, 3, 4), conv_layer(rng, 4, 4)
    l1.w[3], l1.b[3], l1.mean[3], l1.beta[3] = 0.0, 0.0, 0.0, -1.0  # channel 3 of relu1 is always 0
    l2.w[0] = 0.0
    l2.w[0, 3] = 100.0  # only reads the dead channel
    l2.gamma[0], l2.var[0], l2.mean[0] = 10.0, 1e-5, l2.b[0]  # scale 2236: 100 x 2236 > 65504
    orig, fold = two_convs(np.float16, broken=2, layers=(l1, l2))
    assert np.isinf(numpy_helper.to_array(fold.graph.initializer[2])).any()
    result = verify(orig, fold, fold_outputs=PAIRS, seeds=(0,), **FAST)
    out = result.runs[0].outputs[0]
    assert not result and out.nonfinite_mismatched > 0 and out.needed_atol is None
    assert "folded has NaN" in out.reason and "where the other model is finite" in out.reason
    assert result.localisation.first.output == "bn2"
    json.dumps(result.to_dict(), allow_nan=False)  # no inf/nan leaks into the report


def test_broken_gemm_in_float64_and_inferred_fold_outputs():
    orig, fold = mlp(np.float64, broken=True)
    assert fold_candidates(orig, fold) == ["bn1"]
    result = verify(orig, fold, **FAST)  # no fold list: inferred from the graphs
    assert not result and result.localisation.first.output == "bn1"


def test_localise_directly_and_subgraph_note():
    orig, fold = two_convs(broken=2, how="bias")
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    pairs = [*PAIRS, Pair("conv", "Conv", "inner", graph="If_0/then_branch"), "nowhere"]
    loc = localise(orig, fold, pairs, feeds, CPU)
    assert loc.first.output == "bn2" and loc.error == ""
    notes = {c.output: c.note for c in loc.checks if c.comparison is None}
    assert notes == {
        "inner": "fold in subgraph If_0/then_branch cannot be exposed as a graph output",
        "nowhere": "tensor 'nowhere' is not produced in the folded model's main graph",
    }


# ---------------------------------------------------------------- models that do not run


def test_folded_model_that_does_not_load_is_a_failure_not_an_error():
    orig, _ = two_convs()
    broken = onnx.ModelProto()
    broken.CopyFrom(orig)
    broken.graph.node[0].op_type = "NoSuchOp"
    result = verify(orig, broken, seeds=(0,), **FAST)
    assert not result and result.runs[0].error.startswith("the folded model does not load on CPUExecutionProvider")
    assert "NoSuchOp" in result.runs[0].error and "\n" not in result.runs[0].error
    assert result.localisation is None  # nothing ran, so there is nothing to localise


def test_original_that_does_not_load_is_bad_input_in_one_line():
    orig, fold = two_convs()
    orig.ir_version = 99
    with pytest.raises(BadInputError) as err:
        verify(orig, fold, **FAST)
    msg = str(err.value)
    assert msg.startswith("onnxruntime cannot load the original model") and "Unsupported model IR version: 99" in msg
    assert "\n" not in msg and "onnxruntime_src" not in msg


def test_signature_change_fails_before_running():
    orig, fold = two_convs()
    fold.graph.input[0].name = "image"
    fold.graph.node[0].input[0] = "image"
    result = verify(orig, fold, **FAST)
    assert not result and result.runs == ()
    assert result.problems == ("the folded model lacks input 'x'", "the folded model has an extra input 'image'")
    assert (
        result.summary
        == "verification failed: the folded model lacks input 'x'; the folded model has an extra input 'image'"
    )


def test_missing_output_is_a_failure():
    orig, fold = two_convs()
    for m in (orig, fold):
        m.graph.output.append(helper.make_tensor_value_info("relu1", TensorProto.FLOAT, None))
    del fold.graph.output[1]
    result = verify(orig, fold, seeds=(0,), **FAST)
    reasons = {o.name: o.reason for o in result.runs[0].outputs}
    assert not result and reasons == {"y": "", "relu1": "missing from the folded model"}


def test_clean_ort_message():
    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 "
        "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&) "
        "Unsupported model IR version: 14, max supported IR version: 13"
    )
    assert clean_ort_message(raw) == "Unsupported model IR version: 14, max supported IR version: 13"
    assert clean_ort_message("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find X") == "Could not find X"


# ---------------------------------------------------------------- dynamic dims and shapes


def test_dynamic_dims_from_shapes_and_symbols():
    orig, fold = two_convs()
    full = verify(orig, fold, shapes={"x": (2, 3, 5, 7)}, seeds=(0,), **FAST)
    assert full and full.inputs[0].shape == (2, 3, 5, 7) and full.inputs[0].defaulted_dims == ()
    assert full.runs[0].outputs[0].shape == (2, 4, 5, 7)
    assert verify(orig, fold, shapes={"": (2, 3, 5, 7)}, seeds=(0,), **FAST).inputs[0].shape == (2, 3, 5, 7)
    sym = verify(orig, fold, shapes={"H": 4, "W": 9}, seeds=(0,), **FAST)
    assert sym.inputs[0].shape == (1, 3, 4, 9) and sym.inputs[0].defaulted_dims == (0,)
    with pytest.raises(BadInputError, match=r"has 4 at dim 1 where the model fixes 3"):
        verify(orig, fold, shapes={"x": (1, 4, 8, 8)})
    with pytest.raises(BadInputError, match=r"--shape names 'y', which is not an input .*symbolic dims: H, N, W"):
        verify(orig, fold, shapes={"y": (1,)})


def test_same_symbol_gets_the_same_value_across_inputs():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", "S"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["B", "S"])
    specs = model_inputs(
        _model(
            [helper.make_node("Add", ["a", "b"], ["c"])],
            [a, b],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        )
    )
    plan = plan_feeds(specs, inputs={"a": np.zeros((2, 5), np.float32)})
    assert plan.shapes == {"a": (2, 5), "b": (2, 5)} and plan.defaulted == {}
    plan = plan_feeds(specs)
    assert plan.shapes == {"a": (1, 16), "b": (1, 16)} and plan.defaulted == {"a": (0, 1), "b": (0, 1)}


def test_fixed_reshape_sizes_the_dynamic_dim_from_its_target():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L"])
    target = numpy_helper.from_array(np.array([1, 4, 6], np.int64), "target")
    m = _model(
        [helper.make_node("Reshape", ["x", "target"], ["y"])],
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [target],
    )
    result = verify(m, m, **FAST)  # the Reshape's element count fixes L = 24 (the old default 16 failed)
    assert result.passed and result.inputs[0].shape == (1, 24)
    assert result.inputs[0].shape_source.startswith("model: Reshape 'y' target [1, 4, 6]")
    assert "dynamic inputs x[1,24]" in result.summary
    assert verify(m, m, shapes={"x": (1, 24)}, **FAST).passed


# ---------------------------------------------------------------- integer, bool, bf16 inputs; npz


def _gather_model(vocab: int = 5) -> onnx.ModelProto:
    """ids (int64) index an embedding; a bool mask zeroes rows; outputs: float, int64 (ArgMax), bool."""
    table = numpy_helper.from_array(np.arange(vocab * 3, dtype=np.float32).reshape(vocab, 3), "table")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "S"])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, "S"])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["y"]),
        helper.make_node("ArgMax", ["y"], ["best"], axis=1, keepdims=0),
        helper.make_node("Greater", ["y", "zero"], ["positive"]),
    ]
    outs = [
        helper.make_tensor_value_info(n, t, None)
        for n, t in (("y", TensorProto.FLOAT), ("best", TensorProto.INT64), ("positive", TensorProto.BOOL))
    ]
    inits = [
        table,
        numpy_helper.from_array(np.array([2], np.int64), "axis"),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
    ]
    return _model(nodes, [ids, mask], outs, inits)


def test_integer_and_bool_inputs_bounded_by_input_ranges():
    m = _gather_model(vocab=5)
    with pytest.raises(BadInputError) as err:
        verify(m, m, **FAST)  # default ids in [0, 8) overflow a 5-row table
    msg = str(err.value)
    assert msg.startswith("the original model runs on none of the synthesised inputs (tried ids[1,32], mask[1,32]; ")
    assert "indices element out of data bounds" in msg and "this is the model's limit, not the fold's" in msg
    assert "--input-range NAME=LO,HI" in msg and "\n" not in msg
    result = verify(m, m, input_ranges={"ids": (0, 5)}, **FAST)
    assert result.passed, result.summary
    assert [(i.name, i.dtype, i.source) for i in result.inputs] == [
        ("ids", "int64", "integers[0, 5)"),
        ("mask", "bool", "bool"),
    ]
    outs = {o.name: o for o in result.runs[0].outputs}
    assert (outs["best"].dtype, outs["best"].rtol, outs["best"].atol) == ("int64", 0.0, 0.0)
    assert outs["positive"].dtype == "bool" and outs["positive"].max_abs == 0.0
    plan = plan_feeds(model_inputs(m), input_ranges={"ids": (2, 4)})
    ids = plan.feeds(0)["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 2 and ids.max() <= 3
    mask = plan.feeds(0)["mask"]
    assert mask.dtype == np.bool_ and 0 < mask.sum() < mask.size
    with pytest.raises(BadInputError, match="does not apply to bool input 'mask'"):
        plan_feeds(model_inputs(m), input_ranges={"mask": (0, 1)})


def test_integer_output_change_is_caught_exactly():
    m = _gather_model()
    other = onnx.ModelProto()
    other.CopyFrom(m)
    other.graph.node[4].attribute[0].i = 0  # ArgMax over another axis: int64 output differs
    result = verify(m, other, input_ranges={"ids": (0, 5)}, seeds=(0,), **FAST)
    bad = {o.name: o for o in result.runs[0].outputs if not o.passed}
    assert set(bad) == {"best"} and bad["best"].reason.startswith("shape differs")


def test_npz_inputs_replace_seeds(tmp_path: Path):
    orig, fold = two_convs()
    x = np.random.default_rng(9).standard_normal((2, 3, 6, 6))  # float64: cast to the model's float32
    path = tmp_path / "inputs.npz"
    np.savez(path, x=x)
    result = verify(orig, fold, inputs=path, **FAST)
    assert result.passed and result.seeds == () and [r.seed for r in result.runs] == [None]
    assert result.inputs[0].source == "supplied" and result.inputs[0].shape == (2, 3, 6, 6)
    assert "supplied input 'x' cast from float64 to float32" in result.notes
    assert "every input was supplied, so seeds were not used" in result.notes
    np.savez(path, x=x, extra=x)
    with pytest.raises(BadInputError, match=r"supplied inputs \['extra'\] are not inputs of the model"):
        verify(orig, fold, inputs=path)
    m = _gather_model()
    with pytest.raises(BadInputError, match="supplied input 'ids' is float32 but the model takes int64"):
        verify(m, m, inputs={"ids": np.zeros((1, 3), np.float32)})


def test_partly_supplied_inputs_still_use_seeds():
    m = _gather_model()
    ids = np.array([[0, 4, 2]], np.int64)
    result = verify(m, m, inputs={"ids": ids}, seeds=(0, 1), **FAST)
    assert result.passed and result.seeds == (0, 1)
    assert [i.shape for i in result.inputs] == [(1, 3), (1, 3)]  # mask follows the supplied S = 3


def test_bfloat16_inputs_and_outputs():
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)

    def model(k: float) -> onnx.ModelProto:
        return _model(
            [
                helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["xf", "k"], ["yf"]),
                helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16),
            ],
            [x],
            [y],
            [numpy_helper.from_array(np.array(k, np.float32), "k")],
        )

    same = verify(model(3.0), model(3.0), **FAST)
    assert same.passed and same.inputs[0].dtype == "bfloat16"
    out = same.runs[0].outputs[0]
    assert out.dtype == "bfloat16" and out.max_abs == 0.0 and out.rtol == 8e-2
    off = verify(model(3.0), model(3.5), **FAST)
    assert not off and off.runs[0].outputs[0].max_rel == pytest.approx(1 / 6, rel=0.05)


# ---------------------------------------------------------------- providers


def test_cuda_not_available_says_so_plainly(monkeypatch):
    """Default providers: CPU and a plain note. CUDA named explicitly: an error, as for latency."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    result = verify(*two_convs(), seeds=(0,), **FAST)
    assert result.providers == (CPU,) and result.notes == (runtime.CUDA_UNAVAILABLE_NOTE,)
    with pytest.raises(MissingDependencyError, match=r"CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        verify(*two_convs(), providers=["cpu", "cuda"], seeds=(0,), **FAST)
    cpu_only = verify(*two_convs(), providers=["cpu"], seeds=(0,), **FAST)
    assert cpu_only.notes == ()
    with pytest.raises(ValueError, match="unknown execution provider 'gpu'"):
        verify(*two_convs(), providers=["gpu"], seeds=(0,), **FAST)


def test_cli_provider_errors(tmp_path: Path, monkeypatch, capsys):
    """``--provider`` means the same in verify and latency: missing -> exit 7, unknown name -> exit 2."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    orig, fold = two_convs()
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(orig, a)
    onnx.save(fold, b)
    assert _cli(["verify", str(a), str(b), "-q", "--provider", "cuda"]) == ExitCode.MISSING_DEPENDENCY
    assert "CUDAExecutionProvider is not available" in capsys.readouterr().err
    assert _cli(["verify", str(a), str(b), "-q", "--provider", "gpu"]) == ExitCode.USAGE
    assert "unknown execution provider 'gpu'" in capsys.readouterr().err
    latency_args = ["latency", str(a), str(b), "-q", "--runs", "1", "--rounds", "1", "--shape", "x=1,3,8,8"]
    assert _cli([*latency_args, "--provider", "cuda"]) == ExitCode.MISSING_DEPENDENCY


def test_cuda_listed_but_not_starting_is_left_out(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    real = ort.InferenceSession

    class FallsBack(real):  # what onnxruntime does when the CUDA libraries are missing
        def __init__(self, model, options, providers):
            super().__init__(model, options, providers=[CPU])

    monkeypatch.setattr(runtime.ort, "InferenceSession", FallsBack)
    result = verify(*two_convs(), seeds=(0,), **FAST)
    assert result.passed and result.providers == (CPU,)
    assert result.notes == (
        "CUDA execution provider is installed but a session could not run on it (CUDAExecutionProvider did not "
        "start; onnxruntime fell back to CPUExecutionProvider): ran on CPU only",
    )
    with pytest.raises(MissingDependencyError, match="a session could not run on CUDAExecutionProvider"):
        verify(*two_convs(), providers=["cuda"], seeds=(0,), **FAST)


def test_cuda_selected_when_available(monkeypatch):
    """With a working CUDA provider both providers are checked, each against its own baseline."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    real = ort.InferenceSession
    asked: list[object] = []

    class PretendsCuda(real):
        def __init__(self, model, options, providers):
            asked.append(providers[0])
            super().__init__(model, options, providers=[CPU])
            self._first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]

        def get_providers(self):
            return [self._first, CPU]

    monkeypatch.setattr(runtime.ort, "InferenceSession", PretendsCuda)
    result = verify(*two_convs(broken=1, how="bias"), seeds=(0, 1), **FAST)
    assert result.providers == (CPU, CUDA)
    assert [(r.provider, r.seed) for r in result.runs] == [(CPU, 0), (CPU, 1), (CUDA, 0), (CUDA, 1)]
    assert (CUDA, {"use_tf32": "0"}) in asked and "CUDA checked with use_tf32=0" in result.notes
    assert result.localisation.provider == CPU and result.localisation.first.output == "bn1"


# ---------------------------------------------------------------- sources, report


def test_paths_with_external_data_and_bytes(tmp_path: Path):
    orig, fold = two_convs(broken=2, how="axis")
    paths = []
    for name, m in (("orig", orig), ("fold", fold)):
        p = tmp_path / f"{name}.onnx"
        onnx.save_model(m, p, save_as_external_data=True, location=f"{name}.data", size_threshold=0)
        paths.append(p)
    result = verify(*paths, seeds=(0,), fold_outputs=PAIRS, **FAST)
    assert not result and result.localisation.first.output == "bn2"
    orig, fold = two_convs()  # save_model above moved the data of the first pair out of the protos
    assert verify(orig.SerializeToString(), fold.SerializeToString(), seeds=(0,), **FAST).passed
    with pytest.raises(BadInputError, match="no such file"):
        verify(tmp_path / "missing.onnx", paths[1])


def test_protos_over_the_limit_are_spilled_not_serialised(monkeypatch):
    monkeypatch.setattr(runtime, "_PROTO_LIMIT", 500)  # pretend these models are over 2 GB
    monkeypatch.setattr(runtime, "_SPILL_THRESHOLD", 16)
    orig, fold = two_convs(broken=1, how="bias")
    before = orig.SerializeToString()
    result = verify(orig, fold, seeds=(0,), fold_outputs=PAIRS, **FAST)
    assert not result and result.localisation.first.output == "bn1"
    assert orig.SerializeToString() == before  # the caller's model is untouched


def test_to_dict_is_json_and_complete():
    result = verify(*two_convs(broken=2, how="bias"), seeds=(0,), fold_outputs=PAIRS, **FAST)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["passed"] is False and d["seeds"] == [0] and d["providers"] == [CPU]
    assert d["tolerances"]["defaults"]["float32"] == {"rtol": 1e-4, "atol": 1e-5}
    assert d["environment"]["onnxruntime"] == ort.__version__
    assert d["environment"]["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert d["inputs"][0] == {
        "name": "x",
        "dtype": "float32",
        "shape": [1, 3, 32, 32],
        "source": "normal(0, 1)",
        "defaulted_dims": [0, 2, 3],
        "shape_source": "ladder: size 32",
    }
    out = d["runs"][0]["outputs"][0]
    assert set(out) >= {"max_abs", "max_rel", "mean_abs", "p999_abs", "cosine", "needed_atol", "needed_rtol"}
    assert d["localisation"]["first"] == "bn2" and len(d["localisation"]["checks"]) == 2
    assert all(isinstance(v, float) and math.isfinite(v) for v in (out["max_abs"], out["cosine"]))


def test_option_parsers():
    assert parse_shape_option("x=1,3,224,224") == ("x", (1, 3, 224, 224))
    assert parse_shape_option("input:0=1x3x8x8") == ("input:0", (1, 3, 8, 8))
    assert parse_shape_option("batch=4") == ("batch", (4,))
    assert parse_range_option("ids=0,30522") == ("ids", (0, 30522))
    assert parse_range_option("x=-1.5,2") == ("x", (-1.5, 2))
    assert parse_shape_option("1,3,8,8", allow_bare=True) == ("", (1, 3, 8, 8))
    for bad in ("x", "x=", "x=1,a", "=1,2", "1,3"):
        with pytest.raises(ValueError):
            parse_shape_option(bad)
    with pytest.raises(ValueError, match="LO must be below HI"):
        parse_range_option("ids=5,5")


# ---------------------------------------------------------------- terminal and command line


def test_render_comparison():
    from rich.console import Console

    from bnfold.check import render_comparison

    console = Console(record=True, width=120)
    console.print(render_comparison(verify(*two_convs(broken=1, how="bias"), seeds=(0,), fold_outputs=PAIRS, **FAST)))
    text = console.export_text()
    assert "Verification on CPU: FAILED" in text and "FAIL" in text
    assert "first diverging fold: 'bn1' (conv), Conv 'conv1'" in text.replace("\n", " ")


def _cli(argv: list[str]) -> int:
    from bnfold.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return int(exit_.value.code or 0)


def test_cli_verify_verb(tmp_path: Path, capsys):
    orig, bad = two_convs(broken=2, how="bias")
    _, good = two_convs()
    for name, m in (("a", orig), ("bad", bad), ("good", good)):
        onnx.save(m, tmp_path / f"{name}.onnx")
    a, report = str(tmp_path / "a.onnx"), tmp_path / "r.json"
    assert _cli(["verify", a, str(tmp_path / "bad.onnx"), "--seeds", "3", "--report", str(report), "-q"]) == 4
    err = capsys.readouterr().err
    assert (
        err.startswith("bnfold: verification failed on CPU seed 3, output 'y'") and "first diverging fold: 'bn2'" in err
    )
    data = json.loads(report.read_text())
    assert data["schema"] == "bnfold.verify-report/1" and data["exit_code"] == 4
    assert data["verification"]["seeds"] == [3] and data["verification"]["localisation"]["first"] == "bn2"
    good_args = ["verify", a, str(tmp_path / "good.onnx"), "-q", "--seeds", "0"]
    assert _cli([*good_args, "--shape", "1,3,8,8", "--atol", "1e-4", "--rtol", "0"]) == 0
    assert _cli([*good_args, "--shape", "N=2"]) == 0
    assert _cli([*good_args, "--shape", "z=1"]) == 3  # bad input: names no input
    assert _cli([*good_args, "--seeds", "a"]) == 2  # usage
    assert _cli([*good_args, "--input-range", "x=3,1"]) == 2
    np.savez(tmp_path / "in.npz", x=np.ones((1, 3, 4, 4), np.float32))
    assert _cli([*good_args, "--inputs", str(tmp_path / "in.npz")]) == 0


def test_cli_fold_checks_before_writing(tmp_path: Path, monkeypatch, capsys):
    """The fold verb verifies what the passes return; here they return a broken model on purpose."""
    import bnfold.folding.passes
    from bnfold.folding.passes import FoldedPair, FoldResult

    orig, bad = two_convs(broken=1, how="bias")
    _, good = two_convs()
    src = tmp_path / "m.onnx"
    onnx.save(orig, src)
    returned = {"model": bad}

    def fake_fold(model: object, *_: object, **__: object) -> FoldResult:
        pairs = tuple(FoldedPair("conv", "Conv", f"bn{i}", "BatchNormalization") for i in (1, 2))
        return FoldResult(pairs, (), 6, 4, model=returned["model"])

    monkeypatch.setattr(bnfold.folding.passes, "fold_model", fake_fold)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    base = [str(src), "-o", str(out), "--seeds", "0", "--report", str(report), "-q"]
    assert _cli(base) == 4 and not out.exists()
    assert "first diverging fold: 'bn1'" in capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["exit_code"] == 4 and data["output"]["written"] is False
    assert data["verification"]["passed"] is False and data["verification"]["localisation"]["first"] == "bn1"
    assert _cli([*base, "--force"]) == 4 and out.exists()
    assert "written anyway (--force)" in capsys.readouterr().err
    out.unlink()
    assert _cli([*base, "--no-verify"]) == 0 and out.exists()
    assert json.loads(report.read_text())["verification"] is None
    returned["model"] = good
    assert _cli([*base, "--shape", "x=1,3,8,8"]) == 0
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] is True and data["verification"]["inputs"][0]["shape"] == [1, 3, 8, 8]


def test_every_input_dtype_is_generated_and_compared():
    dtypes = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.bool_, np.int8, np.uint8, np.int16,
              np.uint16, np.int32, np.uint32, np.int64, np.uint64]  # fmt: skip
    ins, outs, nodes = [], [], []
    for i, dt in enumerate(dtypes):
        et = _onnx_type(np.dtype(dt))
        ins.append(helper.make_tensor_value_info(f"i{i}", et, ["N", 5]))
        outs.append(helper.make_tensor_value_info(f"o{i}", et, None))
        nodes.append(helper.make_node("Identity", [f"i{i}"], [f"o{i}"]))
    m = _model(nodes, ins, outs)
    result = verify(m, m, input_ranges={"i1": (-3, -2), "i6": (250, 256)}, seeds=(4,), **FAST)
    assert result.passed, result.summary
    assert [i.dtype for i in result.inputs] == [np.dtype(d).name for d in dtypes]
    assert [o.dtype for o in result.runs[0].outputs] == [np.dtype(d).name for d in dtypes]
    assert all(o.max_abs == 0.0 and o.shape == (1, 5) for o in result.runs[0].outputs)
    feeds = plan_feeds(model_inputs(m), input_ranges={"i1": (-3, -2), "i6": (250, 256)}).feeds(4)
    assert feeds["i1"].min() >= -3 and feeds["i1"].max() < -2  # a float range: uniform [lo, hi)
    assert feeds["i6"].dtype == np.uint8 and feeds["i6"].min() >= 250
    ints = [feeds[f"i{k}"] for k in (5, 7, 8, 9, 10, 11, 12)]  # the default integer range [0, 8)
    assert all(a.min() >= 0 and a.max() < 8 for a in ints)
    with pytest.raises(BadInputError, match=r"must be integers within uint8"):
        plan_feeds(model_inputs(m), input_ranges={"i6": (0, 300)})


def test_bfloat16_models_are_checked_widened_to_float32_and_a_wrong_fold_is_caught() -> None:
    """onnxruntime's CPU provider has no bf16 Conv: both models are widened exactly to float32."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper
    from test_rule_conv import ConvCase, build_conv_bn

    import bnfold

    case = ConvCase(2, 1, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), None, True,
                    np.dtype(ml_dtypes.bfloat16), 15, 1e-3, (5, 5), 3)
    model, _ = build_conv_bn(case)
    folded = bnfold.fold(model).model
    good = bnfold.verify(model, folded)
    assert good.passed and any("widened exactly to float32" in n for n in good.notes)
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    w = broken.graph.initializer[0]
    arr = numpy_helper.to_array(w).astype(np.float32)
    arr[1] *= 2.0  # one output channel scaled twice: what a fold on the wrong axis does to one channel
    w.CopyFrom(numpy_helper.from_array(arr.astype(ml_dtypes.bfloat16), w.name))
    bad = bnfold.verify(model, broken)
    assert not bad.passed
    assert bad.localisation is not None and bad.localisation.first is not None
