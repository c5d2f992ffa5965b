"""Folded vs original in the runtimes a folded model is handed to: what folding buys in each.

Consumers (each one measured when it imports, skipped with one line otherwise):

* onnxruntime at ``ORT_DISABLE_ALL`` and at ``ORT_ENABLE_ALL`` (always);
* OpenVINO (``pip install openvino``), CPU plugin;
* tract (``pip install tract``), the Rust runtime's Python binding;
* onnx2torch (``pip install onnx2torch``; it imports torchvision), eager PyTorch.

Models: the shipped ``models/*.onnx`` and networks built in code with torch (blocks of tests/nets.py,
exported by the legacy exporter with ``TrainingMode.PRESERVE`` so that BatchNormalization stays), each
folded with ``bnfold.fold`` and saved with ``bnfold.save``. For each consumer and model:

* accepted: the consumer loads and runs the original / the folded model;
* max |folded - original| in that consumer, and each one's error against the reference (the original on
  onnxruntime ``ORT_DISABLE_ALL``); ``nan`` marks non-finite outputs where the reference is finite;
* nodes after the consumer's own optimization, original -> folded (onnxruntime: the optimized model it
  writes; OpenVINO: the compiled runtime model; tract: the optimized plan; constants, inputs and
  outputs not counted), where it can be read;
* latency ratio folded / original (below 1: folded is faster), median of runs interleaved in rounds
  (A B | B A | ...), with a 95 % stratified bootstrap CI, at 1 thread and at the consumer's default.

    python benchmarks/downstream.py                # ~6 min on 2 cores (--runs 60: ~3 min)
    python benchmarks/downstream.py --quick        # checks the script: few runs, two nets
    python benchmarks/downstream.py --markdown     # also print the tables as Markdown
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bnfold  # noqa: E402
from bnfold.environment import cpu_model  # noqa: E402
from bnfold.timing.inputs import model_inputs, plan_inputs  # noqa: E402
from bnfold.timing.stats import bootstrap_ratio_ci  # noqa: E402

Runner = Callable[[], list[np.ndarray]]
THREAD_MODES = ("1", "default")


# --------------------------------------------------------------------------------------------- models
@dataclass
class Case:
    name: str
    original: Path
    folded: Path
    feeds: dict[str, np.ndarray]
    bn_total: int
    bn_folded: int
    note: str = ""


def _load_latency_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("bench_latency", ROOT / "benchmarks" / "latency.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_latency"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def built_models(quick: bool, resolution: int, width: float) -> list[tuple[str, onnx.ModelProto]]:
    """CNNs from benchmarks/latency.py (ResNet-18, MobileNetV2, EfficientNet-B0 style) and two nets of
    tests/nets.py whose BN follows a Gemm or a ConvTranspose; empty without torch."""
    try:
        import torch  # noqa: F401
    except ImportError as err:
        print(f"skipping built networks: {err}", file=sys.stderr)
        return []
    sys.path.insert(0, str(ROOT / "tests"))
    import nets

    out: list[tuple[str, onnx.ModelProto]] = []
    for name, make, shape in _load_latency_benchmark().built_nets(resolution, width):
        if quick and not name.startswith("resnet18"):
            continue
        label = f"{name} {shape[2]}x{shape[3]}" + (f" w{width:g}" if width != 1 else "")
        out.append((label, nets.export_keep_bn(make(), shape)))
    for name in ("mlp_bn1d", "decoder_convtranspose"):
        if quick and name != "mlp_bn1d":
            continue
        module, shape = nets.NETS[name]()
        out.append((f"{name} (tests/nets.py)", nets.export_keep_bn(module, shape)))
    return out


def prepare_cases(args: argparse.Namespace, workdir: Path) -> list[Case]:
    sources: list[tuple[str, onnx.ModelProto]] = []
    if not args.no_shipped:
        sources += [(p.name, onnx.load(p)) for p in sorted((ROOT / "models").glob("*.onnx"))]
    if not args.no_nets:
        sources += built_models(args.quick, args.resolution, args.width)
    if args.only:
        sources = [(n, m) for n, m in sources if any(key in n for key in args.only)]
    cases = []
    for i, (name, model) in enumerate(sources):
        original, folded = workdir / f"{i:02d}_original.onnx", workdir / f"{i:02d}_folded.onnx"
        onnx.save(model, original)
        result = bnfold.fold(original)
        bnfold.save(result.model, folded)
        plan, _ = plan_inputs(model_inputs(model), batch=1)
        feeds = plan.feeds(0)
        left = sum(1 for s in result.skipped if s.op_type == "BatchNormalization")
        cases.append(Case(name, original, folded, feeds, len(result.folded) + left, len(result.folded)))
    return cases


# ------------------------------------------------------------------------------------------ consumers
@dataclass
class Prepared:
    run: Runner
    nodes: int | None = None


@dataclass
class Consumer:
    name: str
    prepare: Callable[[Path, dict[str, np.ndarray], int | None, Path], Prepared]
    threads: tuple[str, ...] = THREAD_MODES
    version: str = ""


def _first_line(exc: BaseException) -> str:
    """The informative line of an error (OpenVINO's first lines are the C++ file that threw)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    summary = [ln for ln in lines if ln.startswith("-- Conversion is failed for")]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    line = (summary or useful or lines or [type(exc).__name__])[0]
    return line.lstrip("- ")[:140]


def onnxruntime_consumer(level_name: str) -> Consumer:
    level = getattr(ort.GraphOptimizationLevel, level_name)

    def prepare(path: Path, feeds: dict[str, np.ndarray], threads: int | None, scratch: Path) -> Prepared:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = threads or 0
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        written = scratch / f"{path.stem}.{level_name}.ort_optimized.onnx"
        so.optimized_model_filepath = str(written)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        nodes = None
        if written.exists():
            nodes = len(onnx.load(written, load_external_data=False).graph.node)
        return Prepared(lambda: sess.run(None, feeds), nodes)

    short = level_name.replace("ORT_", "")
    return Consumer(f"onnxruntime {short}", prepare, version=ort.__version__)


def openvino_consumer() -> Consumer | str:
    try:
        import openvino as ov
    except ImportError as err:
        return f"OpenVINO skipped: {_first_line(err)} (pip install openvino)"
    core = ov.Core()

    def prepare(path: Path, feeds: dict[str, np.ndarray], threads: int | None, scratch: Path) -> Prepared:
        model = core.read_model(str(path))
        model.reshape({inp.get_any_name(): list(feeds[inp.get_any_name()].shape) for inp in model.inputs
                       if inp.get_any_name() in feeds})
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        names = [out.get_any_name() for out in compiled.outputs]
        skip = {"Const", "Input", "Output", "Parameter", "Result", "Constant"}
        ops = compiled.get_runtime_model().get_ops()
        nodes = sum(1 for op in ops if str(op.get_rt_info()["layerType"].astype(str)) not in skip)

        def run() -> list[np.ndarray]:
            result = request.infer(feeds)
            return [np.array(result[compiled.output(n)]) for n in names]

        return Prepared(run, nodes)

    return Consumer("OpenVINO CPU", prepare, version=ov.__version__.split("-")[0])


_TRACT_TYPES = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64", "int32": "i32",
                "uint8": "u8", "int8": "i8", "bool": "bool"}


