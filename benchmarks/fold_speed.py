"""Fold speed and memory of bnfold against the I/O floor and the anchors, on a wide-ResNet-50-sized CNN.

One run prints one table. Every tool runs in a fresh subprocess (``--repeat`` times, interleaved, the
median kept); each row gives:

* op time: inside the subprocess, load + fold + save, imports excluded (what the tool itself costs),
  and its ratio to the floor, ``onnx.load`` + ``onnx.save`` of the same model;
* wall: the whole subprocess, interpreter start and imports included;
* peak RSS of the subprocess (``wait4``), and that peak above the interpreter with the tool imported,
  as a multiple of the model's size;
* the output checked on onnxruntime (``ORT_DISABLE_ALL``, CPU) against the original on the same input:
  BatchNormalization nodes left, node count, max abs error, output size.

Tools: the floor; ``bnfold.fold_file(path, out, verify=False)`` (the library, verification off: bnfold's check is
onnxruntime, timed apart in docs/latency.md); the ``bnfold`` command (``--no-verify``); onnxoptimizer
``fuse_bn_into_conv``; onnx-simplifier; onnxslim; onnxruntime offline optimization at
``ORT_ENABLE_BASIC`` with ``optimized_model_filepath``. Missing anchors are reported as not installed
(``pip install -r benchmarks/requirements.txt``).

    python benchmarks/fold_speed.py               # wide-ResNet-50-2-shaped model (~276 MB), 3 repeats
    python benchmarks/fold_speed.py --quick       # a small model, 1 repeat: checks the script only

The model is generated with numpy (random He-initialised weights, BatchNormalization kept) in
``--workdir`` and reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TOOLS = ("floor", "bnfold", "bnfold-cli", "onnxoptimizer", "onnxsim", "onnxslim", "onnxruntime")
LABELS = {
    "floor": "onnx.load + onnx.save (floor)",
    "bnfold": "bnfold.fold_file(path, out, verify=False)",
    "bnfold-cli": "bnfold MODEL -o OUT --no-verify",
    "onnxoptimizer": "onnxoptimizer fuse_bn_into_conv",
    "onnxsim": "onnx-simplifier (onnxsim)",
    "onnxslim": "onnxslim",
    "onnxruntime": "onnxruntime ORT_ENABLE_BASIC, offline",
}
IMPORTS = {
    "floor": "import onnx",
    "bnfold": "import bnfold",
    "bnfold-cli": "import bnfold.cli",
    "onnxoptimizer": "import onnx, onnxoptimizer",
    "onnxsim": "import onnx, onnxsim",
    "onnxslim": "import onnx, onnxslim",
    "onnxruntime": "import onnxruntime",
}


# -- the model ---------------------------------------------------------------------------------------
def build_wide_resnet(path: Path, *, width: int = 2, blocks: tuple[int, ...] = (3, 4, 6, 3), seed: int = 0) -> None:
    """torchvision ``wide_resnet50_2`` topology (bottlenecks, width x2, BatchNormalization kept) as ONNX,
    random weights. ``width=2, blocks=(3, 4, 6, 3)`` has 68.9 M parameters (~276 MB)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str) -> str:
        w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / (cin * k * k)))
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight"], [f"{name}.out"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, name=name))
        return f"{name}.out"

    def bn(x: str, c: int, name: str, relu: bool = True) -> str:
        stats = (("weight", rng.uniform(0.5, 1.0, c)), ("bias", rng.normal(0, 0.1, c)),
                 ("running_mean", rng.normal(0, 0.1, c)), ("running_var", rng.uniform(0.5, 2.0, c)))
        for key, value in stats:
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}.{key}"))
        nodes.append(helper.make_node("BatchNormalization", [x, *(f"{name}.{k}" for k, _ in stats)],
                                      [f"{name}.out"], name=name))
        if not relu:
            return f"{name}.out"
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"]))
        return f"{name}.relu"

    x = bn(conv("input", 3, 64, 7, 2, "conv1"), 64, "bn1")
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", 64
    for li, (planes, count, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2), strict=True), 1):
        for b in range(count):
            p, s = f"layer{li}.{b}", stride if b == 0 else 1
            mid, cout = planes * width, planes * 4
            y = bn(conv(x, cin, mid, 1, 1, f"{p}.conv1"), mid, f"{p}.bn1")
            y = bn(conv(y, mid, mid, 3, s, f"{p}.conv2"), mid, f"{p}.bn2")
            y = bn(conv(y, mid, cout, 1, 1, f"{p}.conv3"), cout, f"{p}.bn3", relu=False)
            skip = bn(conv(x, cin, cout, 1, s, f"{p}.downsample.0"), cout, f"{p}.downsample.1", relu=False) \
                if b == 0 else x
            nodes.append(helper.make_node("Add", [y, skip], [f"{p}.add"]))
            nodes.append(helper.make_node("Relu", [f"{p}.add"], [f"{p}.out"]))
            x, cin = f"{p}.out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    inits.append(numpy_helper.from_array(rng.standard_normal((1000, cin), dtype=np.float32) * np.float32(0.02),
                                         "fc.weight"))
    inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["output"], transB=1, name="fc"))
    graph = helper.make_graph(
        nodes, "wide_resnet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="bnfold-benchmark")
    tmp = path.with_name(path.name + ".part")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


# -- one tool, in its own process ---------------------------------------------------------------------
def run_tool(tool: str, src: str, dst: str) -> dict[str, Any]:
    """Import the tool, then time load + fold + save. Runs in a fresh interpreter (``--run``)."""
    exec(IMPORTS[tool], {})  # imports are not timed
    start = time.perf_counter()
    if tool == "floor":
        import onnx

        onnx.save(onnx.load(src), dst)
    elif tool == "bnfold":
        import bnfold

        bnfold.fold_file(src, dst, verify=False)
    elif tool == "bnfold-cli":
        from bnfold.cli.app import main

        try:
            main([src, "-o", dst, "--no-verify", "-q"])
        except SystemExit as exc:
            if exc.code:
                raise RuntimeError(f"bnfold exited {exc.code}") from None
    elif tool == "onnxoptimizer":
        import onnx
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)
    elif tool == "onnxsim":
        import onnx
        import onnxsim

        model, _ = onnxsim.simplify(onnx.load(src))
        onnx.save(model, dst)
    elif tool == "onnxslim":
        import onnxslim

        onnxslim.slim(src, dst)
    elif tool == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = dst
        ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
    else:
        raise ValueError(tool)
    return {"op_s": time.perf_counter() - start}


