"""Peak memory of ``bnfold MODEL -o OUT`` with and without verification, as a multiple of the model's size.

onnxruntime allocates outside Python (tracemalloc cannot see it), so each run is a fresh subprocess and
its peak resident memory is ``ru_maxrss`` from ``wait4``. The model is built in code: ``--layers`` blocks
of Gemm (``--width`` x ``--width`` float32) -> BatchNormalization, one ``.onnx`` file (or external data
with ``--external``). Rows: the interpreter with bnfold and onnxruntime imported (the floor), the fold
without verification, the default run (fold + verification); for each checkout given with ``--code``
(default: this one), so a before/after comparison runs on the same machine and model.

    python benchmarks/verify_memory.py                       # 20 x 2048^2: a 320 MB model
    python benchmarks/verify_memory.py --code /tmp/old-bnfold --code .   # before / after
    python benchmarks/verify_memory.py --layers 2 --width 512            # checks the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOOR = "import bnfold.pipeline, onnxruntime, numpy"
RUN = """
import sys
from bnfold.pipeline import fold_file
run = fold_file(sys.argv[1], sys.argv[2], verify=sys.argv[3] == "verify")
assert run.written and run.exit_code == 0, run.exit_code
if run.comparison is not None:
    assert run.comparison.passed
"""


def build(path: Path, layers: int, width: int, external: bool) -> int:
    """Write the model; return its size in bytes (model file plus data file)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), f"gamma{i}"),
            numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), f"beta{i}"),
            numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), f"mean{i}"),
            numpy_helper.from_array(rng.uniform(0.5, 2, width).astype(np.float32), f"var{i}"),
        ]
        nodes += [
            helper.make_node("Gemm", [x, f"W{i}"], [f"g{i}"]),
            helper.make_node("BatchNormalization", [f"g{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                             [f"b{i}"]),
        ]
        x = f"b{i}"
    graph = helper.make_graph(nodes, "gemm_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [4, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
        return path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size
    onnx.save(model, path)
    return path.stat().st_size


LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""
"""Spawns the measured process from a tiny interpreter: a child's ``ru_maxrss`` starts at its parent's
resident size at ``fork``, so the benchmark (which holds the model it built) must not be that parent."""


def peak_rss(code: Path, script: str, *args: str) -> int:
    """Peak resident bytes of ``python -c script args`` run with ``code`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", script, *args], env=env,
                          capture_output=True, text=True, check=True)
    status, peak = (int(v) for v in done.stdout.split()[-2:])
    if status != 0:
        raise SystemExit(f"{script.strip().splitlines()[0]} {' '.join(args)}: exit {status}\n{done.stderr}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--external", action="store_true", help="save the model with external data")
    parser.add_argument("--code", type=Path, action="append", help="a bnfold checkout (repeatable)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per row (median kept)")
    parser.add_argument("--workdir", type=Path, help="where the model goes (default: a temporary folder)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal: build the model and exit
    args = parser.parse_args()
    if args.build is not None:
        build(args.build, args.layers, args.width, args.external)
        return
    codes = [c.resolve() for c in args.code or [ROOT]]
    with tempfile.TemporaryDirectory(prefix="bnfold-mem-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        src, out = work / "model.onnx", work / "model.folded.onnx"
        subprocess.run([sys.executable, __file__, "--build", str(src), "--layers", str(args.layers), "--width",
                        str(args.width), *(["--external"] if args.external else [])], check=True)
        size = src.stat().st_size + sum(p.stat().st_size for p in work.glob("model.onnx.data"))
        mb = 1 << 20
        print(f"model: {args.layers} x Gemm({args.width}x{args.width}) + BatchNormalization, "
              f"{size / mb:.0f} MB{' (external data)' if args.external else ''}; peak RSS of a fresh process")
        print()
        print(f"median of {args.repeat} runs (min-max); codes interleaved run by run")
        print()
        print("| code | run | peak RSS MB | range MB | peak / model | above floor / model |")
        print("|---|---|--:|--:|--:|--:|")
        jobs = [("floor", FLOOR, ()), ("no-verify", RUN, (str(src), str(out), "no-verify")),
                ("verify", RUN, (str(src), str(out), "verify"))]
        peaks: dict[tuple[Path, str], list[int]] = {}
        for _ in range(args.repeat):
            for name, script, extra in jobs:
                for code in codes:
                    peaks.setdefault((code, name), []).append(peak_rss(code, script, *extra))
        labels = {"floor": "interpreter + imports (floor)", "no-verify": "fold, --no-verify",
                  "verify": "fold + verification (default)"}
        for code in codes:
            floor = statistics.median(peaks[code, "floor"])
            for name, _, _ in jobs:
                runs = peaks[code, name]
                peak = statistics.median(runs)
                above = "-" if name == "floor" else f"{(peak - floor) / size:.2f}"
                print(f"| {code} | {labels[name]} | {peak / mb:.0f} | {min(runs) / mb:.0f}-{max(runs) / mb:.0f} | "
                      f"{peak / size:.2f} | {above} |")


if __name__ == "__main__":
    main()
