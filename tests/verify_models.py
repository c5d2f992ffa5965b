"""Small originals and their folds (correct and deliberately broken) for the ``bnfold.check`` tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

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


def _cli(argv: list[str]) -> int:
    from bnfold.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return int(exit_.value.code or 0)
