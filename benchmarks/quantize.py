"""Static INT8 quantization (onnxruntime.quantization, QDQ, per-channel) before and after folding.

For each float model, three inputs to ``quantize_static`` are compared:

* ``original``: the model as exported (BatchNormalization still in it);
* ``quant_pre_process``: onnxruntime's recommended pre-processing (symbolic shape inference, its graph
  optimizer, shape inference) applied to the original;
* ``bnfold``: ``bnfold.fold`` applied to the original;

and, for a model whose opset is below 13, ``bnfold + opset 13``: bnfold's output converted with
``onnx.version_converter`` first (per-channel quantization writes ``DequantizeLinear(axis=...)``, an
attribute that exists from opset 13 on).

Quantization: ``quantize_static(..., quant_format=QDQ, per_channel=True, activation_type=QInt8,
weight_type=QInt8)`` with a calibration reader of random N(0, 1) inputs (``--calibration`` samples).
For each quantized model: valid (``onnx.checker`` full check and an onnxruntime session), float
BatchNormalization left, QuantizeLinear / DequantizeLinear counts, Conv / Gemm / MatMul whose weight is
quantized (read through a DequantizeLinear) out of all, error to the float original (cosine similarity
and max |diff| of the outputs over ``--eval`` other random inputs; quantized on onnxruntime
``ORT_ENABLE_ALL``, where Q/DQ pairs become integer kernels, the float original on ``ORT_DISABLE_ALL``),
and latency quantized / float original (``ORT_ENABLE_ALL``, 1 thread; the float model and every quantized
variant of it interleaved in the same rounds; 95 % CI).

    python benchmarks/quantize.py              # ~3 min on 2 cores
    python benchmarks/quantize.py --quick      # the shipped models only, few runs
    python benchmarks/quantize.py --markdown   # also print the table as Markdown
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from downstream import _first_line, environment_line, interleaved_many, markdown_table, rich_table  # noqa: E402

import bnfold  # noqa: E402
from bnfold.timing.inputs import model_inputs, plan_inputs  # noqa: E402
from bnfold.timing.stats import bootstrap_ratio_ci  # noqa: E402

WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> index of its weight input
SHIPPED = ("resnet_mini.onnx", "conv_bn_constant_nodes.onnx", "legacy_ir3_bn.onnx")  # the float32 ones with BN


class RandomReader(CalibrationDataReader):
    """``count`` feeds of N(0, 1) data (seeds 1000...), one per ``get_next``."""

    def __init__(self, feeds: Callable[[int], dict[str, np.ndarray]], count: int) -> None:
        self._it = iter([feeds(1000 + i) for i in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


@dataclass
class Outcome:
    model: str
    variant: str
    opset: int
    float_bn: int
    quantized: str = ""  # "ok" or the error
    bn_left: int | None = None
    q: int | None = None
    dq: int | None = None
    weights_quantized: str = "-"
    cosine: float | None = None
    max_abs: float | None = None
    ratio: str = "-"
    session: ort.InferenceSession | None = None  # the quantized model, until it is timed


def session(path: Path, level: ort.GraphOptimizationLevel, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def weights_quantized(model: onnx.ModelProto) -> str:
    """How many Conv / Gemm / MatMul read their weight through a DequantizeLinear, out of all."""
    from_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in WEIGHTED and len(n.input) > WEIGHTED[n.op_type]]
    quantized = sum(1 for n in weighted if n.input[WEIGHTED[n.op_type]] in from_dq)
    return f"{quantized}/{len(weighted)}"


def compare(quantized: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, float]:
    q = np.concatenate([np.asarray(a, np.float64).ravel() for a in quantized])
    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in reference])
    cosine = float(q @ r / (np.linalg.norm(q) * np.linalg.norm(r) or 1.0))
    return cosine, float(np.max(np.abs(q - r)))


def variants(name: str, original: Path, work: Path) -> list[tuple[str, Path]]:
    model = onnx.load(original)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out = [("original", original)]
    pre = work / f"{original.stem}.pre.onnx"
    try:
        quant_pre_process(str(original), str(pre), skip_symbolic_shape=False)
        out.append(("quant_pre_process", pre))
    except Exception as exc:
        logging.getLogger(__name__).warning("%s: quant_pre_process failed: %s", name, _first_line(exc))
        out.append(("quant_pre_process", Path(f"failed: {_first_line(exc)}")))
    folded = work / f"{original.stem}.bnfold.onnx"
    bnfold.save(bnfold.fold(original).model, folded)
    out.append(("bnfold", folded))
    if opset < 13 or model.ir_version < 4:
        legacy = model.ir_version < 4  # initializers listed as graph inputs: fold them as constants
        converted = work / f"{original.stem}.bnfold13.onnx"
        onnx.save(for_quantization(bnfold.fold(original, initializers_as_constants=legacy).model), converted)
        label = "bnfold --initializers-as-constants + opset 13 + IR 7" if legacy else "bnfold + opset 13"
        out.append((label, converted))
    return out


def for_quantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """The recipe's step before ``quantize_static``: opset 13 at least (``DequantizeLinear`` gets ``axis``
    there); an IR 3 model (initializers also listed as graph inputs) gets IR 7 and its initializers taken
    out of the inputs, since the quantizer adds initializers that are not inputs."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        model = version_converter.convert_version(model, 13)
    if model.ir_version < 4:
        inits = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        model.ir_version = 7
    return model


