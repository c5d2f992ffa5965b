#!/usr/bin/env python
"""Regenerate the small ONNX models shipped in models/ (see models/README.md for what each exercises).

    python models/make_models.py                 # write into models/
    python models/make_models.py OUT_DIR         # write elsewhere (the tests compare bytes)
    python models/make_models.py --no-torch      # only the hand-built models (torch not needed)
    python models/make_models.py --only fp16_conv_bn.onnx

Deterministic: fixed seeds, explicit ir_version / opset / producer, so a rerun writes byte-identical files
(resnet_mini.onnx: identical for the same torch version, which its producer_version records).
Only resnet_mini.onnx needs torch (the ``torch`` extra); the rest are built with onnx.helper.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    import torch

__all__ = [
    "HAND_BUILT",
    "MODELS",
    "TORCH_BUILT",
    "build",
    "main",
    "resnet_mini_module",
    "write_models",
]

MODELS_DIR = Path(__file__).resolve().parent
PRODUCER = "bnfold/models/make_models.py"
F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16


# ----------------------------------------------------------------------------------------------- helpers


def _tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _bn_stats(rng: np.random.Generator, c: int) -> tuple[np.ndarray, ...]:
    """scale in [0.5, 1.5], bias ~ N(0, 0.5), mean ~ N(0, 0.5), var in [0.5, 2] (float32)."""
    scale = rng.uniform(0.5, 1.5, c)
    bias = rng.normal(0.0, 0.5, c)
    mean = rng.normal(0.0, 0.5, c)
    var = rng.uniform(0.5, 2.0, c)
    return tuple(a.astype(np.float32) for a in (scale, bias, mean, var))


def _weight(rng: np.random.Generator, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)


def _model(graph: onnx.GraphProto, opset: int, ir_version: int, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version,
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    return model


# ------------------------------------------------------------------------------------ hand-built models


def conv_bn_constant_nodes() -> onnx.ModelProto:
    """Conv -> BN -> Relu where weight, bias and all four BN statistics come from Constant nodes."""
    rng = np.random.default_rng(101)
    c_in, c = 3, 8
    scale, bias, mean, var = _bn_stats(rng, c)
    consts = {
        "W": _weight(rng, (c, c_in, 3, 3)),
        "B": rng.normal(0.0, 0.1, c).astype(np.float32),
        "bn_scale": scale,
        "bn_bias": bias,
        "bn_mean": mean,
        "bn_var": var,
    }
    nodes = [helper.make_node("Constant", [], [k], value=_tensor(k, v)) for k, v in consts.items()]
    nodes += [
        helper.make_node("Conv", ["X", "W", "B"], ["conv_out"], pads=[1, 1, 1, 1]),  # nodes left unnamed
        helper.make_node(
            "BatchNormalization",
            ["conv_out", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["bn_out"],
            epsilon=1e-3,
        ),
        helper.make_node("Relu", ["bn_out"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn_constant_nodes",
        [helper.make_tensor_value_info("X", F32, [1, c_in, 8, 8])],
        [helper.make_tensor_value_info("Y", F32, [1, c, 8, 8])],
    )
    return _model(graph, 11, 6, "Conv/BN parameters as Constant nodes, no initializers (opset 11).")


def legacy_ir3_bn() -> onnx.ModelProto:
    """IR 3 / opset 7: every initializer is also a graph input; BN-7 with explicit spatial=1.

    Tensor names are bare numbers, as the legacy torch exporter wrote them, so a folder that names new
    tensors with counters collides with them.
    """
    rng = np.random.default_rng(102)
    c_in, c1, c2 = 3, 6, 4
    s1, b1, m1, v1 = _bn_stats(rng, c1)
    s2, b2, m2, v2 = _bn_stats(rng, c2)
    inits = [
        _tensor("1", _weight(rng, (c1, c_in, 3, 3))),
        _tensor("2", rng.normal(0.0, 0.1, c1).astype(np.float32)),
        _tensor("3", s1),
        _tensor("4", b1),
        _tensor("5", m1),
        _tensor("6", v1),
        _tensor("7", _weight(rng, (c2, c1, 1, 1))),
        _tensor("8", s2),
        _tensor("9", b2),
        _tensor("10", m2),
        _tensor("11", v2),
    ]
    nodes = [
        helper.make_node("Conv", ["0", "1", "2"], ["12"], pads=[1, 1, 1, 1], name="Conv_0"),
        helper.make_node(
            "BatchNormalization",
            ["12", "3", "4", "5", "6"],
            ["13"],
            epsilon=1e-5,
            momentum=0.9,
            spatial=1,
            name="BatchNormalization_1",
        ),
        helper.make_node("Relu", ["13"], ["14"], name="Relu_2"),
        helper.make_node("Conv", ["14", "7"], ["15"], name="Conv_3"),
        helper.make_node(
            "BatchNormalization",
            ["15", "8", "9", "10", "11"],
            ["16"],
            epsilon=1e-5,
            momentum=0.9,
            spatial=1,
            name="BatchNormalization_4",
        ),
    ]
    inputs = [helper.make_tensor_value_info("0", F32, [1, c_in, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes, "legacy_ir3_bn", inputs, [helper.make_tensor_value_info("16", F32, [1, c2, 8, 8])], inits
    )
    return _model(graph, 7, 3, "IR 3, opset 7; initializers listed as graph inputs; numeric tensor names.")


def legacy_bn_spatial0() -> onnx.ModelProto:
    """IR 3 / opset 7: Conv -> BN(spatial=0), statistics per activation [C, H, W]: not foldable into Conv."""
    rng = np.random.default_rng(103)
    c_in, c, hw = 3, 4, 6
    scale = rng.uniform(0.5, 1.5, (c, hw, hw)).astype(np.float32)
    bias = rng.normal(0.0, 0.5, (c, hw, hw)).astype(np.float32)
    mean = rng.normal(0.0, 0.5, (c, hw, hw)).astype(np.float32)
    var = rng.uniform(0.5, 2.0, (c, hw, hw)).astype(np.float32)
    inits = [
        _tensor("W", _weight(rng, (c, c_in, 3, 3))),
        _tensor("bn_scale", scale),
        _tensor("bn_bias", bias),
        _tensor("bn_mean", mean),
        _tensor("bn_var", var),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["conv_out"]),
        helper.make_node(
            "BatchNormalization",
            ["conv_out", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["Y"],
            epsilon=1e-5,
            spatial=0,
        ),
    ]
    inputs = [helper.make_tensor_value_info("X", F32, [1, c_in, hw + 2, hw + 2])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes, "legacy_bn_spatial0", inputs, [helper.make_tensor_value_info("Y", F32, [1, c, hw, hw])], inits
    )
    return _model(graph, 7, 3, "BN-7 spatial=0: per-activation statistics; must be skipped with a reason.")


def fp16_conv_bn() -> onnx.ModelProto:
    """fp16 activations; BN-15 with fp32 statistics (T1 = T2 = float), then one with fp16 statistics."""
    rng = np.random.default_rng(104)
    c_in, c1, c2 = 4, 8, 8
    s1, b1, m1, v1 = _bn_stats(rng, c1)
    s2, b2, m2, v2 = (a.astype(np.float16) for a in _bn_stats(rng, c2))
    inits = [
        _tensor("W1", _weight(rng, (c1, c_in // 2, 3, 3), np.float16)),  # group=2
        _tensor("B1", rng.normal(0.0, 0.1, c1).astype(np.float16)),
        _tensor("bn1_scale", s1),
        _tensor("bn1_bias", b1),
        _tensor("bn1_mean", m1),
        _tensor("bn1_var", v1),
        _tensor("W2", _weight(rng, (c2, c1, 1, 1), np.float16)),
        _tensor("bn2_scale", s2),
        _tensor("bn2_bias", b2),
        _tensor("bn2_mean", m2),
        _tensor("bn2_var", v2),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W1", "B1"], ["conv1_out"], pads=[1, 1, 1, 1], group=2),
        helper.make_node(
            "BatchNormalization",
            ["conv1_out", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"],
            ["bn1_out"],
            epsilon=1e-5,
        ),
        helper.make_node("Relu", ["bn1_out"], ["relu1_out"]),
        helper.make_node("Conv", ["relu1_out", "W2"], ["conv2_out"]),
        helper.make_node(
            "BatchNormalization",
            ["conv2_out", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"],
            ["Y"],
            epsilon=1e-5,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16_conv_bn",
        [helper.make_tensor_value_info("X", F16, [1, c_in, 8, 8])],
        [helper.make_tensor_value_info("Y", F16, [1, c2, 8, 8])],
        inits,
    )
    return _model(graph, 15, 8, "fp16 Conv -> BN-15 with fp32 statistics, then fp16 Conv -> BN with fp16.")


def fp16_bn_tiny_var() -> onnx.ModelProto:
    """fp16 Conv -> BN-15 with fp16 statistics, zero / underflowing variances and epsilon=1e-8.

    epsilon is not representable in fp16 (it rounds to 0): arithmetic done in fp16 gives 1/sqrt(0) = inf,
    float64 gives a scale of about 1e4, and the folded weights (|W| <= ~4e-3) stay well inside fp16.
    onnxruntime with ORT_DISABLE_ALL gives finite outputs; its own fusion (ORT_ENABLE_ALL) gives NaN.
    """
    rng = np.random.default_rng(105)
    c_in, c = 3, 4
    inits = [
        _tensor("W", (rng.standard_normal((c, c_in, 3, 3)) * 1e-3).astype(np.float16)),
        _tensor("bn_scale", np.array([1.0, 2.0, 1.0, 1.0], np.float16)),
        _tensor("bn_bias", np.array([0.1, -0.1, 0.2, 0.0], np.float16)),
        _tensor("bn_mean", np.zeros(c, np.float16)),
        _tensor("bn_var", np.array([0.0, 1e-9, 1e-6, 1.0], np.float16)),  # 1e-9 -> 0, 1e-6 subnormal
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["conv_out"]),
        helper.make_node(
            "BatchNormalization",
            ["conv_out", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["Y"],
            epsilon=1e-8,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16_bn_tiny_var",
        [helper.make_tensor_value_info("X", F16, [1, c_in, 8, 8])],
        [helper.make_tensor_value_info("Y", F16, [1, c, 6, 6])],
        inits,
    )
    return _model(graph, 15, 8, "fp16 BN with zero variance and epsilon below fp16 resolution.")


def bn_unfoldable() -> onnx.ModelProto:
    """Five BatchNormalization nodes, none foldable into a preceding producer, each for its own reason.

    a_out: input is the graph input X (the Conv after it pads, so a forward fold would be wrong too)
    b_out: producer is Relu
    c_out: producer Conv's output c2 is also read by an Add (folding in place changes the other path)
    d_out: training_mode=1, with running-statistics outputs
    Y:     running mean is a graph input (not constant)
    """
    rng = np.random.default_rng(106)
    c = 4
    inits = []
    for tag in "abcde":
        for field, value in zip(("scale", "bias", "mean", "var"), _bn_stats(rng, c), strict=True):
            if tag == "e" and field == "mean":
                continue
            inits.append(_tensor(f"{tag}_{field}", value))
    for i in range(1, 5):
        inits.append(_tensor(f"W{i}", _weight(rng, (c, c, 3, 3))))

    def bn(
        tag: str, x: str, outs: list[str], mean: str | None = None, **attrs: int | float
    ) -> onnx.NodeProto:
        return helper.make_node(
            "BatchNormalization",
            [x, f"{tag}_scale", f"{tag}_bias", mean or f"{tag}_mean", f"{tag}_var"],
            outs,
            name=f"bn_{tag}",
            **attrs,
        )

    nodes = [
        bn("a", "X", ["a_out"]),
        helper.make_node("Conv", ["a_out", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        bn("b", "r1", ["b_out"]),
        helper.make_node("Conv", ["b_out", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        bn("c", "c2", ["c_out"]),
        helper.make_node("Add", ["c_out", "c2"], ["c_sum"], name="add"),
        helper.make_node("Conv", ["c_sum", "W3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        bn("d", "c3", ["d_out", "d_running_mean", "d_running_var"], training_mode=1),
        helper.make_node("Conv", ["d_out", "W4"], ["c4"], pads=[1, 1, 1, 1], name="conv4"),
        bn("e", "c4", ["Y"], mean="e_mean_input"),
    ]
    graph = helper.make_graph(
        nodes,
        "bn_unfoldable",
        [
            helper.make_tensor_value_info("X", F32, [1, c, 8, 8]),
            helper.make_tensor_value_info("e_mean_input", F32, [c]),
        ],
        [helper.make_tensor_value_info("Y", F32, [1, c, 8, 8])],
        inits,
    )
    return _model(graph, 15, 8, "BatchNormalization nodes that must each be left with a reason.")


# ------------------------------------------------------------------------------------- torch-built model


def resnet_mini_module() -> torch.nn.Module:
    """The torch module behind resnet_mini.onnx, in eval mode with seeded random BatchNorm statistics.

    A small image classifier: stem, 3 residual stages (2 with a 1x1 conv + BN downsample), a
    depthwise-separable pair, a grouped-conv residual block, global average pool, Flatten, Linear.
    """
    import torch
    from torch import nn

    def conv_bn(
        cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True
    ) -> nn.Module:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.downsample = conv_bn(cin, cout, 1, stride, relu=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class GroupedBlock(nn.Module):
        def __init__(self, c: int, groups: int) -> None:
            super().__init__()
            self.body = conv_bn(c, c, 3, groups=groups, relu=False)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.body(x) + x)

    class ResNetMini(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.stem = conv_bn(3, 16, 3)
            self.layer1 = BasicBlock(16, 16)
            self.layer2 = BasicBlock(16, 32, stride=2)
            self.layer3 = BasicBlock(32, 64, stride=2)
            self.dw = conv_bn(64, 64, 3, groups=64)  # depthwise
            self.pw = conv_bn(64, 128, 1)  # pointwise
            self.grouped = GroupedBlock(128, groups=8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(128, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layer3(self.layer2(self.layer1(self.stem(x))))
            x = self.grouped(self.pw(self.dw(x)))
            return self.fc(self.flatten(self.pool(x)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ResNetMini()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    net.eval()
    return net


def resnet_mini() -> onnx.ModelProto:
    """resnet_mini_module() exported with BatchNormalization kept (TrainingMode.PRESERVE), batch "N"."""
    import torch

    net = resnet_mini_module()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (x,),
            buf,
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,  # keeps BatchNormalization (training_mode=0)
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
    return onnx.load_from_string(buf.getvalue())


# ------------------------------------------------------------------------------------------------ driver

HAND_BUILT: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn_constant_nodes.onnx": conv_bn_constant_nodes,
    "legacy_ir3_bn.onnx": legacy_ir3_bn,
    "legacy_bn_spatial0.onnx": legacy_bn_spatial0,
    "fp16_conv_bn.onnx": fp16_conv_bn,
    "fp16_bn_tiny_var.onnx": fp16_bn_tiny_var,
    "bn_unfoldable.onnx": bn_unfoldable,
}
TORCH_BUILT: dict[str, Callable[[], onnx.ModelProto]] = {"resnet_mini.onnx": resnet_mini}
MODELS: dict[str, Callable[[], onnx.ModelProto]] = {**TORCH_BUILT, **HAND_BUILT}


def build(name: str) -> bytes:
    """Build one model, check it, and return its serialized bytes."""
    model = MODELS[name]()
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(deterministic=True)


def write_models(out_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, bytes]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names if names is not None else MODELS:
        data = build(name)
        (out / name).write_bytes(data)
        written[name] = data
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(MODELS_DIR), help="default: the models/ folder")
    parser.add_argument("--only", action="append", choices=sorted(MODELS), help="repeatable")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch-built models")
    args = parser.parse_args(argv)
    names = args.only or [n for n in MODELS if not (args.no_torch and n in TORCH_BUILT)]
    for name, data in write_models(args.out_dir, names).items():
        print(f"{name:28s} {len(data):>9d} B  sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
