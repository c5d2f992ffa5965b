"""Original vs folded latency on onnxruntime, per execution provider and optimization level.

Networks built in code (ResNet-18-, MobileNetV2- and EfficientNet-B0-style, from the blocks in
tests/nets.py, exported with BatchNormalization kept) and the shipped models/*.onnx are folded with
``bnfold.fold`` and timed with ``bnfold.timing`` (CPU, plus CUDA when it works): runs interleaved in
rounds, medians, a bootstrap CI of the speed-up, session creation time. Prints a table and writes it to
docs/latency.md with the machine it ran on.

    python benchmarks/latency.py            # full: 224x224 inputs, 200 runs per model and configuration
    python benchmarks/latency.py --quick    # small inputs and few runs: checks the script, numbers are rough

ORT_DISABLE_ALL shows what folding alone buys; ORT_ENABLE_ALL what a deployment sees (onnxruntime fuses
Conv + BatchNormalization itself when it loads a model, so a ratio near 1 is expected there for plain
Conv -> BN networks).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bnfold  # noqa: E402
from bnfold.environment import Environment  # noqa: E402
from bnfold.timing import LatencyReport, latency  # noqa: E402


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    shapes: dict[str, list[int]] | None = None


def built_nets(resolution: int, width: float) -> list[tuple[str, Callable[[], Any], tuple[int, ...]]]:
    """(name, module factory, input shape) for the CNNs built in code; empty without torch."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import nets  # tests/nets.py: blocks and the BN-keeping exporter
        from torch import nn
    except ImportError as err:
        print(f"skipping built networks: {err}", file=sys.stderr)
        return []

    def c(n: int) -> int:
        return max(8, int(n * width) // 8 * 8)

    def head(cin: int) -> list[Any]:
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]

    def resnet18() -> Any:
        layers: list[Any] = [nets.conv_bn(3, c(64), 7, 2), nn.MaxPool2d(3, 2, 1)]
        cin = c(64)
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [nets.BasicBlock(cin, c(cout), stride), nets.BasicBlock(c(cout), c(cout))]
            cin = c(cout)
        return nn.Sequential(*layers, *head(cin))

    def mobilenetv2() -> Any:
        layers: list[Any] = [nets.conv_bn(3, c(32), 3, 2, act=nn.ReLU6)]
        cin = c(32)
        for t, cout, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                              (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
            for i in range(n):
                layers.append(nets.InvertedResidual(cin, c(cout), s if i == 0 else 1, expand=t))
                cin = c(cout)
        layers.append(nets.conv_bn(cin, c(1280), 1, act=nn.ReLU6))
        return nn.Sequential(*layers, *head(c(1280)))

    def efficientnet_b0() -> Any:
        layers: list[Any] = [nets.conv_bn(3, c(32), 3, 2, act=nn.SiLU)]
        cin = c(32)
        for e, k, s, cout, n in ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                                 (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)):  # fmt: skip
            for i in range(n):
                layers.append(nets.MBConv(cin, c(cout), k, s if i == 0 else 1, expand=e))
                cin = c(cout)
        layers.append(nets.conv_bn(cin, c(1280), 1, act=nn.SiLU))
        return nn.Sequential(*layers, *head(c(1280)))

    shape = (1, 3, resolution, resolution)

    def seeded(build: Callable[[], Any], seed: int) -> Callable[[], Any]:
        def make() -> Any:
            import torch

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return nets.randomize_bn(build(), seed)

        return make

    return [
        ("resnet18-style", seeded(resnet18, 1), shape),
        ("mobilenetv2-style", seeded(mobilenetv2, 2), shape),
        ("efficientnet-b0-style", seeded(efficientnet_b0, 3), shape),
    ]


def collect_cases(args: argparse.Namespace) -> list[Case]:
    cases: list[Case] = []
    if not args.no_nets:
        sys.path.insert(0, str(ROOT / "tests"))
        resolution, width = (64, 0.5) if args.quick else (224, 1.0)
        for name, make, shape in built_nets(resolution, width):
            import nets

            label = f"{name} {shape[2]}x{shape[3]}" + (f" width x{width:g}" if width != 1 else "")
            cases.append(Case(label, nets.export_keep_bn(make(), shape)))
    if not args.no_shipped:
        for path in sorted((ROOT / "models").glob("*.onnx")):
            cases.append(Case(path.name, onnx.load(path)))
    if args.only:
        cases = [c for c in cases if any(key in c.name for key in args.only)]
    return cases


def measure(case: Case, args: argparse.Namespace, progress: Progress) -> tuple[Any, LatencyReport | str]:
    result = bnfold.fold(case.model)
    task = progress.add_task(case.name, total=None)

    def tick(label: str, done: int, total: int) -> None:
        progress.update(task, description=f"{case.name}: {label}", completed=done, total=total)

    try:
        report = latency(
            {"original": case.model, "folded": result.model},
            providers=args.providers,
            runs=args.runs,
            warmup=args.warmup,
            rounds=args.rounds,
            creations=args.creations,
            threads=args.threads,
            include_copies=args.include_copies,
            progress=tick,
        )
    except bnfold.BnfoldError as err:  # e.g. a shipped model with dynamic spatial dims
        return result, f"not timed: {err}"
    finally:
        progress.remove_task(task)
    return result, report


