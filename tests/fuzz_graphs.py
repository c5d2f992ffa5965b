"""Random valid ONNX graphs for property tests and long fuzz runs, and byte mutations for the loader.

``graphs()`` is a hypothesis strategy. It grows a graph one node at a time from one or two graph
inputs, mixing Conv / ConvTranspose / Gemm / MatMul / BatchNormalization / Relu / Add / Mul / Reshape /
Transpose / Concat with random attributes, and on purpose produces the awkward structures folding tools
get wrong:

* shared tensors: a weight initializer read by two producers, BN statistics shared by two BNs, a tensor
  read by several nodes (any earlier tensor may be picked as an input, not only the last one);
* graph outputs in the middle: a producer's output or a BN's output that is also a graph output;
* Mul / Add with constants of every broadcast shape: scalar, ``[1]``, ``[C]`` (the LAST axis, not the
  channel axis), ``[C, 1, 1]``, ``[1, C, 1, 1]``, partial and full shapes, constant on either side;
* constants as initializers or as ``Constant`` nodes; BNs with zero variance (``eps > 0``), negative
  gamma, every epsilon; Gemm with every ``C`` shape, ``alpha``, ``beta`` (0 included), ``transA/B``;
  ConvTranspose with groups, strides, dilations, output_padding; Conv with groups, auto_pad.

Shapes are tracked here and declared on every graph output, so the model passes
``onnx.checker.check_model(full_check=True)`` (strict shape inference): a generator bug shows up as a
checker failure of the *original*, which the tests report separately from a bnfold bug.

``mutate(data, rng)`` returns a damaged copy of serialized model bytes (bit flips, truncation,
insertion, deletion, duplicated or zeroed runs, varint-boundary bytes) for the loader fuzz.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from fuzz_check import check_fold, run_ort
from fuzz_mutate import mutate, mutate_proto
from fuzz_ops import _LINEAR, _MAX_ELEMENTS, _OTHER, _STEPS, _batchnorm, _Builder, _Value
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from onnx import TensorProto, helper

__all__ = [
    "FuzzCase",
    "build_case",
    "check_fold",
    "graphs",
    "mutate",
    "mutate_proto",
    "opset_ir",
    "run_ort",
    "sample_cases",
]


# opset -> an IR version that onnxruntime 1.31 and onnx 1.23 accept for it
_OPSET_IR = {13: 7, 14: 7, 15: 8, 17: 8, 19: 9, 21: 10}


def opset_ir(opset: int) -> int:
    return _OPSET_IR[opset]


@dataclass
class FuzzCase:
    """A random model, the feeds to run it on, and a one-line account of what was built."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    summary: str

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return f"FuzzCase({self.summary})"


def build_case(draw: st.DrawFn, *, max_steps: int = 8) -> FuzzCase:
    """Draw one random valid model (see the module docstring)."""
    opset = draw(st.sampled_from(sorted(_OPSET_IR)))
    seed = draw(st.integers(0, 2**32 - 1))
    b = _Builder(draw=draw, rng=np.random.default_rng(seed))
    kind = draw(st.sampled_from(["nchw", "nchw", "ncl", "nc", "nlc"]))
    batch = draw(st.integers(1, 2))
    if kind == "nchw":
        shape: tuple[int, ...] = (batch, draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    elif kind == "ncl":
        shape = (batch, draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    elif kind == "nc":
        shape = (batch, draw(st.integers(1, 8)))
    else:
        shape = (batch, draw(st.integers(1, 5)), draw(st.integers(1, 6)))
    inputs = [_Value("x", shape)]
    if draw(st.integers(0, 3)) == 0:
        inputs.append(_Value("x2", shape))
    b.values.extend(inputs)
    steps = draw(st.integers(1, max_steps))
    for _ in range(steps):
        name = draw(st.sampled_from(_STEPS))
        step = _LINEAR.get(name) or _OTHER[name]
        out = step(b)
        if out is not None and name in _LINEAR and draw(st.integers(0, 9)) < 6:
            out = _batchnorm(b, out)  # linear -> BN is what we are here to fold
        if out is not None and math.prod(out.shape) > _MAX_ELEMENTS:
            break
    for v in inputs:
        if v.name not in b.consumed:  # every graph input feeds something
            b.add("Relu", [v.name], v.shape, "relu")
    names = [v.name for v in b.values if v.name not in b.consumed and v not in inputs]
    extra = [v.name for v in b.values[len(inputs):] if draw(st.integers(0, 9)) == 0]
    out_names = list(dict.fromkeys(names + b.forced_outputs + extra))
    shapes = {v.name: v.shape for v in b.values}
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info(v.name, TensorProto.FLOAT, list(v.shape)) for v in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shapes[n])) for n in out_names],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=opset_ir(opset),
                              producer_name="bnfold-fuzz")
    feeds = {v.name: b.rng.standard_normal(v.shape).astype(np.float32) for v in inputs}
    summary = f"opset {opset}, input {list(shape)}: " + ", ".join(b.log) + f"; outputs {out_names}"
    return FuzzCase(model=model, feeds=feeds, summary=summary)


@st.composite
def graphs(draw: st.DrawFn, max_steps: int = 8) -> FuzzCase:
    """Hypothesis strategy: a random valid model with feeds (see :func:`build_case`)."""
    return build_case(draw, max_steps=max_steps)


def sample_cases(n: int, seed: int, max_steps: int = 8) -> list[FuzzCase]:
    """``n`` (or a few fewer) cases drawn deterministically from ``graphs()``, outside a test."""
    out: list[FuzzCase] = []

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(graphs(max_steps))
    def collect(case: FuzzCase) -> None:
        out.append(case)

    collect()
    return out
