"""Models as real exporters write them, built in code for the input-synthesis, per-fold and dialect tests.

Each builder returns an ``onnx.ModelProto`` that passes ``onnx.checker`` (unless its docstring says
otherwise) and reproduces one failure seen on published models:

- :func:`paddle_detector`: paddle2onnx style: ``dim_value: -1`` dims, weights as Constant nodes, Conv
  followed by a separate bias Add, then BN, and a head that upsamples with Resize and concatenates with
  a stride-4 branch, so the model only runs at multiples of 32 (16 x 16 fails).
- :func:`ill_conditioned`: deep Conv + BN beside an equal pre-folded branch, subtracted: the output is
  float32 rounding noise amplified by depth, so any exact fold misses the fixed float32 tolerance.
- :func:`reshape_locked`: runs only at one size no ladder step hits (the whole model cannot be checked;
  each fold can).
- :func:`unknown_rank`: the fold's input has no rank anyone can know and the model cannot run on
  generated data: no check covers the fold.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto], opset: int = 13, ir: int = 8) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def _bn_params(rng: np.random.Generator, c: int, prefix: str) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), f"{prefix}_s"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{prefix}_b"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{prefix}_m"),
        numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), f"{prefix}_v"),
    ]


def _bn(x: str, prefix: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y])


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))


def paddle_detector(seed: int = 0, c: int = 4) -> onnx.ModelProto:
    """x[-1,3,-1,-1] -> stride-2 and stride-4 Conv/Add/BN/Relu branches; the stride-4 one is upsampled 2x
    (Resize) and concatenated with the stride-2 one: H and W must be multiples of 4 for the Concat, and a
    final stride-8 check (a Reshape to H/32 blocks) makes 32 the real step, as paddle's DB heads need."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    w1 = (rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((c, c, 3, 3)) * 0.3).astype(np.float32)
    nodes += [
        _const("w1", w1), _const("b1", rng.standard_normal((1, c, 1, 1)).astype(np.float32)),
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "b1"], ["c1b"]),
        _bn("c1b", "bn1", "n1"), helper.make_node("Relu", ["n1"], ["r1"]),
        _const("w2", w2),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        _bn("c2", "bn2", "n2"), helper.make_node("Relu", ["n2"], ["r2"]),
        _const("scales", np.array([1, 1, 2, 2], np.float32)),
        helper.make_node("Resize", ["r2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["r1", "up"], ["cat"], axis=1),
        # paddle's DB head pools by 16 and upsamples back: a size that is not a multiple of 32 breaks the Add
        helper.make_node("MaxPool", ["cat"], ["pool"], kernel_shape=[16, 16], strides=[16, 16]),
        _const("scales16", np.array([1, 1, 16, 16], np.float32)),
        helper.make_node("Resize", ["pool", "", "scales16"], ["back"], mode="nearest"),
        helper.make_node("Add", ["cat", "back"], ["y"]),
    ]
    inits += _bn_params(rng, c, "bn1") + _bn_params(rng, c, "bn2")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 2 * c, -1, -1])
    return _model(nodes, [x], [y], inits, opset=13)


def ill_conditioned(layers: int = 6, c: int = 8, gain: float = 3.0, seed: int = 0,
                    broken: float = 0.0) -> onnx.ModelProto:
    """Conv + BN ``layers`` deep beside the same layers with BN pre-folded (in float64, rounded once),
    subtracted: y is rounding noise in the hundreds' scale. ``broken``: add this to the pre-folded branch's
    first bias (an exact branch stops being exact)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    a = b = "x"
    for i in range(layers):
        w = (rng.standard_normal((c, c, 3, 3)) * gain / np.sqrt(9 * c)).astype(np.float32)
        params = _bn_params(rng, c, f"bn{i}")
        s, bb, m, v = (numpy_helper.to_array(t).astype(np.float64) for t in params)
        k = s / np.sqrt(v + 1e-5)
        wf = (w * k[:, None, None, None]).astype(np.float32)
        bf = (bb - m * k).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), *params, numpy_helper.from_array(wf, f"wf{i}"),
                  numpy_helper.from_array(bf, f"bf{i}")]
        nodes += [
            helper.make_node("Conv", [a, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            _bn(f"c{i}", f"bn{i}", f"a{i}"),
            helper.make_node("Conv", [b, f"wf{i}", f"bf{i}"], [f"r{i}"], pads=[1, 1, 1, 1]),
        ]
        a, b = f"a{i}", f"r{i}"
    nodes.append(helper.make_node("Sub", [a, b], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, "H", "W"])
    return _model(nodes, [x], [y], inits)


def reshape_locked(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,H,W] -> Conv -> BN -> Reshape to [1, 252]: runs only where 4*H*W = 252 (7 x 9, 9 x 7, ...)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 1, 1))).astype(np.float32), "w"),
             *_bn_params(rng, 4, "bn"), numpy_helper.from_array(np.array([1, 252], np.int64), "target")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "bn", "n"),
             helper.make_node("Reshape", ["n", "target"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 252])
    return _model(nodes, [x], [y], inits)


def unknown_rank(seed: int = 0) -> onnx.ModelProto:
    """x (no shape) reshaped by a runtime shape input, then Conv -> BN: the Conv's input rank is unknowable
    and generated shape data ([0, 8) integers) never fits x's element count."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 1, 1))).astype(np.float32), "w"),
             *_bn_params(rng, 4, "bn")]
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Conv", ["r", "w"], ["c"]),
             _bn("c", "bn", "y")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000003])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c", "d"])
    return _model(nodes, [x, s], [y], inits)


