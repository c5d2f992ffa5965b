"""Small PyTorch networks with BatchNorm, built in code, and ONNX export helpers that keep BatchNorm.

Each network is a scaled-down copy of a well-known architecture's building blocks (no torchvision). Every
BatchNorm is in eval mode with seeded random statistics and affine parameters, so a fold is never the
identity. ``NETS`` maps a name to a factory returning ``(module, input_shape)``; a factory builds the same
weights on every call.

Export settings (torch 2.13, legacy TorchScript exporter):

* ``training=TrainingMode.EVAL`` (the default) with ``do_constant_folding=True`` runs the exporter's
  ``eval_peephole`` pass, which folds Conv + BatchNormalization itself: no BatchNormalization left.
* ``training=TrainingMode.PRESERVE`` on a module in eval mode skips that pass; BatchNormalization stays,
  with ``training_mode=0`` and one output. ``do_constant_folding=False`` alone does the same.
  ``export_keep_bn`` uses PRESERVE and keeps constant folding, so shape arithmetic is folded as usual.
* ``training=TrainingMode.TRAINING`` keeps BatchNormalization but with ``training_mode=1`` and three
  outputs: not an inference graph.
* The legacy exporter deduplicates initializers with equal values into ``Identity`` nodes; BatchNorm with
  default statistics (mean 0, var 1, weight 1, bias 0) therefore reads its inputs through ``Identity``.
  The random statistics here avoid that (``keep_initializers_as_inputs=True`` would too).

The dynamo exporter (``export_dynamo``) keeps BatchNormalization (no ``training_mode`` attribute, one
output) when ``optimize=False``; it needs opset >= 18 to avoid a version conversion, and writes the zero
bias of a bias-free Conv as a computed ``Shape -> Expand`` rather than leaving the input empty. For a
bias-free Conv3d that computed bias has the wrong shape ``[C, 2]`` and onnxruntime refuses to run it
(microsoft/onnxscript#2931; ``optimize=True`` hides it). It takes 1-2 s per net (5 s for the first).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import torch
from net_blocks import (
    BasicBlock,
    Bottleneck,
    DenseBlock,
    InvertedResidual,
    MBConv,
    RegNetBlock,
    SqueezeExcite,
    _TokenMLP,
    conv_bn,
)
from torch import nn

__all__ = [
    "NETS",
    "BasicBlock",
    "Bottleneck",
    "DenseBlock",
    "InvertedResidual",
    "MBConv",
    "RegNetBlock",
    "SqueezeExcite",
    "bn_nodes",
    "count_bn_modules",
    "example_input",
    "export_dynamo",
    "export_keep_bn",
    "randomize_bn",
    "run_onnxruntime",
]


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


NetFactory = Callable[[], tuple[nn.Module, tuple[int, ...]]]


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm seeded random statistics and affine parameters; put the module in eval mode.

    var in [0.5, 2], mean ~ N(0, 0.5), weight in [0.5, 1.5], bias ~ N(0, 0.5).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, _BN_TYPES):
                continue
            c = m.num_features
            if m.running_var is not None and m.running_mean is not None:
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    return module.eval()


def count_bn_modules(module: nn.Module) -> int:
    return sum(isinstance(m, _BN_TYPES) for m in module.modules())


def example_input(input_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run on the CPU provider with graph optimizations off (so onnxruntime does not fold BN itself)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build with a fixed torch seed without disturbing the global generator, then randomize BN."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return randomize_bn(module, seed)


def export_keep_bn(
    module: nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str] | None = None,
    opset: int = 17,
    *,
    dynamic_batch: bool = False,
    input_name: str = "input",
    output_name: str = "output",
) -> onnx.ModelProto:
    """Export with the legacy exporter, keeping inference-mode BatchNormalization nodes.

    ``training=PRESERVE`` on an eval-mode module skips the exporter's own Conv+BN fold and exports each
    BatchNorm as ``BatchNormalization(training_mode=0)`` with a single output.
    """
    module.eval()
    x = example_input(input_shape)
    dynamic_axes = {input_name: {0: "N"}, output_name: {0: "N"}} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter
        warnings.simplefilter("ignore", UserWarning)  # "turn off constant folding in training-amenable mode"
        torch.onnx.export(
            module,
            (x,),
            buf,
            dynamo=False,
            opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
        )
    model = onnx.load_from_string(buf.getvalue())
    if path is not None:
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return model


def export_dynamo(
    module: nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str] | None = None,
    opset: int = 18,
) -> onnx.ModelProto:
    """Export with the torch.export-based exporter, unoptimized (its optimizer would fold BN itself).

    Works offline, but slowly: about 5 s for the first call in a process, 1-2 s for each later one.
    """
    module.eval()
    x = example_input(input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (x,), None, dynamo=True, optimize=False, opset_version=opset, verbose=False
        )
    assert program is not None
    model = program.model_proto
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


def resnet_basic() -> tuple[nn.Module, tuple[int, ...]]:
    def build() -> nn.Module:
        return nn.Sequential(conv_bn(3, 8, 3), BasicBlock(8, 8), BasicBlock(8, 16, stride=2))

    return _seeded(1, build), (1, 3, 16, 16)


def resnet_bottleneck() -> tuple[nn.Module, tuple[int, ...]]:
    def build() -> nn.Module:
        return nn.Sequential(conv_bn(3, 16, 3), Bottleneck(16, 4), Bottleneck(16, 8, stride=2))

    return _seeded(2, build), (1, 3, 16, 16)


def mobilenetv2_block() -> tuple[nn.Module, tuple[int, ...]]:
    def build() -> nn.Module:
        return nn.Sequential(
            conv_bn(3, 8, 3, 2, act=nn.ReLU6),
            InvertedResidual(8, 8, 1, expand=4),
            InvertedResidual(8, 16, 2, expand=4),
        )

    return _seeded(3, build), (1, 3, 32, 32)


def efficientnet_mbconv() -> tuple[nn.Module, tuple[int, ...]]:
    def build() -> nn.Module:
        return nn.Sequential(
            conv_bn(3, 8, 3, 2, act=nn.SiLU),
            MBConv(8, 8, 3, 1, expand=4),
            MBConv(8, 16, 5, 2, expand=4),
        )

    return _seeded(4, build), (1, 3, 32, 32)


def densenet_block() -> tuple[nn.Module, tuple[int, ...]]:
    def build() -> nn.Module:
        return nn.Sequential(
            conv_bn(3, 8, 3),  # stem: Conv -> BN (foldable)
            DenseBlock(3, 8, growth=4),  # norm1 follows a Concat/ReLU (not foldable); norm2 follows a Conv
            nn.BatchNorm2d(20),  # transition: BN -> ReLU -> 1x1 conv -> avg pool
            nn.ReLU(),
            nn.Conv2d(20, 10, 1, bias=False),
            nn.AvgPool2d(2),
        )

    return _seeded(5, build), (1, 3, 16, 16)


def regnet_block() -> tuple[nn.Module, tuple[int, ...]]:
    def build() -> nn.Module:
        return nn.Sequential(
            conv_bn(3, 16, 3, 2),
            RegNetBlock(16, 32, 2, group_width=8),  # groups = 4
            RegNetBlock(32, 32, 1, group_width=8),
        )

    return _seeded(6, build), (1, 3, 32, 32)


def mlp_bn1d() -> tuple[nn.Module, tuple[int, ...]]:
    """Linear -> BatchNorm1d on [N, C]: Gemm -> BatchNormalization, with and without a Linear bias."""

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(16, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 24, bias=False),
            nn.BatchNorm1d(24),
            nn.ReLU(),
            nn.Linear(24, 10),
        )

    return _seeded(7, build), (4, 16)


def token_mlp_bn1d() -> tuple[nn.Module, tuple[int, ...]]:
    """Linear on [N, T, C] -> Transpose -> BatchNorm1d -> Transpose: MatMul (+ Add), BN behind a Transpose."""
    return _seeded(8, lambda: _TokenMLP(12, 24)), (2, 5, 12)


def decoder_convtranspose() -> tuple[nn.Module, tuple[int, ...]]:
    """Grouped ConvTranspose2d + BatchNorm2d (weight layout [C_in, C_out/groups, kH, kW])."""

    def build() -> nn.Module:
        return nn.Sequential(
            nn.ConvTranspose2d(16, 12, 4, stride=2, padding=1, groups=2),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.ConvTranspose2d(12, 8, 3, stride=2, padding=1, output_padding=1, groups=4, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.ConvTranspose2d(8, 6, 3, stride=1, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(6),
            nn.Conv2d(6, 3, 1),
        )

    return _seeded(9, build), (1, 16, 6, 6)


def conv1d_net() -> tuple[nn.Module, tuple[int, ...]]:
    """Conv1d + BatchNorm1d on [N, C, L]; one grouped, dilated, bias-free conv; global pool + Linear head."""

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv1d(4, 16, 5, padding=2),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Conv1d(16, 16, 3, padding=2, dilation=2, groups=4, bias=False),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(16, 5),
        )

    return _seeded(10, build), (2, 4, 32)


def conv3d_net() -> tuple[nn.Module, tuple[int, ...]]:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv3d(2, 8, 3, padding=1),
            nn.BatchNorm3d(8),
            nn.ReLU(),
            nn.Conv3d(8, 8, 3, stride=2, padding=1, groups=2, bias=False),
            nn.BatchNorm3d(8),
            nn.ReLU(),
        )

    return _seeded(11, build), (1, 2, 8, 8, 8)


NETS: dict[str, NetFactory] = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenetv2_block": mobilenetv2_block,
    "efficientnet_mbconv": efficientnet_mbconv,
    "densenet_block": densenet_block,
    "regnet_block": regnet_block,
    "mlp_bn1d": mlp_bn1d,
    "token_mlp_bn1d": token_mlp_bn1d,
    "decoder_convtranspose": decoder_convtranspose,
    "conv1d_net": conv1d_net,
    "conv3d_net": conv3d_net,
}