def tract_consumer() -> Consumer | str:
    try:
        import tract
    except ImportError as err:
        return f"tract skipped: {_first_line(err)} (pip install tract)"
    import json

    def prepare(path: Path, feeds: dict[str, np.ndarray], threads: int | None, scratch: Path) -> Prepared:
        model = tract.onnx().load(str(path))
        order = [model.input_name(i) for i in range(model.input_count())]
        arrays = [feeds[name] for name in order]
        for i, arr in enumerate(arrays):
            model.set_input_fact(i, ",".join([*map(str, arr.shape), _TRACT_TYPES[str(arr.dtype)]]))
        runnable = model.into_model().into_runnable()
        profile = json.loads(runnable.profile_json(arrays))
        nodes = sum(1 for n in profile["nodes"] if n.get("op_name") not in {"Const", "Source"})
        return Prepared(lambda: [t.to_numpy() for t in runnable.run(arrays)], nodes)

    from importlib.metadata import version

    # tract runs a model on the calling thread: one thread is its default
    return Consumer("tract", prepare, threads=("1",), version=version("tract"))


def onnx2torch_consumer() -> Consumer | str:
    try:
        import onnx2torch
        import torch
    except Exception as err:  # torchvision built for another torch fails with other errors than ImportError
        return f"onnx2torch skipped: it does not import here ({type(err).__name__}: {_first_line(err)})"
    default_threads = torch.get_num_threads()

    def prepare(path: Path, feeds: dict[str, np.ndarray], threads: int | None, scratch: Path) -> Prepared:
        module = onnx2torch.convert(str(path)).eval()
        order = [i.name for i in onnx.load(path, load_external_data=False).graph.input if i.name in feeds]
        tensors = [torch.from_numpy(feeds[name]) for name in order]

        def run() -> list[np.ndarray]:
            torch.set_num_threads(threads or default_threads)
            with torch.inference_mode():
                out = module(*tensors)
            outs = out if isinstance(out, (tuple, list)) else [out]
            return [o.numpy() for o in outs]

        return Prepared(run, None)

    from importlib.metadata import version

    return Consumer("onnx2torch (eager torch)", prepare, version=version("onnx2torch"))