def tf2onnx_block(seed: int = 0, c: int = 4, decomposed: bool = True) -> onnx.ModelProto:
    """x NHWC[-1, H, W, 3] -> Transpose to NCHW -> Conv -> Transpose to NHWC -> Identity -> Identity ->
    BN as tf2onnx writes it: ``decomposed`` Mul(scale) + Add(shift) over the last (NHWC channel) axis, or
    Transpose back to NCHW + BatchNormalization -> Transpose -> Relu."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "conv/kernel")
    inits = [w]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "conv/kernel"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["conv"], ["conv_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Identity", ["conv_nhwc"], ["id1"]),
        helper.make_node("Identity", ["id1"], ["id2"]),
    ]
    if decomposed:
        params = _bn_params(rng, c, "bn")
        s, bb, m, v = (numpy_helper.to_array(t).astype(np.float64) for t in params)
        k = s / np.sqrt(v + 1e-3)
        inits += [numpy_helper.from_array(k.astype(np.float32), "bn/mul"),
                  numpy_helper.from_array((bb - m * k).astype(np.float32), "bn/sub")]
        nodes += [helper.make_node("Mul", ["id2", "bn/mul"], ["bn_mul"]),
                  helper.make_node("Add", ["bn_mul", "bn/sub"], ["bn_out"]),
                  helper.make_node("Relu", ["bn_out"], ["y"])]
    else:
        inits += _bn_params(rng, c, "bn")
        nodes += [helper.make_node("Transpose", ["id2"], ["bn_in"], perm=[0, 3, 1, 2]),
                  _bn("bn_in", "bn", "bn_nchw"),
                  helper.make_node("Transpose", ["bn_nchw"], ["bn_out"], perm=[0, 2, 3, 1]),
                  helper.make_node("Relu", ["bn_out"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["unk__1", "unk__2", "unk__3", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__1", "unk__2", "unk__3", c])
    return _model(nodes, [x], [y], inits, opset=13)


def squeeze_after_resize(seed: int = 0, c: int = 4, opset: int = 13) -> onnx.ModelProto:
    """paddle recogniser tail: x[-1,3,-1,-1] -> Resize (dims unknown to hand propagation) -> Conv (kernel 3
    x 3, no H padding) -> Squeeze(axis 2) -> BN over [N, C, W]: x must have H = 3 at run time."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             *_bn_params(rng, c, "bn"), numpy_helper.from_array(np.array([1, 1, 1, 1], np.float32), "sc"),
             numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    nodes = [helper.make_node("Resize", ["x", "roi", "sc"], ["xr"], mode="nearest"),
             helper.make_node("Conv", ["xr", "w"], ["c"], pads=[0, 1, 0, 1])]
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([-2], np.int64), "axes"))  # negative axis, as an input
        nodes.append(helper.make_node("Squeeze", ["c", "axes"], ["sq"]))
    else:
        nodes.append(helper.make_node("Squeeze", ["c"], ["sq"], axes=[2]))
    nodes.append(_bn("sq", "bn", "y"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 3, -1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, c, -1])
    return _model(nodes, [x], [y], inits, opset=opset)


def ir3_conv_bn(seed: int = 0, c: int = 4) -> onnx.ModelProto:
    """An old torch export: IR 3, opset 7, every initializer also listed as a graph input."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "cb"), *_bn_params(rng, c, "bn")]
    nodes = [helper.make_node("Conv", ["x", "w", "cb"], ["c"], pads=[1, 1, 1, 1]), _bn("c", "bn", "y")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])
    listed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    return _model(nodes, [x, *listed], [y], inits, opset=7, ir=3)


def unsorted_string_model(seed: int = 0) -> onnx.ModelProto:
    """Nodes written consumer first; a STRING input through ai.onnx.ml LabelEncoder -> MatMul -> Add -> BN."""
    rng = np.random.default_rng(seed)
    enc = helper.make_node("LabelEncoder", ["s"], ["code"], domain="ai.onnx.ml", keys_strings=["w1", "w2", "w3"],
                           values_floats=[1.0, 2.0, 3.0], default_float=-1.0)
    nodes = [_bn("mm_b", "bn", "y"), helper.make_node("Add", ["mm", "b"], ["mm_b"]),
             helper.make_node("MatMul", ["code", "W"], ["mm"]), enc]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"), *_bn_params(rng, 4, "bn")]
    x = helper.make_tensor_value_info("s", TensorProto.STRING, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    m = _model(nodes, [x], [y], inits)
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 2))
    return m
