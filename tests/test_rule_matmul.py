"""MatMul [-> Add] -> BatchNormalization: folds proven on a runtime over generated shapes, bias shapes and
orders, dtypes and opsets (into one Gemm where rank 2 is proven, else MatMul + Add), the last-axis
normalization of rank >= 3 activations, and one test per refusal."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from conftest import assert_arrays_close, assert_same_outputs, ops, run_ort, tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx_builders import BF16, FP16, FP32, FP64, assert_fold_matches, bn, build, opsets_for

import bnfold
from bnfold.folding.math import Affine
from bnfold.folding.passes import _apply
from bnfold.folding.rules import matmul
from bnfold.folding.rules.base import Fold, FoldContext, FoldOptions, Norm, Skip
from bnfold.ir.names import NameAllocator
from bnfold.ir.view import GraphView

# MatMul-1 (opsets 6-8), -9 (9-12), -13 (13+); Add-6, -7, -13, -14; Gemm-6 .. -13 where the fold emits
# one; BatchNormalization-6, -7, -9, -14, -15; 26 is the newest opset onnxruntime 1.31 loads.
OPSETS = [6, 7, 9, 13, 14, 15, 21, 26]
BIASES = ["none", "scalar", "[1]", "[N]", "[1,N]", "[M,1]", "[M,N]"]


@dataclass
class Case:
    m: int
    k: int
    n: int
    bias: str
    bias_first: bool
    a_vector: bool  # A is [K]: t = A @ B is [N], and only a [M, 1] / [M, N] bias makes Y rank 2
    dtype: np.dtype
    opset: int
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    dtype = draw(st.sampled_from([FP32, FP32, FP16, FP64, BF16]))
    bias = draw(st.sampled_from(BIASES))
    opset = draw(st.sampled_from(opsets_for(dtype, OPSETS, bf16_from=13)))
    return Case(
        m=draw(st.integers(1, 4)), k=draw(st.integers(1, 5)), n=draw(st.integers(1, 5)), bias=bias,
        bias_first=draw(st.booleans()),
        # Add-6 broadcasts its second input into the first one's shape: a [K] @ [K, N] there stays rank 1
        a_vector=bias in ("[M,1]", "[M,N]") and opset >= 7 and draw(st.booleans()),
        dtype=dtype, opset=opset,
        seed=draw(st.integers(0, 2**16)),
    )


def bias_dims(case: Case) -> tuple[int, ...] | None:
    m, n = case.m, case.n
    return {"none": None, "scalar": (), "[1]": (1,), "[N]": (n,), "[1,N]": (1, n), "[M,1]": (m, 1),
            "[M,N]": (m, n)}[case.bias]


def build_case(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(case.seed)
    dt = case.dtype
    a_shape = (case.k,) if case.a_vector else (case.m, case.k)
    inits = [tensor("B", rng.standard_normal((case.k, case.n)).astype(dt))]
    nodes = [helper.make_node("MatMul", ["a", "B"], ["t"], name="mm")]
    bn_in = "t"
    dims = bias_dims(case)
    if dims is not None:
        inits.append(tensor("bias", np.asarray(rng.standard_normal(dims)).astype(dt)))
        legacy = {"broadcast": 1} if case.opset < 7 else {}
        add_in = ["bias", "t"] if case.bias_first else ["t", "bias"]
        if legacy and case.bias_first:
            add_in = ["t", "bias"]  # Add-6 broadcasts its second input only
        nodes.append(helper.make_node("Add", add_in, ["u"], name="add", **legacy))
        bn_in = "u"
    bn_node, bn_inits = bn(rng, bn_in, "y", case.n, dt, case.opset)
    nodes.append(bn_node)
    model = build(nodes, {"a": (dt, a_shape)}, {"y": (dt, (case.m, case.n))}, inits + bn_inits, case.opset)
    return model, {"a": rng.standard_normal(a_shape).astype(dt)}


@settings(max_examples=40, deadline=None)
@given(cases())
def test_matmul_bn_folds_and_matches(case: Case) -> None:
    model, feeds = build_case(case)
    result = assert_fold_matches(model, feeds, folded_by="matmul")
    folded = result.model
    if case.a_vector:  # Gemm needs a rank-2 A: the MatMul stays, with the bias Add
        assert ops(folded) == ["MatMul", "Add"]
    else:
        assert ops(folded) == ["Gemm"]
        gemm = folded.graph.node[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        assert attrs == ({"broadcast": 1} if case.opset < 7 else {})
        assert gemm.name == "mm"
    init = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert all(v.dtype == case.dtype for v in init.values())
    dims = bias_dims(case)
    last = folded.graph.node[-1]
    (bias_f,) = [init[i] for i in (last.input[2:] if last.op_type == "Gemm" else last.input) if i in init]
    assert bias_f.shape == ((case.n,) if dims is None else np.broadcast_shapes(dims, (case.n,)))


def _simple(**changes: object) -> Case:
    return replace(Case(3, 4, 5, "[N]", False, False, FP32, 15, 11), **changes)


def test_no_add_and_zero_shift_leaves_a_bare_matmul() -> None:
    model, feeds = build_case(_simple(bias="none"))
    for t in model.graph.initializer:
        if t.name in ("bn_mean", "bn_beta"):
            t.CopyFrom(tensor(t.name, np.zeros(5, np.float32)))
    result = bnfold.fold(model)
    assert ops(result.model) == ["MatMul"] and result.model.graph.node[0].output[0] == "y"
    assert_same_outputs(model, result.model, feeds)


def test_clone_when_matmul_output_has_another_consumer() -> None:
    model, feeds = build_case(_simple())
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [3, 5]))
    result = bnfold.fold(model)
    assert sorted(ops(result.model)) == ["Gemm", "MatMul", "Relu"]  # the dead bias Add is gone
    assert next(n for n in result.model.graph.node if n.name == "mm").input[1] == "B"
    assert_same_outputs(model, result.model, feeds)


def test_clone_when_add_output_has_another_consumer() -> None:
    model, feeds = build_case(_simple(a_vector=True, bias="[M,N]"))
    model.graph.output.append(helper.make_tensor_value_info("u", onnx.TensorProto.FLOAT, [3, 5]))
    result = bnfold.fold(model)
    assert sorted(ops(result.model)) == ["Add", "Add", "MatMul", "MatMul"]
    assert_same_outputs(model, result.model, feeds)


def test_rerun_is_byte_identical_and_idempotent() -> None:
    model, _ = build_case(_simple(a_vector=True, bias="[M,1]"))
    first = bnfold.fold(model).model.SerializeToString()
    assert bnfold.fold(model).model.SerializeToString() == first
    again = bnfold.fold(first)
    assert again.folded == () and again.model.SerializeToString() == first


# ---- a normalization of the last axis (the decomposed-BN rules hand it over) -----------------------

@dataclass
class LastAxisCase:
    batch: tuple[int, ...]
    k: int
    n: int
    bias: bool
    b_batched: bool  # B is [b, K, N]: per-batch weights, still columns on the last axis
    dtype: np.dtype
    seed: int


@st.composite
def last_axis_cases(draw: st.DrawFn) -> LastAxisCase:
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    return LastAxisCase(batch=batch, k=draw(st.integers(1, 4)), n=draw(st.integers(1, 5)),
                        bias=draw(st.booleans()), b_batched=draw(st.booleans()),
                        dtype=draw(st.sampled_from([FP32, FP16, FP64])), seed=draw(st.integers(0, 2**16)))


def _fold_last_axis(model: onnx.ModelProto, add_idx: int, mul_idx: int, affine: Affine) -> onnx.ModelProto:
    """Match and apply the way the pass does, for a ``Mul -> Add`` normalization on axis -1."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ctx = FoldContext(GraphView(out.graph), NameAllocator(out), FoldOptions())
    norm = Norm(nodes=(mul_idx, add_idx), input=out.graph.node[mul_idx].input[0], output="y",
                affine=affine, channel_axis=-1, op_type="Mul")
    fold = matmul.match(ctx, norm)
    assert isinstance(fold, Fold), fold
    _apply(out.graph, [fold], set())
    onnx.checker.check_model(out)
    return out


