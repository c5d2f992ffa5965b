"""Conflicts resolved by cloning: a producer whose output also feeds something else (or is a graph
output) is cloned with the folded weights when allowed and small enough; otherwise a reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, make_model, ops, tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import bnfold
from bnfold.cli.app import main

PRODUCERS = ("conv", "conv_transpose", "gemm", "matmul2", "matmul3")


def bn_inits(c: int, rng: np.random.Generator, prefix: str = "bn") -> list[onnx.TensorProto]:
    return [
        tensor(f"{prefix}_g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        tensor(f"{prefix}_b", rng.standard_normal(c).astype(np.float32)),
        tensor(f"{prefix}_m", rng.standard_normal(c).astype(np.float32)),
        tensor(f"{prefix}_v", rng.uniform(0.5, 2.0, c).astype(np.float32)),
    ]


def bn_node(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *(f"{prefix}_{s}" for s in "gbmv")], [y], name=prefix)


def build(kind: str, c: int, norm: str, share: str, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``producer -> t``; ``t -> normalization -> y``; ``t`` also feeds a Relu and/or is a graph output."""
    rng = np.random.default_rng(seed)
    if kind == "conv":
        x_shape, w = [2, 3, 5, 5], rng.standard_normal((c, 3, 3, 3))
        prod = helper.make_node("Conv", ["x", "W", "B"], ["t"], name="producer", pads=[1, 1, 1, 1])
    elif kind == "conv_transpose":
        x_shape, w = [2, 3, 3, 3], rng.standard_normal((3, c, 2, 2))
        prod = helper.make_node("ConvTranspose", ["x", "W", "B"], ["t"], name="producer", strides=[2, 2])
    elif kind == "gemm":
        x_shape, w = [4, 3], rng.standard_normal((3, c))
        prod = helper.make_node("Gemm", ["x", "W", "B"], ["t"], name="producer", alpha=0.5, beta=2.0)
    else:
        x_shape = [4, 3] if kind == "matmul2" else [2, 4, 3]
        w = rng.standard_normal((3, c))
        prod = helper.make_node("MatMul", ["x", "W"], ["t"], name="producer")
    inits = [tensor("W", w.astype(np.float32)), tensor("B", rng.standard_normal(c).astype(np.float32))]
    nodes = [prod]
    rank = len(x_shape)
    if norm == "bn":
        inits += bn_inits(c, rng)
        nodes.append(bn_node("t", "y"))
    else:  # a decomposed normalization on the producer's channel axis
        shape = (c,) if kind.startswith(("matmul", "gemm")) else (c, 1, 1)
        inits += [tensor("s", rng.uniform(0.5, 2, shape).astype(np.float32)),
                  tensor("h", rng.standard_normal(shape).astype(np.float32))]
        nodes += [helper.make_node("Mul", ["t", "s"], ["u"], name="mul"),
                  helper.make_node("Add", ["u", "h"], ["y"], name="add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if share in ("consumer", "both"):
        nodes.append(helper.make_node("Relu", ["t"], ["r"], name="other"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    if share in ("output", "both"):
        outputs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, None))
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs, inits)
    assert rank >= 2
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


@settings(max_examples=35, deadline=None)
@given(
    kind=st.sampled_from(PRODUCERS),
    c=st.integers(1, 6),
    share=st.sampled_from(["consumer", "output", "both"]),
    seed=st.integers(0, 2**16),
)
def test_shared_producer_is_cloned_and_original_kept(kind: str, c: int, share: str, seed: int) -> None:
    if kind == "matmul3":
        kind = "matmul2"  # BN normalizes axis 1 of [B, T, C]: not the MatMul's columns
    model, feeds = build(kind, c, "bn", share, seed)
    result = bnfold.fold(model)
    assert result.skipped == (), result.skipped
    assert [p.output for p in result.folded] == ["y"]
    out_ops = ops(result.model)
    assert not {"BatchNormalization", "Mul"} & set(out_ops)
    original = model.graph.node[0]
    kept = [n for n in result.model.graph.node if n.output[0] == "t"]
    assert len(kept) == 1 and kept[0].SerializeToString() == original.SerializeToString()
    new = [n for n in result.model.graph.node if n.output[0] != "t" and n.name != "other"]
    assert {n.op_type for n in new} <= {original.op_type, "Gemm", "Add"}  # MatMul [+ Add] may become Gemm
    assert any(n.op_type in (original.op_type, "Gemm") and n.name == "producer_bnfold_clone" for n in new)
    assert {t.name for t in model.graph.initializer if t.name in ("W", "B")} <= {
        t.name for t in result.model.graph.initializer}
    assert_same_outputs(model, result.model, feeds)


def test_decomposed_chain_on_a_shared_output_is_not_cloned_for() -> None:
    """A Mul/Add on a tensor used elsewhere is arithmetic, not a normalization: no clone, no report."""
    for kind in PRODUCERS:
        model, _ = build(kind, 3, "mul_add", "consumer", 4)
        result = bnfold.fold(model)
        assert result.folded == () and result.skipped == ()
        assert ops(result.model) == ops(model)


def test_refuses_when_cloning_is_off() -> None:
    model, _ = build("conv", 4, "bn", "consumer", 0)
    result = bnfold.fold(model, clone=False)
    [skip] = result.skipped
    assert skip.reason == "output 't' of Conv 'producer' also feeds Relu 'other'; cloning it is turned off"
    assert ops(result.model) == ops(model)


def test_refuses_when_the_clone_is_too_big_and_the_bound_is_inclusive() -> None:
    model, feeds = build("conv", 4, "bn", "output", 0)
    result = bnfold.fold(model, max_clone_bytes=0)
    [skip] = result.skipped
    assert "is also a graph output" in skip.reason
    assert "a clone carrying the folded weights would add" in skip.reason and "more than the 0 allowed" in skip.reason
    needed = int(skip.reason.split("would add ")[1].split(" bytes")[0])
    assert bnfold.fold(model, max_clone_bytes=needed - 1).folded == ()
    exact = bnfold.fold(model, max_clone_bytes=needed)
    assert len(exact.folded) == 1
    assert_same_outputs(model, exact.model, feeds)


def test_two_normalizations_of_one_output_both_fold() -> None:
    rng = np.random.default_rng(1)
    inits = [tensor("W", rng.standard_normal((3, 2, 3, 3)).astype(np.float32)),
             *bn_inits(3, rng, "bn1"), *bn_inits(3, rng, "bn2")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["t"], name="conv"), bn_node("t", "y1", "bn1"),
             bn_node("t", "y2", "bn2")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                       [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)], inits)
    result = bnfold.fold(model)
    assert ops(result.model) == ["Conv", "Conv"] and result.skipped == ()
    assert sorted(p.output for p in result.folded) == ["y1", "y2"]
    names = [n.name for n in result.model.graph.node]
    assert len(set(names)) == len(names)
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)})


