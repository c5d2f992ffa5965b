"""Shared pieces of the bnfold.timing tests: a fast schedule and a Conv model with or without a BatchNormalization."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.check import runtime

CPU, CUDA = runtime.CPU, runtime.CUDA


FAST: dict[str, Any] = {"runs": 6, "warmup": 1, "rounds": 3, "creations": 1, "threads": 1, "resamples": 200}


def conv_model(bn: bool, *, batch: str | int = "N", input_name: str = "x") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", [input_name, "W"], ["c" if bn else "y"], pads=[1, 1, 1, 1])]
    if bn:
        for name in ("scale", "bias", "mean", "var"):
            value = np.abs(rng.standard_normal(8)).astype(np.float32) + 0.1
            inits.append(numpy_helper.from_array(value, name))
        nodes.append(helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