@dataclass
class Runs:
    op: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    error: str = ""


_LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))\n"
)
"""Spawns the measured process from a tiny interpreter: Linux counts the memory a process had before
``exec`` in its peak, so spawning straight from this (large) benchmark process would inflate it."""


def _subprocess(args: list[str]) -> tuple[int, str, str, int, float]:
    """(exit code, stdout, stderr, peak RSS bytes, wall seconds) of one fresh process. Output goes to
    files (a full pipe would block a chatty tool while we wait for it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err, result = (Path(tmp) / n for n in ("out", "err", "result"))
        with out.open("wb") as fo, err.open("wb") as fe:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", _LAUNCHER, str(result), *args], stdout=fo, stderr=fe,
                           cwd=ROOT, check=False)
            wall = time.perf_counter() - start
        code, maxrss = json.loads(result.read_text()) if result.exists() else (-1, 0)
        rss = maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux
        return code, out.read_text(errors="replace"), err.read_text(errors="replace"), rss, wall


def _importable(tool: str) -> str:
    code, _, err, _, _ = _subprocess([sys.executable, "-c", IMPORTS[tool]])
    return "" if code == 0 else (err.strip().splitlines() or ["import failed"])[-1]


def _baseline_rss(tool: str) -> int:
    _, _, _, rss, _ = _subprocess([sys.executable, "-c", IMPORTS[tool]])
    return rss


# -- checking the outputs -----------------------------------------------------------------------------
def check_output(original: Path, folded: Path, x: Any, reference: Any) -> dict[str, Any]:
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(folded), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    info: dict[str, Any] = {
        "bn_left": ops.count("BatchNormalization"),
        "nodes": len(ops),
        "size": sum(p.stat().st_size for p in folded.parent.iterdir() if p.name.startswith(folded.name)),
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(folded), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        info["max_abs_err"] = float(np.max(np.abs(got.astype(np.float64) - reference.astype(np.float64))))
    except Exception as exc:  # an anchor's output that onnxruntime refuses is part of the result
        info["error"] = str(exc).strip().splitlines()[0][:120]
    return info


# -- the table ----------------------------------------------------------------------------------------
def machine() -> str:
    from bnfold.environment import cpu_model

    cpu = cpu_model()
    mem = ""
    try:
        kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    versions = []
    for name in ("onnx", "onnxruntime", "numpy", "onnxoptimizer", "onnxsim", "onnxslim"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:
            versions.append(f"{name} -")
    return (f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; " + ", ".join(versions))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (median kept)")
    parser.add_argument("--quick", action="store_true", help="a small model and one run: checks the script")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bnfold-bench")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS))
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown too")
    parser.add_argument("--run", nargs=3, metavar=("TOOL", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_tool(*args.run)))
        return 0

    import numpy as np
    import onnxruntime as ort

    tools = [t for t in args.tools.split(",") if t]
    repeat = 1 if args.quick else args.repeat
    args.workdir.mkdir(parents=True, exist_ok=True)
    name = "wrn-small.onnx" if args.quick else "wide_resnet50_2.onnx"
    src = args.workdir / name
    if not src.exists():
        print(f"generating {src} ...", file=sys.stderr)
        build_wide_resnet(src, width=1, blocks=(1, 1, 1, 1)) if args.quick else build_wide_resnet(src)
    size = src.stat().st_size
    with src.open("rb") as f:  # warm the page cache: every tool reads from memory
        while f.read(1 << 24):
            pass
    missing = {t: why for t in tools if (why := _importable(t))}
    baselines = {t: _baseline_rss(t) for t in tools if t not in missing}
    runs = {t: Runs() for t in tools}
    outputs = {t: args.workdir / "out" / t / "model.onnx" for t in tools}
    for r in range(repeat):
        for tool in tools:
            if tool in missing or runs[tool].error:
                continue
            out = outputs[tool]
            out.parent.mkdir(parents=True, exist_ok=True)
            for old in out.parent.iterdir():  # deleting the previous output is not timed
                old.unlink()
            print(f"run {r + 1}/{repeat}: {tool}", file=sys.stderr)
            code, stdout, stderr, rss, wall = _subprocess(
                [sys.executable, str(Path(__file__).resolve()), "--run", tool, str(src), str(out)])
            if code != 0 or not out.exists():
                runs[tool].error = (stderr.strip().splitlines() or [f"exit {code}"])[-1][:120]
                continue
            runs[tool].op.append(json.loads(stdout.strip().splitlines()[-1])["op_s"])
            runs[tool].wall.append(wall)
            runs[tool].rss.append(rss)

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    reference = session.run(None, {"input": x})[0]
    del session
    checks = {t: check_output(src, outputs[t], x, reference) for t in tools
              if t not in missing and not runs[t].error}

    floor = statistics.median(runs["floor"].op) if "floor" in runs and runs["floor"].op else None
    header = ["tool", "op time s", "x floor", "wall s", "peak RSS MB", "RSS above interp. / model",
              "BN left", "nodes", "max abs err", "output MB"]
    rows: list[list[str]] = []
    for tool in tools:
        label = LABELS[tool]
        if tool in missing:
            rows.append([label, f"not installed ({missing[tool]})"] + [""] * (len(header) - 2))
            continue
        run = runs[tool]
        if run.error:
            rows.append([label, f"failed: {run.error}"] + [""] * (len(header) - 2))
            continue
        op, wall, rss = statistics.median(run.op), statistics.median(run.wall), max(run.rss)
        check = checks[tool]
        err = check.get("error") or f"{check['max_abs_err']:.2e}"
        rows.append([
            label, f"{op:.2f}", f"{op / floor:.2f}" if floor else "-", f"{wall:.2f}", f"{rss / 1e6:.0f}",
            f"{(rss - baselines[tool]) / size:.2f}", str(check["bn_left"]), str(check["nodes"]), err,
            f"{check['size'] / 1e6:.1f}",
        ])
    original_nodes = len(__import__("onnx").load(str(src), load_external_data=False).graph.node)

    from rich.console import Console
    from rich.table import Table

    title = (f"{name}: {size / 1e6:.1f} MB, {original_nodes} nodes; median of {repeat} run(s) per tool, "
             f"each in a fresh process")
    table = Table(title=title, header_style="bold")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(width=200)
    console.print(table)
    console.print(f"machine: {machine()}")
    console.print("max abs err: onnxruntime ORT_DISABLE_ALL on CPU, same input, against the original "
                  f"(|output| up to {float(np.max(np.abs(reference))):.3g}).")
    if args.markdown:
        print()
        print(f"{title}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nmachine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
