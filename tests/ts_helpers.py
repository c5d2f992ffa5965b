"""Helpers of the TorchScript tests: archive a scripted module, script or trace it, a float64 reference,
randomized BatchNorm statistics, the inlined op kinds."""

from __future__ import annotations

import copy
import io

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

nets = pytest.importorskip("nets")


def archive(module: torch.jit.ScriptModule) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def to_script(module: nn.Module, shape: tuple[int, ...], how: str) -> torch.jit.ScriptModule:
    if how == "script":
        return torch.jit.script(module)
    return torch.jit.trace(module, nets.example_input(shape, seed=1))


def reference64(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double())


def randomize(module: nn.Module) -> nn.Module:
    return nets.randomize_bn(module, seed=3)


def kinds(module: torch.jit.ScriptModule) -> list[str]:
    g = module.graph.copy()
    torch._C._jit_pass_inline(g)
    return [n.kind() for n in g.nodes()]
