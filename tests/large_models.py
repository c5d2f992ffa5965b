"""Large-model generators and probes: a ``Conv -> BatchNormalization -> Relu`` chain written tensor by tensor
straight into external data files (never whole in memory), folder digests, runs by path, peak RSS of a
child process.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from conftest import assert_arrays_close
from onnx import TensorProto, helper

IR_VERSION = 8


def data_file_names(folder: Path, model_name: str) -> list[str]:
    """The data files bnfold wrote for ``model_name`` in ``folder``: ``<model_name>.<8 hex digits>.data``."""
    pattern = re.compile(re.escape(model_name) + r"\.[0-9a-f]{8}\.data")
    return sorted(p.name for p in folder.iterdir() if pattern.fullmatch(p.name))


@dataclass(frozen=True)
class Generated:
    path: Path
    nbytes: int
    """Model file plus data files."""
    input_shape: tuple[int, ...]
    convs: int
    bns: int


def write_conv_bn_chain(
    path: Path,
    *,
    layers: int,
    channels: int,
    kernel: int = 3,
    files: int = 1,
    spatial: int = 4,
    seed: int = 0,
) -> Generated:
    """A ``layers``-deep Conv+BN+Relu chain with external data in ``files`` data files, written one tensor
    at a time (memory: one weight). Every tensor of 1 KiB or more is external."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{path.stem}.weights{i}.bin" for i in range(files)]
    handles = [open(path.parent / n, "wb") for n in names]  # noqa: SIM115 -- closed below
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def add(name: str, array: np.ndarray, file: int) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:
            inits.append(onnx.numpy_helper.from_array(array, name))
            return
        f = handles[file]
        offset = f.tell()
        f.write(memoryview(array.reshape(-1)).cast("B"))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", names[file]), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)

    x = "input"
    std = np.float32(np.sqrt(2.0 / (channels * kernel * kernel)))
    for i in range(layers + 1):
        file = i * files // (layers + 1)
        w = rng.standard_normal((channels, channels, kernel, kernel), dtype=np.float32) * std
        add(f"conv{i}.weight", w, file)
        add(f"conv{i}.bias", rng.normal(0, 0.1, channels).astype(np.float32), file)
        del w
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"],
                                      pads=[kernel // 2] * 4, name=f"conv{i}"))
        x = f"conv{i}"
        if i == layers:  # the last Conv has no BN: its weights are copied as they are
            break
        stats = {
            "gamma": rng.uniform(0.5, 1.0, channels), "beta": rng.normal(0, 0.1, channels),
            "mean": rng.normal(0, 0.1, channels), "var": rng.uniform(0.5, 2.0, channels),
        }
        for key, value in stats.items():
            add(f"bn{i}.{key}", value.astype(np.float32), file)
        nodes.append(helper.make_node("BatchNormalization", [x, *(f"bn{i}.{k}" for k in stats)], [f"bn{i}"],
                                      name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"]))
        x = f"relu{i}"
    for f in handles:
        f.close()
    shape = (1, channels, spatial, spatial)
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    path.write_bytes(model.SerializeToString())
    total = path.stat().st_size + sum((path.parent / n).stat().st_size for n in names)
    return Generated(path, total, shape, layers + 1, layers)


def files_digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def run_by_path(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def assert_same(original: Path, folded: Path, shape: tuple[int, ...]) -> float:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref, got = run_by_path(original, x), run_by_path(folded, x)
    assert_arrays_close([ref], [got])
    return float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))


def bn_count(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


_LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))\n"
)
"""Spawns the measured process from a tiny interpreter: Linux counts the memory a process had before
``exec`` (here: a copy of pytest's) in its peak, so spawning straight from pytest would inflate it."""


def peak_rss(args: list[str], tmp: Path) -> tuple[int, float]:
    """Peak resident memory (bytes) and wall time of a subprocess, from its own rusage (``wait4``)."""
    result = tmp / "rusage.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(result), *args], capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    code, maxrss = json.loads(result.read_text())
    assert code == 0 and proc.returncode == 0, proc.stderr.decode(errors="replace")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return maxrss * scale, elapsed


BNFOLD = [sys.executable, "-m", "bnfold"]


IMPORTS_ONLY = [sys.executable, "-c", "import onnx, onnxruntime, numpy, rich, bnfold.pipeline, bnfold.folding.passes"]
"""The interpreter with what a fold imports: the baseline memory figures are measured above."""
