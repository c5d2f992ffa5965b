"""The latency picture: ``LatencyReport.plot``, ``--plot`` on the CLI, and the error without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bnfold.check.runtime import CPU
from bnfold.cli.app import main
from bnfold.errors import ExitCode, MissingDependencyError, OptionError
from bnfold.timing import (
    ConfigResult,
    LatencyReport,
    LatencySettings,
    LatencyStats,
    MeasureConfig,
    ModelMeasurement,
    Speedup,
)

MODEL = Path(__file__).resolve().parent.parent / "models" / "conv_bn_constant_nodes.onnx"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_report(runs: int = 40) -> LatencyReport:
    """Two configurations, original and folded, ``runs`` synthetic samples each (folded ~10% faster)."""
    rng = np.random.default_rng(0)
    configs = []
    for level in ("disable_all", "enable_all"):
        samples = {"original": 2.0 + rng.gamma(2.0, 0.05, runs), "folded": 1.8 + rng.gamma(2.0, 0.05, runs)}
        models = {label: ModelMeasurement(label, LatencyStats.from_samples([5.0]), LatencyStats.from_samples(s))
                  for label, s in samples.items()}
        ratio = models["original"].run.median_ms / models["folded"].run.median_ms
        speedup = Speedup("original", "folded", ratio, ratio * 0.97, ratio * 1.03, 0.95, 1.0)
        configs.append(ConfigResult(MeasureConfig(CPU, level, "bound", "cpu"), models, (speedup,)))
    settings = LatencySettings(providers=(CPU,), levels=("disable_all", "enable_all"), runs=runs, warmup=0,
                               rounds=4, creations=1, threads=1, batch=None, shapes={"x": (1, 3, 8, 8)},
                               io_binding=True, include_copies=False, seed=0, confidence=0.95, resamples=100,
                               baseline="original")
    return LatencyReport(tuple(configs), settings)


def hide_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``import matplotlib...`` raise ImportError, also after another test imported it."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_png_from_a_tiny_report(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    backend = matplotlib.get_backend()
    out = tiny_report().plot(tmp_path / "latency.png")
    assert matplotlib.get_backend() == backend  # drawn without pyplot: no global state switched
    assert out == tmp_path / "latency.png"
    width, height = png_size(out)
    assert 600 <= width <= 3000 and 250 <= height <= 2000  # two panels side by side
    assert 10_000 < out.stat().st_size < 2_000_000  # a picture, not an empty canvas


def test_plot_svg_names_configs_and_speedups(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = tiny_report()
    text = report.plot(tmp_path / "latency.svg").read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    speed = report.configs[0].speedups[0]
    # matplotlib draws text as paths and keeps each string in a comment beside it
    assert f"folded: x{speed.ratio:.3f} [{speed.ci_low:.3f}, {speed.ci_high:.3f}]" in text
    assert "CPU / disable_all" in text and "CPU / enable_all" in text
    assert f"{report.configs[0].models['original'].run.median_ms:.3g} ms" in text


def test_plot_refuses_other_suffixes(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(OptionError, match=r"\.png or \.svg"):
        tiny_report().plot(tmp_path / "latency.jpg")


def test_missing_matplotlib_is_one_line_with_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hide_matplotlib(monkeypatch)
    with pytest.raises(MissingDependencyError) as info:
        tiny_report().plot(tmp_path / "latency.png")
    message = str(info.value)
    assert "\n" not in message and "pip install 'bnfold[plot]'" in message
    assert info.value.exit_code == ExitCode.MISSING_DEPENDENCY == 7
    assert not (tmp_path / "latency.png").exists()


def test_cli_missing_matplotlib_exits_7_before_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    hide_matplotlib(monkeypatch)
    import bnfold.timing.measure as measure_mod

    def no_timing(*args: object, **kwargs: object) -> None:
        raise AssertionError("timed although the plot cannot be drawn")

    monkeypatch.setattr(measure_mod, "latency", no_timing)
    code, _, err = run_cli(["latency", str(MODEL), str(MODEL), "--plot", str(tmp_path / "p.png")], capsys)
    assert code == ExitCode.MISSING_DEPENDENCY
    assert err.strip().count("\n") == 0 and "pip install 'bnfold[plot]'" in err
    out = tmp_path / "folded.onnx"  # fold: refused before anything is written
    code, _, err = run_cli([str(MODEL), "-o", str(out), "--plot", str(tmp_path / "p.png")], capsys)
    assert code == ExitCode.MISSING_DEPENDENCY and not out.exists()


def test_cli_latency_and_fold_draw_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    timing = ["--runs", "6", "--rounds", "2", "--warmup", "1", "--level", "disable_all", "--threads", "1", "-q"]
    folded, plot = tmp_path / "folded.onnx", tmp_path / "fold.png"
    code, _, err = run_cli([str(MODEL), "-o", str(folded), "--plot", str(plot), *timing], capsys)  # implies --latency
    assert code == ExitCode.OK, err
    assert folded.exists() and png_size(plot)[0] > 300
    svg = tmp_path / "verb.svg"
    code, _, err = run_cli(["latency", str(MODEL), str(folded), "--plot", str(svg), *timing], capsys)
    assert code == ExitCode.OK, err
    assert "<svg" in svg.read_text()
    code, _, err = run_cli(["latency", str(MODEL), str(folded), "--plot", str(tmp_path / "x.gif"), *timing], capsys)
    assert code == ExitCode.USAGE and "--plot" in err
