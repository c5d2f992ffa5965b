"""A Conv followed by one Mul / Add / Sub / Div by a constant: the graph the affine-rule tests start from."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import make_model, tensor
from onnx import TensorProto, helper


def conv_then(op: str, const: np.ndarray, width: int = 4, channels: int = 4) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(3)
    inits = [tensor("W", rng.standard_normal((channels, 2, 1, 1)).astype(np.float32)), tensor("k", const)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["t"], name="conv"),
             helper.make_node(op, ["t", "k"], ["y"], name="norm")]
    shape = [2, 2, 3, width]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return model, {"x": rng.standard_normal(shape).astype(np.float32)}
