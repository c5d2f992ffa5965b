"""What every fuzzed fold must satisfy (``check_fold``), proven on onnxruntime with its optimizations off."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from conftest import assert_arrays_close

import bnfold
from bnfold.folding.passes import FoldResult, count_nodes

if TYPE_CHECKING:
    from fuzz_graphs import FuzzCase


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run on the CPU provider with every onnxruntime graph optimization off, one thread."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)  # type: ignore[no-any-return]


def _signature(values: object) -> list[bytes]:
    return [v.SerializeToString() for v in values]  # type: ignore[attr-defined]


def check_fold(case: FuzzCase, **options: object) -> FoldResult:
    """Fold ``case.model`` and assert everything a fold promises. Returns the result.

    The original passes the full checker (else the generator is wrong, reported as such); the fold
    leaves its input untouched, passes the full checker, keeps inputs / outputs / opsets / IR version,
    accounts for every BatchNormalization left, loads and runs on onnxruntime (``ORT_DISABLE_ALL``) with
    the original's outputs within tolerance, is byte-for-byte deterministic, and is a fixed point.
    """
    model = case.model
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - a generator bug, not a bnfold one
        raise AssertionError(f"generator produced an invalid model: {exc}") from exc
    before = model.SerializeToString()
    result = bnfold.fold(model, **options)  # type: ignore[arg-type]
    out = result.model
    assert model.SerializeToString() == before, "fold modified its input model"
    onnx.checker.check_model(out, full_check=True)
    g, h = model.graph, out.graph
    assert _signature(g.input) == _signature(h.input), "graph inputs changed"
    assert _signature(g.output) == _signature(h.output), "graph outputs changed"
    assert _signature(model.opset_import) == _signature(out.opset_import), "opset imports changed"
    assert model.ir_version == out.ir_version, "IR version changed"
    left = [n.output[0] for n in h.node if n.op_type == "BatchNormalization"]
    skipped = [s.output for s in result.skipped if s.op_type == "BatchNormalization" and not s.graph]
    assert sorted(left) == sorted(skipped), f"BNs left {left} but skips reported for {skipped}"
    for skip in result.skipped:  # on a valid graph, a rule that raised is a rule bug, not a refusal
        assert "could not analyse this pattern" not in skip.reason and "could not be read" not in skip.reason, skip
    assert result.nodes_before == count_nodes(g) and result.nodes_after == count_nodes(h)
    original_outputs = {o for n in g.node for o in n.output}
    for pair in result.folded:  # the localisation key: a tensor of the original (the BN's output, or for a
        # BN folded forward into the Conv after it, the Conv's output)
        assert pair.output in original_outputs, f"folded pair {pair} names no tensor of the original"
    expected = run_ort(model, case.feeds)
    got = run_ort(out, case.feeds)
    assert_arrays_close(expected, got, label=f"{result.folded}: ", names=[o.name for o in g.output])
    again = bnfold.fold(before, **options)  # type: ignore[arg-type]
    assert again.model.SerializeToString() == out.SerializeToString(), "fold is not deterministic"
    if result.folded:
        assert not bnfold.fold(out, **options).folded, "a second fold folded more: not a fixed point"  # type: ignore[arg-type]
    return result