@settings(max_examples=40, deadline=None)
@given(last_axis_cases())
def test_last_axis_normalization_of_rank3_plus_activations(case: LastAxisCase) -> None:
    rng = np.random.default_rng(case.seed)
    dt = case.dtype
    a_shape = (*case.batch, 2, case.k)
    b_shape = (case.batch[-1], case.k, case.n) if case.b_batched else (case.k, case.n)
    scale, shift = rng.uniform(-2, 2, case.n), rng.standard_normal(case.n)
    inits = [tensor("B", rng.standard_normal(b_shape).astype(dt)), tensor("s", scale.astype(dt)),
             tensor("h", shift.astype(dt))]
    nodes = [helper.make_node("MatMul", ["a", "B"], ["t"], name="mm")]
    if case.bias:
        inits.append(tensor("bias", rng.standard_normal(case.n).astype(dt)))
        nodes.append(helper.make_node("Add", ["t", "bias"], ["u"], name="add"))
    nodes += [helper.make_node("Mul", [nodes[-1].output[0], "s"], ["v"], name="mul"),
              helper.make_node("Add", ["v", "h"], ["y"], name="shift")]
    model = build(nodes, {"a": (dt, a_shape)}, {"y": (dt, None)}, inits, 17)
    affine = Affine(scale.astype(dt).astype(np.float64), shift.astype(dt).astype(np.float64))
    folded = _fold_last_axis(model, len(nodes) - 1, len(nodes) - 2, affine)
    assert ops(folded) == ["MatMul", "Add"]
    feeds = {"a": rng.standard_normal(a_shape).astype(dt)}
    assert_arrays_close(run_ort(model, feeds), run_ort(folded, feeds))


