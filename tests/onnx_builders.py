"""Builders shared by the producer-rule tests (ConvTranspose, Gemm, MatMul): BatchNormalization nodes for
any opset and dtype, the lowest IR version an opset needs, and a runner that uses onnxruntime (every
graph optimization off) wherever its CPU provider has the kernel, and onnx's reference evaluator where it
does not (BatchNormalization-6, Gemm-6, fp64 ConvTranspose, bf16 everything), so every op version and
dtype is proven on some runtime.

onnx 1.23's reference BatchNormalization runs versions 7 to 13 in training mode (BatchNormalization-7
maps to its version-6 class, whose ``is_test`` defaults to 0; version 9 treats the filled-in ``momentum``
default as training), so dtypes only the reference evaluator runs are tested at opsets 6 and >= 14.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx
from conftest import assert_arrays_close, make_model, run_ort, tensor
from onnx import helper
from onnx.reference import ReferenceEvaluator

import bnfold
from bnfold.folding.passes import FoldResult

__all__ = [
    "BF16",
    "FP16",
    "FP32",
    "FP64",
    "assert_fold_matches",
    "bn",
    "build",
    "onnx_type",
    "opsets_for",
    "run_any",
    "runtime_for",
]

FP16, FP32, FP64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
BF16 = np.dtype(ml_dtypes.bfloat16)

ORT_MAX_IR = 13  # onnxruntime 1.31 loads IR versions up to 13


def onnx_type(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def ir_version_for(opset: int) -> int:
    """The lowest IR version that allows ``opset`` (what an exporter of that era wrote), but at least 4:
    IR 3 lists initializers as graph inputs, which has its own tests."""
    return min(max(4, helper.find_min_ir_version_for([helper.make_opsetid("", opset)])), ORT_MAX_IR)


def opsets_for(dtype: np.dtype, opsets: Sequence[int], *, bf16_from: int, ort_fp64: bool = True) -> list[int]:
    """The opsets at which ``dtype`` can be proven. onnxruntime's CPU provider runs fp16/fp32 (and fp64,
    except ConvTranspose: ``ort_fp64=False``) from opset 7, the reference evaluator opset 6; bf16 and
    fp64 without onnxruntime go to the reference evaluator, which is usable at opsets 6 and >= 14 only
    (see above), and bf16 needs the op's bf16 version (``bf16_from``)."""
    if dtype in (FP16, FP32) or (dtype == FP64 and ort_fp64):
        return list(opsets)
    usable = [o for o in opsets if o == 6 or o >= 14]
    return [o for o in usable if o >= bf16_from] if dtype == BF16 else usable


def bn(
    rng: np.random.Generator,
    x: str,
    y: str,
    channels: int,
    dtype: np.dtype,
    opset: int,
    *,
    epsilon: float | None = None,
    prefix: str = "bn",
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """An inference BatchNormalization valid at ``opset`` with random, non-trivial statistics.

    From BatchNormalization-15 on, fp16/bf16 inputs get fp32 statistics (its T1/T2 split), so that mixed
    case is exercised too. BatchNormalization-6 gets ``is_test=1`` (its default is training mode).
    """
    stat_dt = FP32 if opset >= 15 and dtype in (FP16, BF16) else dtype
    names = [f"{prefix}_{r}" for r in ("gamma", "beta", "mean", "var")]
    values = [
        rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels),
        rng.standard_normal(channels),
        rng.standard_normal(channels),
        rng.uniform(0.2, 2.0, channels),
    ]
    inits = [tensor(n, v.astype(stat_dt)) for n, v in zip(names, values, strict=True)]
    attrs: dict[str, object] = {} if epsilon is None else {"epsilon": epsilon}
    if opset < 7:
        attrs["is_test"] = 1
    return helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, **attrs), inits


def build(
    nodes: Sequence[onnx.NodeProto],
    inputs: dict[str, tuple[np.dtype, Sequence[int | str] | None]],
    outputs: dict[str, tuple[np.dtype, Sequence[int | str] | None]],
    inits: Sequence[onnx.TensorProto],
    opset: int,
) -> onnx.ModelProto:
    """A model at ``opset`` with the matching IR version; outputs without a shape get an inferred one."""
    return make_model(
        nodes,
        [helper.make_tensor_value_info(n, onnx_type(dt), shape) for n, (dt, shape) in inputs.items()],
        [helper.make_tensor_value_info(n, onnx_type(dt), shape) for n, (dt, shape) in outputs.items()],
        inits,
        opset=opset,
        ir_version=ir_version_for(opset),
    )


def runtime_for(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> str:
    """"onnxruntime" where its CPU provider has the kernels, else "reference"; any other onnxruntime
    failure (a malformed test model) is raised, never papered over by the other runtime."""
    try:
        run_ort(model, feeds)
    except Exception as exc:
        text = str(exc)
        if type(exc).__name__ == "NotImplemented" or "Type Error: Type (tensor(bfloat16))" in text:
            return "reference"
        raise
    return "onnxruntime"


def run_any(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runtime: str) -> list[np.ndarray]:
    if runtime == "onnxruntime":
        return run_ort(model, feeds)
    return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, feeds)]


def assert_fold_matches(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, folded_by: str, check: bool = True
) -> FoldResult:
    """Fold ``model``; assert every BatchNormalization is gone (folded by rule ``folded_by``), the graph
    contract is kept and the outputs match the original's on the same runtime by the product's
    tolerance table (``conftest.assert_arrays_close``)."""
    runtime = runtime_for(model, feeds)
    result = bnfold.fold(model, check=check)
    folded = result.model
    assert [s for s in result.skipped if s.op_type == "BatchNormalization"] == [], result.skipped
    assert all(n.op_type != "BatchNormalization" for n in folded.graph.node)
    assert result.folded and all(p.rule == folded_by for p in result.folded)
    assert folded.opset_import == model.opset_import and folded.ir_version == model.ir_version
    assert [o.SerializeToString() for o in folded.graph.output] == [
        o.SerializeToString() for o in model.graph.output
    ]
    expected = run_any(model, feeds, runtime)
    got = run_any(folded, feeds, runtime)
    assert_arrays_close(expected, got, label=f"{runtime}: ", names=[o.name for o in model.graph.output])
    return result