def quantize_one(name: str, variant: str, src: Path, feeds: Callable[[int], dict[str, np.ndarray]],
                 reference: Callable[[int], list[np.ndarray]], args: argparse.Namespace, work: Path) -> Outcome:
    if not src.exists():
        return Outcome(name, variant, 0, 0, quantized=str(src))
    model = onnx.load(src)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out = Outcome(name, variant, opset, count(model, "BatchNormalization"))
    dst = work / f"{src.stem}.{variant.replace(' ', '_').replace('+', '')}.int8.onnx"
    try:
        quantize_static(str(src), str(dst), RandomReader(feeds, args.calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    except Exception as exc:
        out.quantized = f"quantize_static failed: {_first_line(exc)}"
        return out
    q = onnx.load(dst)
    out.bn_left, out.q = count(q, "BatchNormalization"), count(q, "QuantizeLinear")
    out.dq = count(q, "DequantizeLinear")
    out.weights_quantized = weights_quantized(q)
    try:
        onnx.checker.check_model(q, full_check=True)
        quantized = session(dst, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    except Exception as exc:
        out.quantized = f"invalid: {_first_line(exc)}"
        return out
    out.quantized = "ok"
    cosines, worst = [], 0.0
    for seed in range(args.eval):
        cosine, max_abs = compare(quantized.run(None, feeds(seed)), reference(seed))
        cosines.append(cosine)
        worst = max(worst, max_abs)
    out.cosine, out.max_abs = float(np.mean(cosines)), worst
    out.session = quantized
    return out


def time_together(outcomes: list[Outcome], float_session: ort.InferenceSession, feed: dict[str, np.ndarray],
                  args: argparse.Namespace) -> None:
    """The float original and every valid quantized variant of one model, interleaved in the same rounds;
    each variant's ratio to the float model, with its CI."""
    timed = [o for o in outcomes if o.session is not None]
    runners = [lambda s=float_session: s.run(None, feed)]
    runners += [lambda s=o.session: s.run(None, feed) for o in timed]  # type: ignore[misc]
    times, sizes = interleaved_many(runners, args.runs, args.rounds, args.warmup)
    for outcome, q_ms in zip(timed, times[1:], strict=True):
        low, high = bootstrap_ratio_ci(q_ms, times[0], block_sizes=sizes, resamples=1000, seed=0)
        outcome.ratio = f"x{np.median(q_ms) / np.median(times[0]):.2f} [{low:.2f}, {high:.2f}]"
        outcome.session = None


def built(args: argparse.Namespace) -> list[tuple[str, onnx.ModelProto]]:
    from downstream import built_models

    return built_models(False, args.resolution, args.width)[:3]  # the three CNNs


HEADER = ["model", "opset", "quantized input", "float BN in", "result", "float BN left", "Q / DQ",
          "weights quantized", "cosine to float", "max abs err", "latency int8 / float (1 thread)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calibration", type=int, default=16, help="random calibration samples")
    parser.add_argument("--eval", type=int, default=8, help="random inputs the error is measured on")
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="shipped models only, 10 runs")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.rounds, args.warmup, args.calibration, args.eval = 10, 2, 1, 4, 2
    logging.basicConfig(level=logging.ERROR)  # the quantizer's advice to pre-process is the point here
    console = Console(width=220)
    start = time.perf_counter()
    sources = [(p, onnx.load(ROOT / "models" / p)) for p in SHIPPED]
    if not args.quick:
        sources += built(args)
    rows: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="bnfold-quantize-") as tmp:
        work = Path(tmp)
        for i, (name, model) in enumerate(sources):
            original = work / f"m{i:02d}.onnx"
            onnx.save(model, original)
            plan, _ = plan_inputs(model_inputs(model), batch=1)
            float_ref = session(original, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            float_timed = session(original, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)

            def feeds(seed: int, plan: object = plan) -> dict[str, np.ndarray]:
                return plan.feeds(seed)  # type: ignore[attr-defined, no-any-return]

            def reference(seed: int, ref: ort.InferenceSession = float_ref) -> list[np.ndarray]:
                return ref.run(None, feeds(seed))

            mine = []
            for variant, src in variants(name, original, work):
                console.print(f"[dim]{name}: {variant}[/dim]")
                mine.append(quantize_one(name, variant, src, feeds, reference, args, work))
            time_together(mine, float_timed, feeds(0), args)
            rows += mine
    body = [[r.model, str(r.opset), r.variant, str(r.float_bn), r.quantized,
             "-" if r.bn_left is None else str(r.bn_left), "-" if r.q is None else f"{r.q} / {r.dq}",
             r.weights_quantized, "-" if r.cosine is None else f"{r.cosine:.4f}",
             "-" if r.max_abs is None else f"{r.max_abs:.3g}", r.ratio] for r in rows]
    console.print(rich_table("Static INT8 (QDQ, per-channel, S8S8) of the original, of quant_pre_process's output "
                             "and of bnfold's output", HEADER, body))
    console.print(f"calibration: {args.calibration} random N(0,1) inputs; error over {args.eval} other random "
                  f"inputs against the float original (ORT_DISABLE_ALL); latency: {args.runs} runs in "
                  f"{args.rounds} interleaved rounds, ORT_ENABLE_ALL, 1 thread, median ratio and 95% CI")
    console.print(environment_line())
    console.print(f"{len(sources)} models, {time.perf_counter() - start:.0f} s")
    if args.markdown:
        print()
        print(markdown_table(HEADER, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
