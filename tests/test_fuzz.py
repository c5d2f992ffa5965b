"""Property tests over random valid graphs, a short loader fuzz, and the regressions the fuzzers found.

The graphs come from :func:`fuzz_graphs.graphs` (Conv / ConvTranspose / Gemm / MatMul / BN / Relu / Add /
Mul / Reshape / Transpose / Concat, shared weights and statistics, tensors with several consumers, graph
outputs in the middle, broadcast constants). Every fold goes through :func:`fuzz_graphs.check_fold`:
checker, onnxruntime equivalence with optimizations off, contract, determinism, fixed point. CI runs a
few hundred examples; ``scripts/fuzz.py`` runs thousands (and ``HYPOTHESIS_PROFILE=thorough`` scales
these tests up).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from conftest import make_model, tensor
from fuzz_graphs import FuzzCase, check_fold, graphs, mutate, mutate_proto, sample_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold
from bnfold.errors import BnfoldError
from bnfold.folding.rules import RULES

ROOT = Path(__file__).resolve().parent.parent
_SCALE = max(1, settings().max_examples // 60)  # "ci" profile: 60 -> x1; "thorough": 2000 -> x33
RULE_NAMES = [m.NAME for m in RULES]


@settings(max_examples=300 * _SCALE)
@given(graphs())
def test_random_graphs_fold_to_the_same_function(case: FuzzCase) -> None:
    check_fold(case)


@settings(max_examples=100 * _SCALE)
@given(graphs(max_steps=14))
def test_longer_random_graphs(case: FuzzCase) -> None:
    check_fold(case)


@settings(max_examples=100 * _SCALE)
@given(graphs(), st.sets(st.sampled_from(RULE_NAMES)))
def test_random_graphs_with_a_subset_of_rules(case: FuzzCase, only: set[str]) -> None:
    result = check_fold(case, only=sorted(only))
    assert {p.rule for p in result.folded} <= only


def test_sample_cases_is_deterministic() -> None:
    a = [c.model.SerializeToString() for c in sample_cases(5, seed=7)]
    b = [c.model.SerializeToString() for c in sample_cases(5, seed=7)]
    assert a == b and len(a) == 5


def test_mutations_change_bytes_and_are_reproducible() -> None:
    data = sample_cases(1, seed=3)[0].model.SerializeToString()
    for i in range(20):
        m1 = mutate(data, np.random.default_rng([1, i]))
        assert m1 == mutate(data, np.random.default_rng([1, i]))
        p1 = mutate_proto(data, np.random.default_rng([2, i]))
        assert p1 == mutate_proto(data, np.random.default_rng([2, i]))


def test_loader_fuzz_short(tmp_path: Path) -> None:
    """300 damaged models in a child process (a crash or hang would be caught there): each must fold or
    raise BnfoldError, never another exception."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "loader", "--cases", "300", "--batch", "300",
         "--seed", "0", "--timeout", "120", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "300 cases, 0 failure(s)" in proc.stdout


# ---- regressions found by the fuzzers ------------------------------------------------------------------

def _conv_bn_chain() -> FuzzCase:
    """Conv -> BN -> BN: the first BN's output name disappears when the second folds too (the report's
    folded outputs are keys of the *original* model, not of the folded one)."""
    rng = np.random.default_rng(0)
    c = 3
    stats = [tensor(f"{n}{i}", v.astype(np.float32)) for i in (1, 2) for n, v in
             (("g", rng.uniform(0.5, 1.5, c)), ("b", rng.standard_normal(c)), ("m", rng.standard_normal(c)),
              ("v", rng.uniform(0.5, 2, c)))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g1", "b1", "m1", "v1"], ["bn1"]),
        helper.make_node("BatchNormalization", ["bn1", "g2", "b2", "m2", "v2"], ["y"]),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])],
                       [tensor("W", rng.standard_normal((c, 2, 1, 1)).astype(np.float32)), *stats])
    return FuzzCase(model, {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)}, "Conv -> BN -> BN")


def test_regression_conv_bn_bn_chain_folds_completely() -> None:
    result = check_fold(_conv_bn_chain())
    assert [p.output for p in result.folded] == ["bn1", "y"]
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_regression_chain_fold_is_deterministic() -> None:
    """Same input, twice, same bytes (the fuzz oracle checks it on every example; keep one explicit)."""
    case = _conv_bn_chain()
    data = case.model.SerializeToString()
    assert bnfold.fold(data).model.SerializeToString() == bnfold.fold(data).model.SerializeToString()


def _bn_then_conv_group0() -> onnx.ModelProto:
    """x -> BatchNormalization -> Conv(group=0). onnx.checker accepts group=0 (no shape inference)."""
    rng = np.random.default_rng(0)
    stats = [tensor(n, v.astype(np.float32)) for n, v in
             (("g", rng.uniform(0.5, 1.5, 2)), ("b", rng.standard_normal(2)), ("m", rng.standard_normal(2)),
              ("v", rng.uniform(0.5, 2, 2)))]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["t"]),
        helper.make_node("Conv", ["t", "W"], ["y"], group=0),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                      [tensor("W", rng.standard_normal((2, 2, 1, 1)).astype(np.float32)), *stats])


def test_regression_bn_before_conv_with_group_0_is_refused_not_a_crash() -> None:
    """Found by the loader fuzz (seed 1, case 692): a mutated group attribute."""
    model = _bn_then_conv_group0()
    try:
        result = bnfold.fold(model)
    except BnfoldError:
        return
    assert "BatchNormalization" in [n.op_type for n in result.model.graph.node]


def test_regression_bn_before_conv_with_stride_0_is_refused_not_a_crash() -> None:
    """Found by the loader fuzz (seed 300, case 7070): a mutated strides attribute."""
    model = _bn_then_conv_group0()
    conv = model.graph.node[1]
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("auto_pad", "SAME_UPPER"),
                           helper.make_attribute("strides", [1, 0])])
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.CopyFrom(tensor("W", np.ones((2, 2, 3, 3), np.float32)))
    try:
        result = bnfold.fold(model)
    except BnfoldError:
        return
    assert "BatchNormalization" in [n.op_type for n in result.model.graph.node]