def test_lone_bias_add_after_matmul_is_not_refolded() -> None:
    """A constant Add right after a MatMul is its bias, the folded form itself: no endless rewrite."""
    model = build([helper.make_node("MatMul", ["a", "B"], ["t"]), helper.make_node("Add", ["t", "h"], ["y"])],
                  {"a": (FP32, (2, 3, 4))}, {"y": (FP32, None)},
                  [tensor("B", np.ones((4, 5), np.float32)), tensor("h", np.ones(5, np.float32))], 17)
    ctx = FoldContext(GraphView(model.graph), NameAllocator(model), FoldOptions())
    norm = Norm(nodes=(1,), input="t", output="y", affine=Affine(np.ones(5), np.ones(5)), channel_axis=-1,
                op_type="Add")
    assert matmul.match(ctx, norm) is None


# ---- refusals: one test each, asserting the reason -------------------------------------------------

def _only_skip(model: onnx.ModelProto, **kw: object) -> str:
    result = bnfold.fold(model, clone=False, **kw)  # type: ignore[arg-type]
    assert result.folded == ()
    assert "BatchNormalization" in ops(result.model)
    (skip,) = [s for s in result.skipped if s.op_type == "BatchNormalization"]
    return skip.reason


def _replace_init(model: onnx.ModelProto, name: str, value: np.ndarray | None) -> onnx.TensorProto:
    old = next(t for t in model.graph.initializer if t.name == name)
    keep = [t for t in model.graph.initializer if t.name != name]
    if value is not None:
        keep.append(tensor(name, value))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return old


def test_refuses_rank3_activation_channel_axis_is_not_the_column_axis() -> None:
    """[N, C, L] @ [L, C]: BN normalizes axis 1 (C), the MatMul's columns are axis 2 (also C wide)."""
    rng = np.random.default_rng(0)
    bn_node, bn_inits = bn(rng, "t", "y", 3, FP32, 15)
    model = build([helper.make_node("MatMul", ["a", "B"], ["t"], name="mm"), bn_node],
                  {"a": (FP32, (2, 3, 4))}, {"y": (FP32, (2, 3, 3))},
                  [tensor("B", np.ones((4, 3), np.float32)), *bn_inits], 15)
    reason = _only_skip(model)
    assert ("BatchNormalization normalizes axis 1 of the rank-3 tensor 't', the input of the "
            "BatchNormalization, but the columns of MatMul 'mm' are its last axis (2)") in reason


def test_refuses_unknown_rank() -> None:
    model, _ = build_case(_simple())
    model.graph.input[0].type.tensor_type.ClearField("shape")
    reason = _only_skip(model, check=False)  # the checker wants the shape onnxruntime does not need
    assert "the rank of 'u', the input of the BatchNormalization, is unknown" in reason
    assert "MatMul 'mm'" in reason


def test_refuses_weight_graph_input() -> None:
    model, _ = build_case(_simple())
    _replace_init(model, "B", None)
    model.graph.input.append(helper.make_tensor_value_info("B", onnx.TensorProto.FLOAT, [4, 5]))
    assert "weight of MatMul 'mm' 'B' is a graph input, not a constant" in _only_skip(model)


def test_refuses_bias_computed_at_run_time() -> None:
    """A residual Add(MatMul(...), x) is not a bias."""
    model, _ = build_case(_simple())
    _replace_init(model, "bias", None)
    model.graph.input.append(helper.make_tensor_value_info("bias", onnx.TensorProto.FLOAT, [3, 5]))
    assert "bias of Add 'add' 'bias' is a graph input, not a constant" in _only_skip(model)