def _fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


HEADER = ["model", "BN folded", "nodes", "provider / ORT opt.", "original ms", "folded ms",
          "speed-up [95% CI]", "create orig ms", "create folded ms"]  # fmt: skip


def rows(case: Case, result: Any, report: LatencyReport | str) -> list[list[str]]:
    bn_total = len(result.folded) + sum(1 for s in result.skipped if s.op_type == "BatchNormalization")
    folded = f"{len(result.folded)}/{bn_total}" if bn_total else str(len(result.folded))
    nodes = f"{result.nodes_before} -> {result.nodes_after}"
    if isinstance(report, str):
        return [[case.name, folded, nodes, report, "", "", "", "", ""]]
    out = []
    for cfg in report.configs:
        orig, fold = cfg.models["original"], cfg.models["folded"]
        sp = cfg.speedup("folded")
        assert sp is not None
        out.append(
            [
                case.name,
                folded,
                nodes,
                cfg.config.label,
                _fmt_ms(orig.run.median_ms),
                _fmt_ms(fold.run.median_ms),
                f"x{sp.ratio:.3f} [{sp.ci_low:.3f}, {sp.ci_high:.3f}]",
                _fmt_ms(orig.creation.median_ms),
                _fmt_ms(fold.creation.median_ms),
            ]
        )
    return out


def markdown(
    all_rows: list[list[str]], env: dict[str, Any], args: argparse.Namespace, notes: list[str]
) -> str:
    threads = args.threads if args.threads is not None else "onnxruntime default (one per physical core)"
    gpus = ", ".join(env.get("gpus") or []) or "none measured"
    lines = [
        "# Latency: original vs folded",
        "",
        f"Generated by `python benchmarks/latency.py{' --quick' if args.quick else ''}` on "
        f"{dt.date.today().isoformat()}."
        + (
            " **Quick run: reduced input sizes and run counts; the numbers are rough.**" if args.quick else ""
        ),
        "",
        "| machine | |",
        "| --- | --- |",
        f"| CPU | {env['cpu_model']} |",
        f"| cores | {env['cpu_count']} logical, {env['cpu_usable']} usable by this process |",
        f"| GPU | {gpus} |",
        f"| platform | {env['platform']} |",
        f"| onnxruntime | {env['onnxruntime']} "
        f"(providers available: {', '.join(env['available_providers'])}) |",
        f"| settings | {args.runs} runs per model and configuration in {args.rounds} interleaved rounds, "
        f"{args.warmup} warm-up runs, {args.creations} session creations, threads: {threads} |",
        "",
        "Speed-up = original median / folded median (above 1: the folded model is faster), with a 95% "
        "bootstrap confidence interval. `disable_all`: onnxruntime's graph optimizations off, what folding "
        "alone buys (and what a runtime that does not fold sees). `enable_all`: what an onnxruntime "
        "deployment sees; onnxruntime fuses Conv + BatchNormalization itself there. Session creation: "
        "median time to create an InferenceSession from the model bytes.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join("---" if i < 4 else "---:" for i in range(len(HEADER))) + " |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in all_rows]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small inputs and few runs (a smoke test)")
    parser.add_argument(
        "--runs", type=int, help="timed runs per model and configuration (default 200; quick 20)"
    )
    parser.add_argument("--warmup", type=int, help="warm-up runs (default 20; quick 3)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 10; quick 4)")
    parser.add_argument("--creations", type=int, help="timed session creations (default 5; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument(
        "--providers", nargs="*", default=None, help="e.g. cpu cuda (default: CPU + CUDA if it works)"
    )
    parser.add_argument("--include-copies", action="store_true", help="also time CUDA with host copies")
    parser.add_argument("--only", nargs="*", help="only the cases whose name contains one of these")
    parser.add_argument("--no-nets", action="store_true", help="skip the networks built in code")
    parser.add_argument("--no-shipped", action="store_true", help="skip models/*.onnx")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "latency.md", help="markdown output")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    defaults = {"runs": (200, 20), "warmup": (20, 3), "rounds": (10, 4), "creations": (5, 1)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)

    console = Console(stderr=True)
    out = Console() if Console().is_terminal else Console(width=200)
    cases = collect_cases(args)
    all_rows: list[list[str]] = []
    notes: list[str] = []
    measured: list[str] = []
    with Progress(console=console, transient=True) as progress:
        for case in cases:
            result, report = measure(case, args, progress)
            all_rows += rows(case, result, report)
            if not isinstance(report, str):
                notes += report.notes
                measured = (
                    list(report.settings.providers)
                    if len(report.settings.providers) > len(measured)
                    else measured
                )
    env = Environment.capture(measured_providers=measured or ["CPUExecutionProvider"]).to_dict()

    table = Table(title="Latency: original vs folded (medians, ms)")
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="left" if i < 4 else "right")
    for r in all_rows:
        table.add_row(*r)
    out.print(table)
    for note in dict.fromkeys(notes):
        out.print(f"note: {note}")
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(all_rows, env, args, notes))
        Console().print(
            f"written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