# ------------------------------------------------------------------------------------------ measuring
def max_err(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Largest |a - b| over all outputs, in float64; nan when one side is non-finite where the other is not."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x64, y64 = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x64.shape != y64.shape:
            return float("inf")
        fx, fy = np.isfinite(x64), np.isfinite(y64)
        if (fx != fy).any():
            return float("nan")
        if fx.any():
            worst = max(worst, float(np.max(np.abs(x64[fx] - y64[fx]))))
    return worst


def interleaved_many(runners: Sequence[Runner], runs: int, rounds: int,
                     warmup: int) -> tuple[list[list[float]], list[int]]:
    """Per-run ms of each runner: ``runs`` each in ``rounds`` blocks, the order reversed every other round
    (A B C | C B A | ...), the first run of every block untimed."""
    for _ in range(warmup):
        for fn in runners:
            fn()
    rounds = min(rounds, runs)
    sizes = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    times: list[list[float]] = [[] for _ in runners]
    clock = time.perf_counter_ns
    for r, n in enumerate(sizes):
        order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
        for which in order:
            fn = runners[which]
            fn()
            for _ in range(n):
                start = clock()
                fn()
                times[which].append((clock() - start) / 1e6)
    return times, sizes


def interleaved(a: Runner, b: Runner, runs: int, rounds: int,
                warmup: int) -> tuple[list[float], list[float], list[int]]:
    """:func:`interleaved_many` for two runners (A B | B A | ...)."""
    (ta, tb), sizes = interleaved_many([a, b], runs, rounds, warmup)
    return ta, tb, sizes


@dataclass
class Ratio:
    ratio: float
    low: float
    high: float
    original_ms: float
    folded_ms: float

    def text(self) -> str:
        return f"x{self.ratio:.3f} [{self.low:.2f}, {self.high:.2f}]"


@dataclass
class Row:
    model: str
    consumer: str
    accepted: str
    diff: float | None = None
    orig_err: float | None = None
    fold_err: float | None = None
    nodes: tuple[int | None, int | None] = (None, None)
    ratios: dict[str, Ratio | str] = field(default_factory=dict)


def measure(case: Case, consumer: Consumer, reference: list[np.ndarray], args: argparse.Namespace,
            scratch: Path) -> Row:
    row = Row(case.name, consumer.name, "")
    status = []
    prepared: dict[str, dict[str, Prepared]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for which, path in (("original", case.original), ("folded", case.folded)):
        try:
            first = consumer.prepare(path, case.feeds, 1, scratch)
            outputs[which] = first.run()
            prepared[which] = {"1": first}
            status.append("yes")
        except Exception as exc:
            status.append(f"no ({_first_line(exc)})")
    row.accepted = " / ".join(status) if len(set(status)) > 1 else status[0]
    if "original" in outputs:
        row.orig_err = max_err(outputs["original"], reference)
    if "folded" in outputs:
        row.fold_err = max_err(outputs["folded"], reference)
    if len(outputs) < 2:
        return row
    row.diff = max_err(outputs["folded"], outputs["original"])
    row.nodes = (prepared["original"]["1"].nodes, prepared["folded"]["1"].nodes)
    for mode in consumer.threads:
        threads = 1 if mode == "1" else None
        try:
            if mode != "1":
                for which, path in (("original", case.original), ("folded", case.folded)):
                    prepared[which][mode] = consumer.prepare(path, case.feeds, threads, scratch)
            a, b = prepared["original"][mode].run, prepared["folded"][mode].run
            orig_ms, fold_ms, sizes = interleaved(a, b, args.runs, args.rounds, args.warmup)
        except Exception as exc:
            row.ratios[mode] = f"failed: {_first_line(exc)}"
            continue
        low, high = bootstrap_ratio_ci(fold_ms, orig_ms, block_sizes=sizes, resamples=1000, seed=0)
        orig_median, fold_median = float(np.median(orig_ms)), float(np.median(fold_ms))
        row.ratios[mode] = Ratio(fold_median / orig_median, low, high, orig_median, fold_median)
    return row


# ---------------------------------------------------------------------------------------------- output
def _err(x: float | None) -> str:
    if x is None:
        return "-"
    if np.isnan(x):
        return "nan"
    return "0" if x == 0 else f"{x:.1e}"


def _nodes(n: tuple[int | None, int | None]) -> str:
    a, b = n
    if a is None or b is None:
        return "-"
    return f"{a} -> {b}" + (f" ({(b - a) / a:+.0%})" if a and a != b else "")


def _ratio(r: Ratio | str | None) -> str:
    if r is None:
        return "-"
    return r if isinstance(r, str) else r.text()


SUMMARY_NOTE = ("* over the models with at least one BN folded: range of the median ratios (median of them); "
                "the models with nothing folded show the noise")
HEADER = ["model", "BN folded", "consumer", "accepted", "max|fold-orig|", "err orig", "err fold",
          "nodes after consumer opt.", "folded/original 1 thread", "folded/original default threads"]


def table_rows(cases: list[Case], rows: list[Row]) -> list[list[str]]:
    by_name = {c.name: c for c in cases}
    out = []
    for row in rows:
        case = by_name[row.model]
        out.append([row.model, f"{case.bn_folded}/{case.bn_total}", row.consumer, row.accepted, _err(row.diff),
                    _err(row.orig_err), _err(row.fold_err), _nodes(row.nodes), _ratio(row.ratios.get("1")),
                    _ratio(row.ratios.get("default"))])
    return out


def summary_rows(rows: list[Row], consumers: list[Consumer], cases: list[Case]) -> list[list[str]]:
    """Per consumer: models accepted (all models), node change and the range of median ratios (models with at
    least one fold: where nothing was folded, the two files compute alike and the ratio is the noise)."""
    folded = {c.name for c in cases if c.bn_folded}
    out = []
    for consumer in consumers:
        everything = [r for r in rows if r.consumer == consumer.name]
        mine = [r for r in everything if r.model in folded]
        both = sum(1 for r in everything if r.accepted == "yes")
        only_fold = sum(1 for r in everything if r.accepted.startswith("no") and r.accepted.endswith("/ yes"))
        node_changes = [(b - a) / a for r in mine for a, b in [r.nodes] if a and b is not None]
        cells = [consumer.name, consumer.version, f"{both}/{len(everything)}" + (f" (+{only_fold} folded only)"
                                                                                 if only_fold else "")]
        cells.append(f"{min(node_changes):+.0%} .. {max(node_changes):+.0%}" if node_changes else "-")
        for mode in THREAD_MODES:
            vals = [got.ratio for r in mine if isinstance(got := r.ratios.get(mode), Ratio)]
            cells.append(f"x{min(vals):.2f} .. x{max(vals):.2f} (median x{np.median(vals):.2f})" if vals else "-")
        out.append(cells)
    return out


SUMMARY_HEADER = ["consumer", "version", "both accepted", "nodes after its optimization*",
                  "folded/original 1 thread*", "default threads*"]


def rich_table(title: str, header: list[str], body: list[list[str]]) -> Table:
    table = Table(title=title, show_lines=False)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in body:
        table.add_row(*r)
    return table


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines)


def environment_line() -> str:
    cpu = cpu_model()
    return (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} logical cores; "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
            f"bnfold {bnfold.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
            f"numpy {np.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=150, help="timed runs per model, consumer and thread mode")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="10 runs in 2 rounds, two built nets: checks the script")
    parser.add_argument("--resolution", type=int, default=96, help="input size of the built CNNs")
    parser.add_argument("--width", type=float, default=0.5, help="channel multiplier of the built CNNs")
    parser.add_argument("--no-shipped", action="store_true")
    parser.add_argument("--no-nets", action="store_true")
    parser.add_argument("--only", nargs="*", help="models whose name contains one of these")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.rounds, args.warmup = 10, 2, 1
    console = Console(width=220)
    consumers: list[Consumer] = [onnxruntime_consumer("ORT_DISABLE_ALL"), onnxruntime_consumer("ORT_ENABLE_ALL")]
    skipped: list[str] = []
    for make in (openvino_consumer, tract_consumer, onnx2torch_consumer):
        got = make()
        if isinstance(got, str):
            skipped.append(got)
            console.print(got)
        else:
            consumers.append(got)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfold-downstream-") as tmp:
        workdir = Path(tmp)
        cases = prepare_cases(args, workdir)
        rows: list[Row] = []
        for case in cases:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            reference = ort.InferenceSession(str(case.original), so, providers=["CPUExecutionProvider"]).run(
                None, case.feeds)
            for consumer in consumers:
                console.print(f"[dim]{case.name}: {consumer.name}[/dim]")
                rows.append(measure(case, consumer, reference, args, workdir))
    elapsed = time.perf_counter() - start
    body, summary = table_rows(cases, rows), summary_rows(rows, consumers, cases)
    caption = (f"{args.runs} timed runs per model in {args.rounds} interleaved rounds after {args.warmup} "
               "warm-up runs; ratio = folded median / original median, 95% bootstrap CI; errors against the "
               "original on onnxruntime ORT_DISABLE_ALL")
    console.print(rich_table("Folded vs original, per consumer", HEADER, body))
    console.print(caption)
    console.print(rich_table("Summary per consumer", SUMMARY_HEADER, summary))
    console.print(SUMMARY_NOTE)
    console.print(environment_line())
    console.print(f"{len(cases)} models, {len(consumers)} consumers, {elapsed:.0f} s")
    if args.markdown:
        print()
        print(markdown_table(SUMMARY_HEADER, summary))
        print()
        print(SUMMARY_NOTE)
        print()
        print(markdown_table(HEADER, body))
        print()
        for line in skipped:
            print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