def test_refuses_matmul_output_with_another_consumer() -> None:
    model, _ = build_case(_simple())
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [3, 5]))
    reason = _only_skip(model)
    assert "output 't' of MatMul 'mm' also feeds Relu 'other'" in reason and "cloning it is turned off" in reason


def test_refuses_add_output_that_is_graph_output() -> None:
    model, _ = build_case(_simple())
    model.graph.output.append(helper.make_tensor_value_info("u", onnx.TensorProto.FLOAT, [3, 5]))
    assert "output 'u' of Add 'add' is also a graph output" in _only_skip(model)


def test_refuses_column_count_mismatch() -> None:
    model, _ = build_case(_simple(bias="none"))
    _replace_init(model, "B", np.ones((4, 1), np.float32))
    reason = _only_skip(model, check=False)
    assert "MatMul 'mm' has 1 output columns but the normalization has 5 channels" in reason


def test_refuses_vector_weight() -> None:
    model, _ = build_case(_simple(bias="[M,N]", a_vector=False))
    _replace_init(model, "B", np.ones(4, np.float32))
    reason = _only_skip(model, check=False)
    assert "weight 'B' of MatMul 'mm' is a vector: the product has no column axis to scale" in reason


def test_refuses_bias_with_wrong_last_axis() -> None:
    model, _ = build_case(_simple())
    _replace_init(model, "bias", np.ones((5, 3), np.float32))
    reason = _only_skip(model, check=False)
    assert "bias 'bias' has shape [5, 3]: its last axis is neither 1 nor 5" in reason


def test_refuses_legacy_axis_broadcast() -> None:
    """Add-6 with axis=0 broadcasts a [M] bias along the rows: not a per-column bias."""
    model, _ = build_case(_simple(opset=6, bias="[M,1]"))
    _replace_init(model, "bias", np.ones(3, np.float32))
    model.graph.node[1].attribute.append(helper.make_attribute("axis", 0))
    reason = _only_skip(model, check=False)
    assert "Add 'add' broadcasts its bias 'bias' with a legacy axis attribute" in reason


def test_refuses_integer_weight() -> None:
    model, _ = build_case(_simple())
    _replace_init(model, "B", np.ones((4, 5), np.int32))
    reason = _only_skip(model, check=False)
    assert "weight 'B' of MatMul 'mm' has element type INT32, not a floating-point type" in reason


def test_refuses_fp16_overflow() -> None:
    model, _ = build_case(_simple(dtype=FP16))
    _replace_init(model, "bn_var", np.full(5, 1e-9, np.float32))
    _replace_init(model, "bn_gamma", np.full(5, 5000.0, np.float32))
    assert "folded weight of MatMul 'mm' overflows float16" in _only_skip(model)


def test_refuses_channel_axis_other_than_last() -> None:
    model, _ = build_case(_simple(bias="none"))
    ctx = FoldContext(GraphView(model.graph), NameAllocator(model), FoldOptions())
    norm = Norm(nodes=(1,), input="t", output="y", affine=Affine(np.ones(5), np.zeros(5)), channel_axis=-2,
                op_type="Mul")
    outcome = matmul.match(ctx, norm)
    assert isinstance(outcome, Skip)
    assert "the normalization's channel axis -2 is not the column axis (-1) of MatMul 'mm'" in outcome.reason



def test_bias_taller_than_a_stays_matmul_add_not_an_invalid_gemm() -> None:
    """A [1, K] @ [K, N] + bias [M, 1] broadcasts to [M, N]: a Gemm with that C is invalid (review C1)."""
    import numpy as np
    from conftest import assert_same_outputs, make_model, ops, tensor
    from onnx import helper

    import bnfold

    rng = np.random.default_rng(0)
    k, n, m = 3, 4, 5
    stats = [("s", rng.uniform(0.5, 1.5, n)), ("b", rng.standard_normal(n)), ("m", rng.standard_normal(n)),
             ("v", rng.uniform(0.5, 2, n))]
    inits = [tensor("B", rng.standard_normal((k, n)).astype(np.float32)),
             tensor("bias", rng.standard_normal((m, 1)).astype(np.float32)),
             *(tensor(name, v.astype(np.float32)) for name, v in stats)]
    nodes = [helper.make_node("MatMul", ["a", "B"], ["t"]), helper.make_node("Add", ["t", "bias"], ["u"]),
             helper.make_node("BatchNormalization", ["u", "s", "b", "m", "v"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("a", 1, [1, k])],
                       [helper.make_tensor_value_info("y", 1, [m, n])], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["MatMul", "Add"]
    assert_same_outputs(model, result.model, {"a": rng.standard_normal((1, k)).astype(np.float32)})
