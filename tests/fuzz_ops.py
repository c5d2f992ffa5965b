"""The steps a fuzz graph is built from (``fuzz_graphs.build_case``): a builder that names tensors and shares
constants, and one function per op (Conv, ConvTranspose, Gemm, MatMul, BatchNormalization, Relu,
constant Add/Mul/Sub/Div, Add of two tensors, Reshape, Transpose, Concat), each drawing its attributes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper


@dataclass
class _Value:
    name: str
    shape: tuple[int, ...]


@dataclass
class _Builder:
    draw: st.DrawFn
    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    values: list[_Value] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    weights: dict[tuple[tuple[int, ...], str], list[str]] = field(default_factory=dict)
    bn_stats: dict[int, list[tuple[str, str, str, str]]] = field(default_factory=dict)
    forced_outputs: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    counter: int = 0

    # -- names and constants ------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, array: np.ndarray, prefix: str, *, shareable: bool = True) -> str:
        """A constant: a new initializer or Constant node, or (``shareable``) an earlier one of the same
        shape and role, which makes a shared weight."""
        array = np.asarray(array, dtype=np.float32) if array.dtype.kind == "f" else array
        key = (tuple(array.shape), prefix)
        pool = self.weights.setdefault(key, [])
        if shareable and pool and self.draw(st.integers(0, 3)) == 0:
            self.log.append(f"shared {pool[0]}")
            return pool[0]
        name = self.fresh(prefix)
        if self.draw(st.integers(0, 5)) == 0:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        pool.append(name)
        return name

    def add(self, op: str, inputs: list[str], shape: tuple[int, ...], prefix: str = "t", **attrs: object) -> _Value:
        out = _Value(self.fresh(prefix), shape)
        self.nodes.append(helper.make_node(op, inputs, [out.name], **attrs))
        self.consumed.update(inputs)
        self.values.append(out)
        self.log.append(f"{op}{list(shape)}")
        return out

    def pick(self, ok: Callable[[_Value], bool]) -> _Value | None:
        """An earlier tensor satisfying ``ok``, most often the latest one."""
        cands = [v for v in self.values if ok(v)]
        if not cands:
            return None
        if self.draw(st.integers(0, 2)) > 0:
            return cands[-1]
        return cands[self.draw(st.integers(0, len(cands) - 1))]

    def normal(self, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: len(v.shape) in (3, 4))
    if v is None:
        return None
    n, c, *spatial = v.shape
    group = b.draw(st.sampled_from(_divisors(c)))
    m = group * b.draw(st.integers(1, 3))
    auto_pad = b.draw(st.sampled_from([None, None, None, "SAME_UPPER", "SAME_LOWER", "VALID"]))
    kernel: list[int] = []
    strides: list[int] = []
    dils: list[int] = []
    pads: list[int] = []
    out: list[int] = []
    for size in spatial:
        k, s, d = b.draw(st.integers(1, 3)), b.draw(st.integers(1, 2)), b.draw(st.integers(1, 2))
        pb, pe = (0, 0) if auto_pad else (b.draw(st.integers(0, 1)), b.draw(st.integers(0, 1)))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            d = 1  # SAME padding with dilation: keep it unambiguous
            o = math.ceil(size / s)
        else:
            if size + pb + pe < d * (k - 1) + 1:
                k, d = 1, 1
            o = (size + pb + pe - d * (k - 1) - 1) // s + 1
        kernel.append(k)
        strides.append(s)
        dils.append(d)
        pads[len(pads) // 2:len(pads) // 2] = [pb]
        pads.append(pe)
        out.append(o)
    fan_in = (c // group) * math.prod(kernel)
    w = b.const(b.normal((m, c // group, *kernel), 1 / math.sqrt(fan_in)), "W")
    inputs = [v.name, w]
    if b.draw(st.booleans()):
        inputs.append(b.const(b.normal((m,)), "B"))
    attrs: dict[str, object] = {"kernel_shape": kernel, "strides": strides, "dilations": dils}
    if group > 1 or b.draw(st.booleans()):
        attrs["group"] = group
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    elif any(pads) or b.draw(st.booleans()):
        attrs["pads"] = pads
    return b.add("Conv", inputs, (n, m, *out), "conv", **attrs)


def _conv_transpose(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: len(v.shape) in (3, 4))
    if v is None:
        return None
    n, c, *spatial = v.shape
    group = b.draw(st.sampled_from(_divisors(c)))
    per_group = b.draw(st.integers(1, 3))
    kernel: list[int] = []
    strides: list[int] = []
    dils: list[int] = []
    out_pad: list[int] = []
    pads: list[int] = []
    out: list[int] = []
    for size in spatial:
        k, s, d = b.draw(st.integers(1, 3)), b.draw(st.integers(1, 2)), b.draw(st.integers(1, 2))
        op = b.draw(st.integers(0, s - 1))
        pb, pe = b.draw(st.integers(0, 1)), b.draw(st.integers(0, 1))
        full = s * (size - 1) + op + (k - 1) * d + 1
        if full - pb - pe < 1:
            pb = pe = 0
        kernel.append(k)
        strides.append(s)
        dils.append(d)
        out_pad.append(op)
        pads[len(pads) // 2:len(pads) // 2] = [pb]
        pads.append(pe)
        out.append(full - pb - pe)
    fan_in = (c // group) * math.prod(kernel)
    w = b.const(b.normal((c, per_group, *kernel), 1 / math.sqrt(fan_in)), "WT")
    inputs = [v.name, w]
    if b.draw(st.booleans()):
        inputs.append(b.const(b.normal((per_group * group,)), "BT"))
    attrs: dict[str, object] = {"kernel_shape": kernel, "strides": strides, "dilations": dils, "pads": pads}
    if group > 1:
        attrs["group"] = group
    if any(out_pad):
        attrs["output_padding"] = out_pad
    return b.add("ConvTranspose", inputs, (n, per_group * group, *out), "convt", **attrs)


def _gemm(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: len(v.shape) == 2)
    if v is None:
        return None
    trans_a = b.draw(st.booleans())
    m, k = (v.shape[1], v.shape[0]) if trans_a else v.shape
    n = b.draw(st.integers(1, 6))
    trans_b = b.draw(st.booleans())
    bw = b.const(b.normal((n, k) if trans_b else (k, n), 1 / math.sqrt(k)), "GB")
    inputs = [v.name, bw]
    c_shape = b.draw(st.sampled_from([None, (), (1,), (n,), (1, n), (m, 1), (m, n)]))
    if c_shape is not None:
        inputs.append(b.const(b.normal(c_shape), "GC"))
    attrs: dict[str, object] = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    alpha = b.draw(st.sampled_from([None, 1.0, 0.5, -2.0]))
    beta = b.draw(st.sampled_from([None, 1.0, 0.0, 0.5, -1.5]))
    if alpha is not None:
        attrs["alpha"] = alpha
    if beta is not None:
        attrs["beta"] = beta
    return b.add("Gemm", inputs, (m, n), "gemm", **attrs)


def _matmul(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: len(v.shape) >= 2)
    if v is None:
        return None
    k = v.shape[-1]
    n = b.draw(st.integers(1, 6))
    w = b.const(b.normal((k, n), 1 / math.sqrt(k)), "MW")
    out = b.add("MatMul", [v.name, w], (*v.shape[:-1], n), "mm")
    if b.draw(st.booleans()):  # the usual bias Add of a Linear layer
        out = b.add("Add", [out.name, b.const(b.normal((n,)), "MB")], out.shape, "mmb")
    return out


def _batchnorm(b: _Builder, v: _Value | None = None) -> _Value | None:
    if v is None:
        v = b.pick(lambda v: len(v.shape) >= 2)
    if v is None:
        return None
    c = v.shape[1]
    shared = b.bn_stats.get(c, [])
    if shared and b.draw(st.integers(0, 3)) == 0:
        stats = shared[0]
        b.log.append("shared BN stats")
    else:
        gamma = b.rng.uniform(0.5, 1.5, c) * np.where(b.rng.random(c) < 0.2, -1.0, 1.0)
        var = b.rng.uniform(0.2, 2.0, c)
        if b.draw(st.integers(0, 4)) == 0:
            var[b.rng.random(c) < 0.5] = 0.0  # zero variance: folds fine while epsilon > 0
        arrays = (gamma, b.rng.standard_normal(c), b.rng.standard_normal(c) * 0.5, var)
        stats = tuple(b.const(np.asarray(a, np.float32), role, shareable=False)
                      for a, role in zip(arrays, ("gamma", "beta", "mean", "var"), strict=True))
        b.bn_stats.setdefault(c, []).append(stats)  # type: ignore[arg-type]
    eps = b.draw(st.sampled_from([None, 1e-5, 1e-3, 0.1]))
    attrs: dict[str, object] = {} if eps is None else {"epsilon": eps}
    out = b.add("BatchNormalization", [v.name, *stats], v.shape, "bn", **attrs)
    if b.draw(st.integers(0, 3)) == 0:
        b.forced_outputs.append(out.name)
    return out


def _relu(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: True)
    return None if v is None else b.add("Relu", [v.name], v.shape, "relu")


def _broadcast_shape(b: _Builder, shape: tuple[int, ...]) -> tuple[int, ...]:
    r = len(shape)
    choices: list[tuple[int, ...]] = [(), (1,), (shape[-1],), shape, shape[1:]]
    if r >= 2:
        choices += [(shape[1], *([1] * (r - 2))), (1, shape[1], *([1] * (r - 2)))]
    choice = b.draw(st.sampled_from([*choices, None]))
    if choice is None:  # a random broadcastable suffix shape
        rank = b.draw(st.integers(0, r))
        choice = tuple(d if b.draw(st.booleans()) else 1 for d in shape[r - rank:])
    return choice


def _binary_const(b: _Builder, op: str) -> _Value | None:
    v = b.pick(lambda v: True)
    if v is None:
        return None
    cshape = _broadcast_shape(b, v.shape)
    if op == "Mul":
        arr = b.rng.uniform(0.5, 1.5, cshape) * np.where(b.rng.random(cshape) < 0.2, -1.0, 1.0)
    else:
        arr = b.rng.standard_normal(cshape)
    cname = b.const(np.asarray(arr, np.float32), "k" + op)
    inputs = [cname, v.name] if b.draw(st.integers(0, 3)) == 0 else [v.name, cname]
    b.log.append(f"{op} const {list(cshape)}")
    return b.add(op, inputs, v.shape, op.lower())


def _binary_pair(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: True)
    if v is None:
        return None
    others = [w for w in b.values if w.shape == v.shape]
    w = others[b.draw(st.integers(0, len(others) - 1))]  # may be v itself: x + x
    op = b.draw(st.sampled_from(["Add", "Mul"]))
    return b.add(op, [v.name, w.name], v.shape, op.lower())


def _reshape(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: True)
    if v is None:
        return None
    s = v.shape
    options: list[tuple[int, ...]] = [(s[0], math.prod(s[1:]))]
    if len(s) == 2:
        options += [(s[0], s[1], 1, 1), (s[0], s[1], 1)]
    if len(s) >= 3:
        options += [(*s[:-2], s[-2] * s[-1]), (s[0] * s[1], *s[2:])]
    if len(s) == 3:
        options.append((s[0], s[1], 1, s[2]))
    new = b.draw(st.sampled_from(options))
    spec = list(new)
    if b.draw(st.booleans()):  # ONNX special values: 0 copies the input dim, -1 is inferred
        if spec[0] == s[0]:
            spec[0] = 0
        spec[b.draw(st.integers(0, len(spec) - 1))] = -1
    shape_name = b.const(np.asarray(spec, np.int64), "shape", shareable=False)
    return b.add("Reshape", [v.name, shape_name], new, "reshape")


def _transpose(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: len(v.shape) >= 2)
    if v is None:
        return None
    perm = list(b.draw(st.permutations(range(len(v.shape)))))
    return b.add("Transpose", [v.name], tuple(v.shape[p] for p in perm), "tr", perm=perm)


def _concat(b: _Builder) -> _Value | None:
    v = b.pick(lambda v: True)
    if v is None:
        return None
    axis = b.draw(st.integers(0, len(v.shape) - 1))
    others = [w for w in b.values if len(w.shape) == len(v.shape)
              and all(a == c for i, (a, c) in enumerate(zip(w.shape, v.shape, strict=True)) if i != axis)]
    w = others[b.draw(st.integers(0, len(others) - 1))]
    shape = tuple(d + (w.shape[i] if i == axis else 0) for i, d in enumerate(v.shape))
    neg = b.draw(st.booleans())
    return b.add("Concat", [v.name, w.name], shape, "cat", axis=axis - len(shape) if neg else axis)


_LINEAR = {"conv": _conv, "conv_transpose": _conv_transpose, "gemm": _gemm, "matmul": _matmul}


_OTHER = {
    "bn": _batchnorm,
    "relu": _relu,
    "add_const": lambda b: _binary_const(b, "Add"),
    "mul_const": lambda b: _binary_const(b, "Mul"),
    "pair": _binary_pair,
    "reshape": _reshape,
    "transpose": _transpose,
    "concat": _concat,
}


_STEP_WEIGHTS = {"conv": 4, "conv_transpose": 2, "gemm": 2, "matmul": 2, "bn": 4, "relu": 1, "add_const": 2,
                 "mul_const": 2, "pair": 1, "reshape": 2, "transpose": 1, "concat": 1}


_STEPS = [name for name, w in _STEP_WEIGHTS.items() for _ in range(w)]


_MAX_ELEMENTS = 4096  # keeps ORT runs fast: a tensor that grows past this stops the graph
