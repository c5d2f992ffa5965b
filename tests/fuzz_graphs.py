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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from conftest import assert_arrays_close
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.folding.passes import FoldResult, count_nodes

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


# -- producers ------------------------------------------------------------------------------------------

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


# -- element-wise and layout ----------------------------------------------------------------------------

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


# -- the oracle -----------------------------------------------------------------------------------------

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


# -- loader fuzz ----------------------------------------------------------------------------------------

_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x1A, 0x22, 0x3A)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A damaged copy of ``data``: one to four random edits."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not buf:
            buf = bytearray(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes())
            continue
        kind = int(rng.integers(0, 7))
        pos = int(rng.integers(0, len(buf)))
        if kind == 0:  # bit flips
            for _ in range(int(rng.integers(1, 9))):
                p = int(rng.integers(0, len(buf)))
                buf[p] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # truncation
            del buf[pos:]
        elif kind == 2:  # insertion of random bytes
            buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
        elif kind == 3:  # deletion
            del buf[pos:pos + int(rng.integers(1, 33))]
        elif kind == 4:  # an interesting byte (varint continuation, tag bytes, 0 / 0xFF)
            buf[pos] = _INTERESTING[int(rng.integers(0, len(_INTERESTING)))]
        elif kind == 5:  # duplicate a run (repeated fields, doubled messages)
            n = int(rng.integers(1, 65))
            buf[pos:pos] = buf[pos:pos + n]
        else:  # zero or 0xFF a run
            n = int(rng.integers(1, 17))
            buf[pos:pos + n] = bytes([0 if rng.integers(0, 2) else 0xFF]) * len(buf[pos:pos + n])
    return bytes(buf)


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(onnx.external_data_helper._get_all_tensors(model))


def mutate_proto(data: bytes, rng: np.random.Generator) -> bytes:
    """A structurally plausible but damaged model: one to three field-level edits that keep the bytes
    parseable (element types, dims, raw data, attributes, node inputs and types, opsets, external data),
    so the damage reaches past the protobuf parser into the checker and bnfold."""
    model = onnx.ModelProto()
    model.ParseFromString(data)
    g = model.graph
    for _ in range(int(rng.integers(1, 4))):
        tensors = _tensors(model)
        kind = int(rng.integers(0, 12))
        if kind == 0 and tensors:
            t = tensors[int(rng.integers(0, len(tensors)))]
            t.data_type = int(rng.choice([0, 2, 3, 7, 8, 9, 10, 11, 16, 17, 23, 24, 99, 1000]))
        elif kind == 1 and tensors:
            t = tensors[int(rng.integers(0, len(tensors)))]
            if t.dims:
                t.dims[int(rng.integers(0, len(t.dims)))] = int(rng.choice([0, 1, -1, 3, 2**31, 2**40]))
            else:
                t.dims.append(int(rng.choice([0, 2, 2**33])))
        elif kind == 2 and tensors:
            t = tensors[int(rng.integers(0, len(tensors)))]
            if t.raw_data:
                t.raw_data = t.raw_data[: int(rng.integers(0, len(t.raw_data)))]
            else:
                t.raw_data = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        elif kind == 3 and g.node:
            node = g.node[int(rng.integers(0, len(g.node)))]
            if node.attribute:
                a = node.attribute[int(rng.integers(0, len(node.attribute)))]
                if a.type == onnx.AttributeProto.INTS and a.ints:
                    a.ints[int(rng.integers(0, len(a.ints)))] = int(rng.choice([-1, 0, 2**31, 7]))
                elif a.type == onnx.AttributeProto.INT:
                    a.i = int(rng.choice([-1, 0, 2, 2**31, -(2**40)]))
                elif a.type == onnx.AttributeProto.FLOAT:
                    a.f = float(rng.choice([np.nan, np.inf, -1.0, 0.0, 1e30]))
                else:
                    a.type = int(rng.integers(0, 15))
            else:
                node.attribute.append(helper.make_attribute(
                    str(rng.choice(["group", "epsilon", "transB", "axis", "training_mode", "spatial"])),
                    int(rng.integers(-2, 4))))
        elif kind == 4 and g.node:
            node = g.node[int(rng.integers(0, len(g.node)))]
            names = [t.name for t in g.initializer] + [i.name for i in g.input] + ["", "nope"]
            if node.input and rng.random() < 0.5:
                node.input[int(rng.integers(0, len(node.input)))] = str(rng.choice(names))
            elif node.input:
                del node.input[int(rng.integers(0, len(node.input)))]
            else:
                node.input.append(str(rng.choice(names)))
        elif kind == 5 and g.node:
            node = g.node[int(rng.integers(0, len(g.node)))]
            node.op_type = str(rng.choice(["Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
                                           "Relu", "Identity", "Constant", "If", "Foo"]))
            if rng.random() < 0.2:
                node.domain = str(rng.choice(["com.example", "ai.onnx", "ai.onnx.ml", "com.microsoft"]))
        elif kind == 6 and g.initializer:
            del g.initializer[int(rng.integers(0, len(g.initializer)))]
        elif kind == 7 and len(g.node) > 1:
            i, j = (int(v) for v in rng.choice(len(g.node), 2, replace=False))
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(g.node[i])
            b.CopyFrom(g.node[j])
            g.node[i].CopyFrom(b)
            g.node[j].CopyFrom(a)
        elif kind == 8 and model.opset_import:
            model.opset_import[0].version = int(rng.choice([1, 6, 7, 9, 14, 15, 22, 23, 30, 0, -1]))
        elif kind == 9:
            model.ir_version = int(rng.choice([0, 1, 2, 3, 4, 11, 12, 13, 99]))
        elif kind == 10 and tensors:
            t = tensors[int(rng.integers(0, len(tensors)))]
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", str(rng.choice(["w.bin", "../w.bin", "/etc/hostname", "", "."]))),
                               ("offset", str(rng.choice(["0", "-1", "abc", "99999999999"]))),
                               ("length", str(rng.choice(["4", "0", "-4", "x"])))):
                if rng.random() < 0.8:
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
        elif kind == 11 and g.node:
            node = g.node[int(rng.integers(0, len(g.node)))]
            dup = onnx.NodeProto()
            dup.CopyFrom(node)
            g.node.insert(int(rng.integers(0, len(g.node) + 1)), dup)
    return model.SerializeToString()