def test_clone_node_name_never_collides() -> None:
    model, feeds = build("conv", 2, "bn", "consumer", 2)
    model.graph.node[-1].name = "producer_bnfold_clone"  # the Relu already uses the natural clone name
    result = bnfold.fold(model)
    names = [n.name for n in result.model.graph.node]
    assert len(set(names)) == len(names) and "producer_bnfold_clone_1" in names
    assert_same_outputs(model, result.model, feeds)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, _ = capsys.readouterr()
    return int(info.value.code or 0), out


def test_cli_no_clone_and_max_clone_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = build("conv", 4, "bn", "consumer", 3)
    src, dst, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    for flags, folded in (([], True), (["--no-clone"], False), (["--max-clone-bytes", "8"], False)):
        code, _ = run_cli([str(src), "-o", str(dst), "--report", str(rep), "--no-verify", "-q", *flags], capsys)
        assert code == 0
        report = json.loads(rep.read_text())
        assert bool(report["folded"]) is folded
        if not folded:
            reason = report["skipped"][0]["reason"]
            assert ("turned off" in reason) if "--no-clone" in flags else ("more than the 8 allowed" in reason)
        assert ops(onnx.load(dst)).count("Conv") == (2 if folded else 1)


@pytest.mark.parametrize("kind", ["conv_transpose", "gemm", "matmul2"])
def test_every_producer_refuses_a_clone_over_the_bound(kind: str) -> None:
    model, _ = build(kind, 4, "bn", "output", 0)
    [skip] = bnfold.fold(model, max_clone_bytes=0).skipped
    assert "output 't' of " in skip.reason and "is also a graph output" in skip.reason
    assert "a clone carrying the folded weights would add" in skip.reason
    assert skip.reason.endswith("more than the 0 allowed (max_clone_bytes)")
